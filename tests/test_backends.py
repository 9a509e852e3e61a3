"""GPU backends and device selection: TensorRT (against the recorder tests/tensorrt_double.py), ORT-CUDA, torch-CUDA.

On a machine without a GPU these check the refusals, the auto order and its logged reasons, the
torch program on the CPU, and segrt's side of the TensorRT API against a recorder of its calls. The
tests marked ``gpu`` run the real thing on a CUDA machine (skipped elsewhere by conftest.py).

TensorRT here: ``tests/tensorrt_double.py`` records the builder and runtime calls and computes nothing,
so these tests assert what segrt asks TensorRT for (flags, fp32 pins against the ONNX graph's
normalisation regions, the optimisation profile, the timing cache, atomic files) and what it does with
a plan's IO tensors and profile (batch bound, refusals, messages) - never an accuracy or a gate. NOT
VERIFIED here: that real TensorRT accepts these calls, that its parser names layers after ONNX nodes,
the plan's fp16 accuracy and its export gate, and the enqueue path on CUDA memory; only
``test_gpu_real_tensorrt`` covers them, on a machine with a GPU and TensorRT (skipped elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import tensorrt_double  # noqa: E402
from segrt.artifact import Artifact, sha256_file, write_json_atomic  # noqa: E402
from segrt.engine import backends as bk  # noqa: E402
from segrt.engine.backends import OrtCpuBackend, select_backend  # noqa: E402
from segrt.engine.backends import tensorrt as trt_backend  # noqa: E402
from segrt.engine.backends.ort_cuda import OrtCudaBackend  # noqa: E402
from segrt.engine.backends.torch_cuda import TorchCudaBackend  # noqa: E402
from segrt.errors import BackendUnavailable, ExportError, InferenceError  # noqa: E402
from segrt.export import export  # noqa: E402
from segrt.export import tensorrt as trt_export  # noqa: E402
from segrt.export.fp16 import FP16_MAX_ABS_REL, FP16_MIN_ARGMAX_AGREEMENT, find_norm_regions  # noqa: E402

torch.set_num_threads(1)

SMALL = Path(__file__).resolve().parent / "fixtures" / "bundles" / "wholebody_small"
ROI = (32, 32, 32)
OVERRIDES = {"inferer#roi_size": list(ROI), "inferer#sw_batch_size": 2}
H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour of a machine without a GPU")
FLOAT = tensorrt_double.DataType.FLOAT
PROFILE = {"input": ((1, 1, *ROI), (2, 1, *ROI), (2, 1, *ROI))}  # batch 1..sw_batch_size at the roi


def _real_tensorrt() -> bool:
    mod = sys.modules.get("tensorrt")
    if mod is not None and tensorrt_double.is_recorder(mod):
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def _recorder(mp: pytest.MonkeyPatch, gpu=H100, version="10.3.0", **kw) -> tensorrt_double.Recorder:
    """The TensorRT recorder as ``tensorrt``, on a machine that reports ``gpu`` (the one hardware query)."""
    rec = tensorrt_double.install(mp, version, **kw)
    mp.setattr(trt_backend, "gpu_identity", lambda device_index=0: dict(gpu))
    return rec


def _norm_layers(model) -> set[str]:
    """From the ONNX graph alone: the nodes of its normalisation regions with a float output (the shape
    arithmetic of a region has none), and every InstanceNormalization node."""
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    region = {n for r in find_norm_regions(model) for n in r.nodes}
    return ({n.name for n in model.graph.node if n.name in region and any(elem.get(o) in floats for o in n.output)}
            | {n.name for n in model.graph.node if n.op_type == "InstanceNormalization"})


def _add_recorded_plan(root: Path, mp: pytest.MonkeyPatch, cache: Path) -> tensorrt_double.Recorder:
    """Build a plan against the recorder into the artifact and record it in the manifest as export does
    (segrt.export._extra_variants) - without the gate, which runs the plan and so needs a GPU."""
    rec = _recorder(mp)
    a = Artifact.load(root)
    names = [n for r in find_norm_regions(onnx.load(str(root / "model_fp32.onnx"))) for n in r.nodes]
    info = trt_export.build_plan(root / "model_fp32.onnx", root / "model.plan",
                                 max_batch=a.spec.inference.sw_batch_size, in_channels=a.spec.in_channels,
                                 roi_size=a.spec.inference.roi_size, fp16=True, fp32_node_names=names,
                                 input_name="input", timing_cache=cache)
    manifest = dict(a.manifest)
    manifest["models"] = {**manifest["models"], "tensorrt": {
        "path": "model.plan", "sha256": sha256_file(root / "model.plan"), **info, "output_name": "output"}}
    write_json_atomic(root / "manifest.json", manifest)
    return rec


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """wholebody_small (32³, batch 2) with fp16 ONNX and torch program, plus a plan built against the recorder.

    Returns (artifact, the recorder of the plan's build, the timing cache file).
    """
    out = tmp_path_factory.mktemp("gpuart") / "art"
    cache = out.parent / "timing.cache"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export(SMALL, out, random_init=True, overrides=OVERRIDES, variants=("fp32", "fp16"),
                      torch_program=True)
        rec = _add_recorded_plan(path, mp, cache)
    return Artifact.load(path), rec, cache


def _batch(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, *ROI), dtype=np.float32)


def _close(ref, got, rel):
    return float(np.abs(ref - got).max()) <= rel * max(1.0, float(np.abs(ref).max()))


def _tiny_onnx(path: Path, roi=(8, 8, 8)) -> Path:
    """input (batch, 1, *roi) → Identity → output: an ONNX file for the parser to be pointed at."""
    from onnx import TensorProto, helper

    shape = ["batch", 1, *roi]
    g = helper.make_graph([helper.make_node("Identity", ["input"], ["output"], name="id")], "tiny",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


# ---------------------------------------------------------------------------------------------
# artifact contents
# ---------------------------------------------------------------------------------------------

def test_export_records_every_variant(art):
    a, _, _ = art
    m = a.manifest
    assert list(m["models"]) == ["fp32", "fp16", "torch", "tensorrt"]
    assert all(m["gate"][v]["passed"] for v in ("fp32", "fp16", "torch"))
    assert "tensorrt" not in m["gate"]  # the fixture's plan: its gate needs a GPU (see the module docstring)
    t = m["models"]["torch"]
    assert t["format"] == "torch.export" and t["path"] == "model_torch.pt2" and t["check_max_abs_diff"] <= 1e-4
    p = m["models"]["tensorrt"]
    assert p["path"] == "model.plan" and p["format"] == "tensorrt"
    assert (p["gpu_name"], p["compute_capability"], p["tensorrt_version"]) == (
        H100["gpu_name"], "9.0", "10.3.0")
    assert p["profile"] == {"min": [1, 1, *ROI], "opt": [2, 1, *ROI], "max": [2, 1, *ROI]}
    assert p["precision"] == "fp16 (normalisation layers fp32)" and p["max_batch"] == 2


# ---------------------------------------------------------------------------------------------
# TensorRT builder, against the recorder: what segrt asks for
# ---------------------------------------------------------------------------------------------

def test_plan_builder_asks_for_fp16_with_norms_pinned_fp32(art):
    a, rec, cache = art
    (build,) = rec.builds
    # TensorRT 10 networks are explicit-batch: no EXPLICIT_BATCH flag (deprecated), and not STRONGLY_TYPED
    # (a strongly typed network ignores the precision constraints below)
    assert build["network_flags"] == 0
    # the parser was told to emit TensorRT's own normalisation layer before it parsed
    (parsed,) = rec.called("parser.parse_from_file")
    assert parsed == (str(a.root / "model_fp32.onnx"), frozenset({tensorrt_double.OnnxParserFlag.NATIVE_INSTANCENORM}))
    assert build["config_flags"] == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    # the layers pinned to fp32 are those of the ONNX graph's normalisation regions, computed here from the graph
    fp32 = onnx.load(str(a.root / "model_fp32.onnx"))
    norm_nodes = {n.name for n in fp32.graph.node if n.op_type == "InstanceNormalization"}
    expected = _norm_layers(fp32)
    assert len(norm_nodes) == 25 and norm_nodes < expected
    assert set(build["precision"]) == expected and set(build["precision"].values()) == {FLOAT}
    assert build["output_types"] == {name: {0: FLOAT} for name in expected}  # each output of each pinned layer
    assert all(build["layers"][n][0] == tensorrt_double.LayerType.NORMALIZATION for n in norm_nodes)
    assert set(a.model_entry("tensorrt")["fp32_layers"]) == expected
    # one profile on the ONNX graph's input: batch 1..sw_batch_size at the roi, tuned for the largest batch
    assert [i.name for i in fp32.graph.input] == ["input"]
    assert build["profiles"] == [PROFILE]
    # the timing cache: loaded (empty: no file yet), strict about mismatches, written back after the build
    assert build["timing_cache"] == {"loaded": b"", "ignore_mismatch": False}
    assert cache.read_bytes() == rec.timing_cache_written[-1]
    # the plan file is what the builder returned, and no temporary file is left beside it or the cache
    assert (a.root / "model.plan").read_bytes() == rec.plans[0]
    assert not [p for d in (a.root, cache.parent) for p in d.iterdir() if p.name.endswith(".tmp")]


def test_plan_builder_pins_layers_by_node_name_and_normalisation_type(tmp_path, monkeypatch):
    """Which layers segrt pins, on a network given to the recorder layer by layer."""
    layers = [
        ("/n/Reshape", "SHUFFLE", ["FLOAT"]),                    # a region node: pinned
        ("/n/Reshape_1", "SHUFFLE", ["FLOAT"]),                  # the parser's second layer for that node: pinned
        ("/n/Reshape_x", "SHUFFLE", ["FLOAT"]),                  # not a suffix the parser makes: not pinned
        ("/n/Shape", "SHAPE", ["INT64"]),                        # shape arithmetic of a region: nothing to pin
        ("/n/Mixed", "SHUFFLE", ["FLOAT", "INT64"]),             # pinned; only its float output is typed
        ("/n/InstanceNormalization", "NORMALIZATION", ["FLOAT"]),
        ("/other/norm", "NORMALIZATION", ["FLOAT"]),             # a normalisation layer outside the names: pinned
        ("/conv/Conv", "CONVOLUTION", ["FLOAT"]),                # outside: fp16
    ]
    names = ["/n/Reshape", "/n/Shape", "/n/Mixed", "/n/InstanceNormalization"]
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    rec = _recorder(monkeypatch, layers=layers)
    info = trt_export.build_plan(onnx_path, tmp_path / "m.plan", max_batch=3, in_channels=1, roi_size=(8, 8, 8),
                                 fp32_node_names=names, timing_cache=tmp_path / "cache")
    pinned = ["/n/Reshape", "/n/Reshape_1", "/n/Mixed", "/n/InstanceNormalization", "/other/norm"]
    (build,) = rec.builds
    assert build["precision"] == dict.fromkeys(pinned, FLOAT)
    assert build["output_types"] == {n: {0: FLOAT} for n in pinned}
    assert info["fp32_layers"] == pinned
    assert build["profiles"] == [{"input": ((1, 1, 8, 8, 8), (3, 1, 8, 8, 8), (3, 1, 8, 8, 8))}]
    # fp16=False: an fp32 plan - no reduced-precision flag, nothing pinned
    rec = _recorder(monkeypatch, layers=layers)
    info = trt_export.build_plan(onnx_path, tmp_path / "m32.plan", max_batch=1, in_channels=1, roi_size=(8, 8, 8),
                                 fp16=False, fp32_node_names=names, timing_cache=tmp_path / "cache")
    (build,) = rec.builds
    assert build["config_flags"] == set() and build["precision"] == {} and build["output_types"] == {}
    assert info["precision"] == "fp32" and info["fp32_layers"] == []


def test_export_builds_the_plan_and_gates_it_before_publishing(tmp_path, monkeypatch):
    """export(tensorrt=True): the build request made from the exported ONNX, then the gate runs the plan through the
    TensorRT backend before anything is published. The gate needs a GPU: here the backend's ``infer`` is replaced
    by one that stops the export, so the test checks that it was reached, and that nothing was published."""
    rec = _recorder(monkeypatch)

    class GateNeedsAGpu(Exception):
        pass

    reached = []

    def infer(self, batch):
        reached.append((self, batch.shape))
        raise GateNeedsAGpu

    monkeypatch.setattr(trt_backend.TensorRTBackend, "infer", infer)
    with warnings.catch_warnings(), pytest.raises(GateNeedsAGpu):
        warnings.simplefilter("ignore")
        export(SMALL, tmp_path / "art", random_init=True, overrides=OVERRIDES, tensorrt=True, gate_samples=1,
               trt_timing_cache=tmp_path / "timing.cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache"]  # no artifact, no temporary directory
    (build,) = rec.builds
    (model_bytes,) = rec.parsed_models
    assert set(build["precision"]) == _norm_layers(onnx.load_from_string(model_bytes))
    assert build["profiles"] == [PROFILE] and build["config_flags"] == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    # the gate ran the backend of the plan just built, a batch of 2 at a time
    (backend, shape), = reached
    assert rec.called("runtime.deserialize_cuda_engine") == [(rec.plans[0],)]
    assert (backend.input_name, backend.output_name, backend.max_batch) == ("input", "output", 2)
    assert shape == (2, 1, *ROI)


def test_timing_cache_is_reused(art, tmp_path, monkeypatch):
    a, _, cache = art
    before = cache.read_bytes()
    rec = _recorder(monkeypatch)
    info = trt_export.build_plan(a.root / "model_fp32.onnx", tmp_path / "p.plan", max_batch=2, in_channels=1,
                                 roi_size=ROI, fp32_node_names=a.model_entry("tensorrt")["fp32_layers"],
                                 timing_cache=cache)
    assert rec.called("config.create_timing_cache") == [(before,)]  # the first build's cache was loaded
    (build,) = rec.builds
    assert build["timing_cache"] == {"loaded": before, "ignore_mismatch": False}
    assert cache.read_bytes() == rec.timing_cache_written[-1] != before  # and the updated one written back
    assert info["timing_cache"] == str(cache)


def test_unwritable_timing_cache_only_warns(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    rec = _recorder(monkeypatch)
    with caplog.at_level(logging.WARNING):
        trt_export.build_plan(_tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", max_batch=1, in_channels=1,
                              roi_size=(8, 8, 8), timing_cache=tmp_path / "file" / "cache")
    assert (tmp_path / "m.plan").read_bytes() == rec.plans[0]
    assert "could not write the TensorRT timing cache" in caplog.text


def test_plan_is_written_atomically(tmp_path, monkeypatch):
    """A failed build or a failed write leaves an existing plan as it was, and no temporary file."""
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"the previous plan")
    kw = dict(max_batch=1, in_channels=1, roi_size=(8, 8, 8), timing_cache=tmp_path / "cache")
    _recorder(monkeypatch, build_fails=True)
    with pytest.raises(ExportError, match="TensorRT failed to build a plan"):
        trt_export.build_plan(onnx_path, plan, **kw)
    assert plan.read_bytes() == b"the previous plan"

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    _recorder(monkeypatch)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ExportError, match="could not write the TensorRT plan .*No space left"):
        trt_export.build_plan(onnx_path, plan, **kw)
    monkeypatch.undo()
    assert plan.read_bytes() == b"the previous plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.plan"]


def test_plan_builder_refusals(tmp_path, monkeypatch):
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    kw = dict(max_batch=1, in_channels=1, roi_size=(8, 8, 8), timing_cache=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        trt_export.build_plan(onnx_path, tmp_path / "x.plan", **kw)
    _recorder(monkeypatch, version="8.6.1")
    with pytest.raises(ExportError, match=r"TensorRT >= 10, this machine has 8\.6\.1"):
        trt_export.build_plan(onnx_path, tmp_path / "x.plan", **kw)
    _recorder(monkeypatch)
    with pytest.raises(ExportError, match="max_batch must be >= 1"):
        trt_export.build_plan(onnx_path, tmp_path / "x.plan", **{**kw, "max_batch": 0})
    _recorder(monkeypatch, parse_errors=["no importer for op Foo (node n1)"])
    with pytest.raises(ExportError, match="parser rejected .*no importer for op Foo"):
        trt_export.build_plan(onnx_path, tmp_path / "x.plan", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@cpu_only
def test_plan_builder_needs_a_gpu(tmp_path, monkeypatch):
    tensorrt_double.install(monkeypatch)  # TensorRT importable, and the real GPU query: there is no GPU here
    with pytest.raises(ExportError, match="building a TensorRT plan needs an NVIDIA GPU"):
        trt_export.build_plan(_tiny_onnx(tmp_path / "m.onnx"), tmp_path / "x.plan", max_batch=1, in_channels=1,
                              roi_size=(8, 8, 8), timing_cache=tmp_path / "cache")
    assert not (tmp_path / "x.plan").exists()


# ---------------------------------------------------------------------------------------------
# TensorRT runtime, against the recorder: reading the plan back, refusals, input checks
# ---------------------------------------------------------------------------------------------

def test_tensorrt_backend_reads_the_plan(art, monkeypatch):
    a, _, _ = art
    rec = _recorder(monkeypatch)
    with select_backend(a, "auto")[0] as b:
        assert b.name == "tensorrt" and b.device == "cuda" and b.threads is None
        assert rec.called("runtime.deserialize_cuda_engine") == [((a.root / "model.plan").read_bytes(),)]
        assert (b.input_name, b.output_name) == ("input", "output")
        assert rec.called("engine.get_tensor_profile_shape") == [("input", 0)]
        assert b.profile_batch == (1, 2) and b.max_batch == 2
        assert rec.called("engine.create_execution_context") == [()]
        # the input checks come before anything is enqueued (the enqueue itself needs CUDA: unverified here)
        with pytest.raises(InferenceError, match=r"input is on cpu, the plan runs on cuda:0"):
            b.infer_torch(torch.from_numpy(_batch(1)))
        with pytest.raises(InferenceError, match=r"shape \(B, 1, 32, 32, 32\), got \(1, 1, 8, 8, 8\)"):
            b.infer_torch(torch.zeros(1, 1, 8, 8, 8))
        with pytest.raises(InferenceError, match=r"shape \(B, 1, 32, 32, 32\)"):
            b.infer(np.zeros((2, 1, 16, 32, 32), np.float32))


def test_tensorrt_batch_bound_and_window_come_from_the_plan(art, tmp_path, monkeypatch):
    a, _, _ = art
    entry = dict(a.model_entry("tensorrt"))  # the manifest says max_batch 2: the plan's profile decides
    onnx_path = a.root / "model_fp32.onnx"
    kw = dict(in_channels=1, roi_size=ROI, timing_cache=tmp_path / "cache")
    _recorder(monkeypatch)
    trt_export.build_plan(onnx_path, tmp_path / "b3.plan", max_batch=3, **kw)
    with trt_backend.TensorRTBackend(tmp_path / "b3.plan", entry, 1, 6, ROI) as b:
        assert b.profile_batch == (1, 3) and b.max_batch == 3
    with trt_backend.TensorRTBackend(tmp_path / "b3.plan", entry, 1, 6, ROI, 2) as b:
        assert b.max_batch == 2
    with pytest.raises(BackendUnavailable, match=r"profile stops at batch 3 .*gpu_batch=4"):
        trt_backend.TensorRTBackend(tmp_path / "b3.plan", entry, 1, 6, ROI, 4)
    # a plan whose profile is for other windows than the artifact's spec
    trt_export.build_plan(onnx_path, tmp_path / "r16.plan", max_batch=2, **{**kw, "roi_size": (16, 16, 16)})
    with pytest.raises(BackendUnavailable, match=r"takes inputs \(1, 1, 16, 16, 16\) to \(2, 1, 16, 16, 16\).*"
                                                 r"needs windows \(B, 1, 32, 32, 32\)"):
        trt_backend.TensorRTBackend(tmp_path / "r16.plan", entry, 1, 6, ROI)
    # the manifest names another input than the plan's
    with pytest.raises(BackendUnavailable, match=r"plan's input is 'input', the manifest says 'x'"):
        trt_backend.TensorRTBackend(tmp_path / "b3.plan", {**entry, "input_name": "x"}, 1, 6, ROI)
    # bytes TensorRT cannot deserialize (it returns None)
    (tmp_path / "bad.plan").write_bytes(b"not a plan")
    with pytest.raises(BackendUnavailable, match="could not deserialize the plan"):
        trt_backend.TensorRTBackend(tmp_path / "bad.plan", entry, 1, 6, ROI)


@pytest.mark.parametrize("gpu,version,needle", [
    ({"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "10.3.0", "NVIDIA A100"),
    ({"gpu_name": H100["gpu_name"], "compute_capability": "8.9"}, "10.3.0", "compute capability 9.0"),
    (H100, "10.7.0", "TensorRT 10.3.0"),
])
def test_plan_for_another_gpu_or_version_is_refused(art, monkeypatch, gpu, version, needle):
    a, _, _ = art
    rec = _recorder(monkeypatch, gpu=gpu, version=version)
    with pytest.raises(BackendUnavailable, match="plan was built for") as ei:
        select_backend(a, "tensorrt")
    assert needle in str(ei.value) and "rebuild" in str(ei.value)
    assert rec.called("runtime.deserialize_cuda_engine") == []  # refused before the plan is loaded
    # auto says why it passed the plan over, and falls through to the next backend
    b, reason = select_backend(a, "auto")
    with b:
        assert b.name != "tensorrt"
        assert "tensorrt: the artifact's TensorRT plan was built for" in reason


def test_gpu_batch_reaches_the_backend_or_is_refused_with_the_reason(art, monkeypatch):
    a, _, _ = art
    _recorder(monkeypatch)
    with select_backend(a, "tensorrt", gpu_batch=1)[0] as b:  # within the plan's profile 1..2
        assert b.max_batch == 1
    with pytest.raises(BackendUnavailable, match=r"profile stops at batch 2 .* gpu_batch=4"):
        select_backend(a, "tensorrt", gpu_batch=4)
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(BackendUnavailable, match="gpu_batch must be a positive integer"):
            select_backend(a, "auto", gpu_batch=bad)


def test_fp32_variant_refuses_the_fp16_plan(art, monkeypatch):
    a, _, _ = art
    _recorder(monkeypatch)
    with pytest.raises(BackendUnavailable, match="fp16"):
        select_backend(a, "tensorrt", variant="fp32")


def test_tensorrt_backend_needs_tensorrt_10(art, monkeypatch):
    a, _, _ = art
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        select_backend(a, "tensorrt")
    _recorder(monkeypatch, version="8.6.1")
    with pytest.raises(BackendUnavailable, match=r"TensorRT >= 10, this machine has 8\.6\.1"):
        select_backend(a, "tensorrt")


# ---------------------------------------------------------------------------------------------
# device selection on a machine without a GPU
# ---------------------------------------------------------------------------------------------

@cpu_only
def test_auto_falls_back_to_ort_cpu_and_says_why(art, caplog):
    a, _, _ = art
    if _real_tensorrt():
        pytest.skip("a real tensorrt is importable here")
    with caplog.at_level(logging.INFO, logger="segrt"):
        b, reason = select_backend(a, "auto", threads=1)
    with b:
        assert b.name == "ort-cpu" and b.device == "cpu"
    assert reason.startswith("device=auto: picked ort-cpu on cpu")
    for kind, why in (("tensorrt", "tensorrt is not installed"), ("ort-cuda", "onnxruntime-gpu"),
                      ("torch-cuda", "no CUDA device")):
        assert f"{kind}: " in reason and why in reason, reason
    # the order is the documented one
    assert reason.index("tensorrt:") < reason.index("ort-cuda:") < reason.index("torch-cuda:")
    assert "picked ort-cpu" in caplog.text and "not ort-cuda" in caplog.text


@cpu_only
def test_explicit_gpu_devices_are_refused_with_reasons(art):
    a, _, _ = art
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        select_backend(a, "ort-cuda")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        select_backend(a, "torch-cuda")
    with pytest.raises(BackendUnavailable, match="device=cuda: no GPU backend.*ort-cuda"):
        select_backend(a, "cuda")
    with pytest.raises(BackendUnavailable, match="unknown device 'gpu'"):
        select_backend(a, "gpu")
    with pytest.raises(BackendUnavailable, match="unknown variant"):
        select_backend(a, "cpu", variant="int8")


def test_cpu_device_honours_the_variant(art):
    a, _, _ = art
    b16, reason = select_backend(a, "cpu", variant="fp16", threads=1)
    with b16, OrtCpuBackend.from_artifact(a, "fp32", threads=1) as b32:
        assert "ort-cpu" in reason
        x = _batch(2, 7)
        assert _close(b32.infer(x), b16.infer(x), FP16_MAX_ABS_REL)


def test_ort_cuda_refuses_a_silent_cpu_fallback(art, monkeypatch):
    """ONNX Runtime falls back to the CPU when the CUDA provider cannot start: the backend must refuse."""
    a, _, _ = art
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        real = ort.get_available_providers()
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
        with pytest.raises(BackendUnavailable, match="failed to start|could not load"):
            OrtCudaBackend.from_artifact(a, "fp16")
    else:  # pragma: no cover - a GPU build of onnxruntime
        with OrtCudaBackend.from_artifact(a, "fp16") as b:
            assert "CUDAExecutionProvider" in b.session.get_providers()
    with pytest.raises(BackendUnavailable, match="runs ONNX models"):
        OrtCudaBackend.from_artifact(a, "torch")


# ---------------------------------------------------------------------------------------------
# torch program (CPU path of the torch-CUDA backend)
# ---------------------------------------------------------------------------------------------

def test_torch_program_on_cpu_equals_ort(art):
    a, _, _ = art
    with TorchCudaBackend.from_artifact(a, device="cpu") as tb, OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ob:
        assert tb.device == "cpu" and not tb.fp16 and not tb.cuda_graphs and tb.format == "torch.export"
        x = _batch(3, 1)  # 3 > max batch 2
        ref = ob.infer(x)
        got = tb.infer(x)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert _close(ref, got, 1e-4)
        t = tb.infer_torch(torch.from_numpy(x[:1]))
        assert isinstance(t, torch.Tensor) and tuple(t.shape) == (1, 6, *ROI)
        with pytest.raises(InferenceError, match=r"shape \(B, 1, 32, 32, 32\)"):
            tb.infer_torch(torch.zeros(1, 1, 8, 8, 8))


def test_torch_program_batch_size_does_not_change_outputs(art):
    a, _, _ = art
    x = _batch(5, 2)
    outs = []
    for mb in (1, 2, 4):
        with TorchCudaBackend.from_artifact(a, device="cpu", max_batch=mb) as tb:
            assert tb.max_batch == mb
            outs.append(tb.infer(x))
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-5)


def test_torchscript_fallback_is_recorded(tmp_path):
    """A TorchScript source cannot go through torch.export: the TorchScript program is saved instead."""
    from segrt.export.torch_program import export_torch_program

    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    scripted = torch.jit.script(net.eval())
    info = export_torch_program(scripted, tmp_path, in_channels=1, roi_size=(16, 16, 16))
    assert info["format"] == "torchscript" and info["path"] == "model_torch.ts"
    assert "torch.export cannot trace" in info["format_note"]
    b = TorchCudaBackend(tmp_path / info["path"], info["format"], 1, 2, (16, 16, 16), 2, device="cpu")
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16, 16), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert _close(ref, b.infer(x), 1e-5)


# ---------------------------------------------------------------------------------------------
# on a GPU (run by the lead on a lent machine; skipped here)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_torch_cuda_fp16_graphs_match_ort_fp32(art):
    a, _, _ = art
    x = _batch(2, 11)
    with OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ob:
        ref = ob.infer(x)
    with TorchCudaBackend.from_artifact(a, device="cuda") as g, \
            TorchCudaBackend.from_artifact(a, device="cuda", cuda_graphs=False) as e:
        assert g.fp16 and g.cuda_graphs and g.channels_last and torch.backends.cudnn.benchmark
        got = g.infer(x)
        eager = e.infer(x)
        assert _close(ref, got, FP16_MAX_ABS_REL)
        assert (ref.argmax(1) == got.argmax(1)).mean() >= FP16_MIN_ARGMAX_AGREEMENT
        # graph replay computes what eager fp16 computes
        assert _close(eager, got, 2e-3)
        # a smaller last batch is padded into the captured graph: same rows as eager on batch 1
        one = g.infer(x[1:2])
        assert _close(e.infer(x[1:2]), one, 2e-3)
        assert _close(got[1:2], one, 2e-3)
        # replay after replay: outputs are copies, not views of the static buffer
        first = g.infer_torch(torch.from_numpy(x).cuda())
        g.infer_torch(torch.from_numpy(_batch(2, 12)).cuda())
        assert first.is_cuda and first.dtype == torch.float32
        assert _close(got, first.cpu().numpy(), 1e-6)


@pytest.mark.gpu
def test_gpu_auto_picks_a_gpu_backend(art):
    a, _, _ = art
    b, reason = select_backend(a, "auto")
    with b:
        assert b.device == "cuda", reason
        x = _batch(2, 3)
        with OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ob:
            assert _close(ob.infer(x), b.infer(x), FP16_MAX_ABS_REL)


@pytest.mark.gpu
def test_gpu_ort_cuda_io_binding(art):
    a, _, _ = art
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    x = _batch(2, 5)
    with OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ob, OrtCudaBackend.from_artifact(a, "fp16") as b:
        ref = ob.infer(x)
        got = b.infer(x)
        assert _close(ref, got, FP16_MAX_ABS_REL)
        t = b.infer_torch(torch.from_numpy(x).cuda())
        assert t.is_cuda and _close(got, t.cpu().numpy(), 1e-3)


@pytest.mark.gpu
def test_gpu_real_tensorrt(tmp_path):
    if not _real_tensorrt():
        pytest.skip("TensorRT is not installed")
    out = export(SMALL, tmp_path / "trt", random_init=True, overrides=OVERRIDES, tensorrt=True,
                 trt_timing_cache=tmp_path / "cache")
    a = Artifact.load(out)
    assert a.manifest["gate"]["tensorrt"]["passed"]
    x = _batch(2, 9)
    with select_backend(a, "tensorrt")[0] as b, OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ob:
        assert _close(ob.infer(x), b.infer(x), FP16_MAX_ABS_REL)


def test_select_backend_devices_are_listed():
    assert bk.DEVICES == ("auto", "cpu", "cuda", "tensorrt", "ort-cuda", "torch-cuda", "ort-cpu", "openvino")
    assert bk.CPU_ORDER == ("openvino-int8", "openvino-bf16")
    assert bk.GPU_ORDER == ("tensorrt", "ort-cuda", "torch-cuda")


def test_plan_layer_names_map_to_onnx_nodes():
    """The ONNX parser names a node's layers NODE, NODE_1, NODE_2, ...: all of them are pinned."""
    names = {"node_Mul_2", "/norm1/Add"}
    assert trt_export._is_pinned_name("node_Mul_2", names)
    assert trt_export._is_pinned_name("node_Mul_2_1", names) and trt_export._is_pinned_name("/norm1/Add_3", names)
    assert not trt_export._is_pinned_name("node_Mul_28", names)
    assert not trt_export._is_pinned_name("node_Mul_2_x", names)
