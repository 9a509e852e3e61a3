"""CPU variants: the OpenVINO backend, the export-time gate of a reduced-precision CPU variant, and the CPU
choice of select_backend (best gated variant → ONNX Runtime fp32, with logged reasons)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from segrt.artifact import Artifact  # noqa: E402
from segrt.engine.backends import OrtCpuBackend, select_backend  # noqa: E402
from segrt.errors import BackendUnavailable, ExportError  # noqa: E402
from segrt.export import export  # noqa: E402
from segrt.export.cpu_variants import MIN_CLASS_DICE, gate_cpu_variant, per_class_dice  # noqa: E402

SMALL = Path(__file__).resolve().parent / "fixtures" / "bundles" / "wholebody_small"
ROI = (32, 32, 32)
OVERRIDES = {"inferer#roi_size": list(ROI), "inferer#sw_batch_size": 2}
VARIANT = "openvino-bf16"


def _has_openvino_bf16() -> bool:
    try:
        from segrt.engine.backends.openvino_cpu import openvino_info

        return openvino_info()["native_bf16"]
    except Exception:  # noqa: BLE001
        return False


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


needs_ov = pytest.mark.skipif(not _has_openvino(), reason="openvino is not installed")
needs_bf16 = pytest.mark.skipif(not _has_openvino_bf16(), reason="openvino with native bf16 on this CPU needed")


@pytest.fixture(scope="module")
def plain(exported):
    """wholebody_small at 32³ without CPU variants (fp32 only); shared read-only (_with_gate copies it)."""
    return exported(SMALL, random_init=True, overrides=OVERRIDES, gate_samples=1)


def _with_gate(src: Path, dst: Path, passed: bool, reason: str | None = None) -> Artifact:
    """A copy of ``src`` whose manifest records the openvino-bf16 variant with the given gate outcome.

    The selection logic is what these tests check; the gate computation itself is checked by the gate tests.
    """
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    fp32 = m["models"]["fp32"]
    m["models"][VARIANT] = {**fp32, "runtime": "openvino", "inference_precision": "bf16"}
    m["gate"][VARIANT] = {"passed": passed, "reason": reason, "problems": [reason] if reason else []}
    (dst / "manifest.json").write_text(json.dumps(m))
    return Artifact.load(dst)


def _batch(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, *ROI), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# per-class Dice and the gate
# ---------------------------------------------------------------------------------------------

def test_per_class_dice_counts_and_gates_large_classes_only():
    ref = np.array([0] * 2000 + [1] * 1500 + [2] * 10)
    got = ref.copy()
    got[:100] = 1          # 100 class-0 voxels become class 1
    got[-10:] = 0          # the tiny class 2 vanishes
    r = per_class_dice(ref, got, 3, min_voxels=1000)
    assert r["gated"] == [0, 1]
    assert r["dice"][0] == pytest.approx(2 * 1900 / (2000 + 1910))
    assert r["dice"][1] == pytest.approx(2 * 1500 / (1500 + 1600))
    assert r["dice"][2] == 0.0 and r["voxels"][2] == 10
    assert r["worst_class"] == 1


def test_gate_passes_an_exact_variant_and_refuses_a_broken_one(plain):
    a = Artifact.load(plain)
    ref = OrtCpuBackend.from_artifact(a, "fp32", threads=1)
    ok = gate_cpu_variant(VARIANT, a.model_path("fp32"), a.spec, samples=1, run=ref.infer)
    assert ok["passed"] and ok["worst_class_dice"] == 1.0 and ok["max_abs_logit_diff"] == 0.0
    assert ok["ct_like"]["per_class_dice"]["gated"], "the CT-like patches must gate at least one class"

    def broken(x):  # swaps the two largest classes' logits: a wrong output order / wrong head
        y = ref.infer(x)
        k = np.argsort(-np.bincount(y.argmax(1).ravel(), minlength=y.shape[1]))[:2]
        y[:, k] = y[:, k[::-1]]
        return y

    bad = gate_cpu_variant(VARIANT, a.model_path("fp32"), a.spec, samples=1, run=broken)
    assert not bad["passed"]
    assert f"per-class Dice below {MIN_CLASS_DICE}" in bad["reason"]
    assert bad["worst_class_dice"] < 0.5
    json.dumps(bad)  # the report goes into the manifest


def test_export_rejects_unknown_cpu_variant(tmp_path):
    with pytest.raises(ExportError, match="cpu_variants"):
        export(SMALL, tmp_path / "x", random_init=True, overrides=OVERRIDES, cpu_variants=("int4",))
    assert not (tmp_path / "x").exists()


@needs_bf16
def test_export_records_the_gated_cpu_variant(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export(SMALL, tmp_path / "art", random_init=True, overrides=OVERRIDES, cpu_variants=(VARIANT,))
    a = Artifact.load(path)
    entry, gate = a.manifest["models"][VARIANT], a.manifest["gate"][VARIANT]
    assert entry["path"] == "model_fp32.onnx" and entry["sha256"] == a.manifest["models"]["fp32"]["sha256"]
    assert entry["inference_precision"] == "bf16"
    assert "OpenVINO" in gate["runtime"] and gate["min_class_dice"] == MIN_CLASS_DICE
    assert isinstance(gate["passed"], bool)
    pcd = gate["ct_like"]["per_class_dice"]
    assert gate["passed"] == all(pcd["dice"][str(k)] >= MIN_CLASS_DICE for k in pcd["gated"])
    assert 0.0 < gate["ct_like"]["max_abs_logit_diff"] < 1.0


# ---------------------------------------------------------------------------------------------
# the OpenVINO backend
# ---------------------------------------------------------------------------------------------

@needs_ov
def test_openvino_fp32_and_bf16_match_ort_fp32(plain):
    from segrt.engine.backends.openvino_cpu import OpenVinoCpuBackend

    a = Artifact.load(plain)
    x = _batch(2, seed=3)
    with OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ob:
        ref = ob.infer(x)
    scale = max(1.0, float(np.abs(ref).max()))
    with OpenVinoCpuBackend.from_artifact(a, "openvino-fp32", threads=1) as vb:
        assert vb.name == "openvino-fp32"
        got = vb.infer(x)
        got1 = vb.infer(x[:1])  # another batch size: compiled on demand
    assert got.shape == ref.shape and got1.shape == (1, *ref.shape[1:])
    assert float(np.abs(got - ref).max()) <= 1e-3 * scale
    assert float(np.abs(got1 - ref[:1]).max()) <= 1e-3 * scale
    if _has_openvino_bf16():
        with OpenVinoCpuBackend(a.model_path("fp32"), 1, a.spec.num_classes, ROI, 2, precision="bf16",
                                threads=1) as vb:
            assert vb.name == "openvino-bf16"
            got = vb.infer(x)
        diff = float(np.abs(got - ref).max())
        # bf16 (8 mantissa bits) differs, but boundedly: measured 0.06 on logits up to 3 here
        assert 0.0 < diff <= 5e-2 * scale
        assert float((got.argmax(1) == ref.argmax(1)).mean()) >= 0.95


@needs_bf16
def test_select_picks_the_gated_variant(plain, tmp_path, caplog):
    a = _with_gate(plain, tmp_path / "ok", passed=True)
    with caplog.at_level(logging.INFO, logger="segrt"):
        b, reason = select_backend(a, "cpu", threads=1)
    with b:
        assert b.name == VARIANT and b.device == "cpu"
        assert b.infer(_batch(1)).shape == (1, a.spec.num_classes, *ROI)
    assert reason == "device=cpu: openvino-bf16 on cpu, 1 threads"
    # variant="fp32" and device="ort-cpu" keep ONNX Runtime fp32 (exact parity) even so
    for dev, var in (("cpu", "fp32"), ("ort-cpu", None)):
        b, reason = select_backend(a, dev, variant=var, threads=1)
        with b:
            assert b.name == "ort-cpu", reason
    b, reason = select_backend(a, "openvino", threads=1)
    with b:
        assert b.name == VARIANT
    b, reason = select_backend(a, "openvino", variant="fp32", threads=1)
    with b:
        assert b.name == "openvino-fp32"


@needs_ov
def test_select_falls_back_when_the_gate_failed(plain, tmp_path, caplog):
    why = "per-class Dice below 0.98 on CT-like patches for 1 of 5 gated classes: class 3 0.9512 (4000 voxels)"
    a = _with_gate(plain, tmp_path / "bad", passed=False, reason=why)
    with caplog.at_level(logging.INFO, logger="segrt"):
        b, reason = select_backend(a, "cpu", threads=1)
    with b:
        assert b.name == "ort-cpu"
    assert reason.startswith("device=cpu: ort-cpu on cpu, 1 threads (rejected openvino-bf16: failed its "
                             "export-time accuracy gate")
    assert "class 3 0.9512" in reason
    assert "not openvino-bf16" in caplog.text and "class 3 0.9512" in caplog.text
    # asked for explicitly, it is refused with the reason
    with pytest.raises(BackendUnavailable, match="failed its export-time accuracy gate.*class 3"):
        select_backend(a, "cpu", variant=VARIANT, threads=1)
    # device=openvino without a usable bf16 variant runs OpenVINO fp32 and says why
    b, reason = select_backend(a, "openvino", threads=1)
    with b:
        assert b.name == "openvino-fp32" and "failed its export-time accuracy gate" in reason


def test_select_falls_back_when_openvino_is_missing(plain, tmp_path, monkeypatch, caplog):
    a = _with_gate(plain, tmp_path / "ok", passed=True)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with caplog.at_level(logging.INFO, logger="segrt"):
        b, reason = select_backend(a, "auto", threads=1)
    with b:
        assert b.name == "ort-cpu"
    assert "openvino-bf16: openvino is not installed" in reason
    assert "openvino is not installed" in caplog.text
    with pytest.raises(BackendUnavailable, match="openvino is not installed"):
        select_backend(a, "openvino")


def test_select_on_an_artifact_without_cpu_variants_is_unchanged(plain):
    b, reason = select_backend(Artifact.load(plain), "cpu", threads=1)
    with b:
        assert b.name == "ort-cpu"
    assert reason == "device=cpu: ort-cpu on cpu, 1 threads"


@needs_ov
def test_no_native_bf16_refuses_the_variant_and_falls_back(plain, tmp_path, monkeypatch, caplog):
    """The path of a CPU without native bf16 (AVX2, AVX-512 without BF16/AMX, most aarch64), checked on every
    machine: the needs_bf16 tests above run only where bf16 is native, so here OpenVINO's capability list is
    made to lack BF16. A gated variant is then refused with the reason, device=cpu falls back to ONNX Runtime
    fp32 and the export-time gate cannot run."""
    from segrt.engine.backends import openvino_cpu

    real = openvino_cpu.openvino_info()
    caps = [c for c in real["capabilities"] if c != "BF16"]
    monkeypatch.setattr(openvino_cpu, "openvino_info", lambda: {**real, "capabilities": caps, "native_bf16": False})
    a = _with_gate(plain, tmp_path / "ok", passed=True)
    with caplog.at_level(logging.INFO, logger="segrt"):
        b, reason = select_backend(a, "cpu", threads=1)
    with b:
        assert b.name == "ort-cpu"
    assert "rejected openvino-bf16" in reason and "no native bf16" in reason
    with pytest.raises(BackendUnavailable, match="no native bf16"):
        select_backend(a, "cpu", variant=VARIANT, threads=1)
    b, reason = select_backend(a, "openvino", threads=1)  # OpenVINO fp32 still runs
    with b:
        assert b.name == "openvino-fp32" and "no native bf16" in reason
    with pytest.raises(ExportError, match="cannot gate the openvino-bf16 CPU variant on this machine"):
        gate_cpu_variant(VARIANT, a.model_path("fp32"), a.spec, samples=1)
