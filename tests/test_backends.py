"""GPU backends and device selection: TensorRT (against tests/tensorrt_double.py), ORT-CUDA, torch-CUDA.

On a machine without a GPU these check the refusals, the auto order and its logged reasons, the
torch program on the CPU, and the TensorRT builder / runtime against the TensorRT test double. The
tests marked ``gpu`` run the real thing on a CUDA machine (skipped elsewhere by conftest.py).
"""

from __future__ import annotations

import logging
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
from segrt.artifact import Artifact  # noqa: E402
from segrt.engine import backends as bk  # noqa: E402
from segrt.engine.backends import OrtCpuBackend, select_backend  # noqa: E402
from segrt.engine.backends import tensorrt as trt_backend  # noqa: E402
from segrt.engine.backends.ort_cuda import OrtCudaBackend  # noqa: E402
from segrt.engine.backends.torch_cuda import TorchCudaBackend  # noqa: E402
from segrt.errors import BackendUnavailable, InferenceError  # noqa: E402
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


def _real_tensorrt() -> bool:
    mod = sys.modules.get("tensorrt")
    if mod is tensorrt_double:
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


class _Double:
    """The TensorRT double installed, on a fake H100, plans run on host memory."""

    def __init__(self, mp: pytest.MonkeyPatch, gpu=H100, version="10.3.0"):
        mp.setitem(sys.modules, "tensorrt", tensorrt_double)  # restored (removed) by mp at the end
        self.mod = tensorrt_double.install(version)
        mp.setattr(trt_export, "_gpu_identity", lambda: dict(gpu))
        mp.setattr(trt_backend, "gpu_identity", lambda device_index=0: dict(gpu))
        mp.setattr(trt_backend, "_DEFAULT_DEVICE", "cpu")

    @property
    def calls(self):
        return tensorrt_double.CALLS


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """wholebody_small (32³, batch 2) with fp16 ONNX, torch program and a plan built by the double."""
    out = tmp_path_factory.mktemp("gpuart") / "art"
    cache = out.parent / "timing.cache"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _Double(mp)
        path = export(SMALL, out, random_init=True, overrides=OVERRIDES, variants=("fp32", "fp16"),
                      torch_program=True, tensorrt=True, trt_timing_cache=cache)
        calls = list(tensorrt_double.CALLS)
    return Artifact.load(path), calls, cache


@pytest.fixture
def double(monkeypatch):
    d = _Double(monkeypatch)
    yield d
    tensorrt_double.uninstall()


def _batch(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, *ROI), dtype=np.float32)


def _close(ref, got, rel):
    return float(np.abs(ref - got).max()) <= rel * max(1.0, float(np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------
# artifact contents
# ---------------------------------------------------------------------------------------------

def test_export_records_every_variant(art):
    a, _, _ = art
    m = a.manifest
    assert list(m["models"]) == ["fp32", "fp16", "torch", "tensorrt"]
    assert all(m["gate"][v]["passed"] for v in m["models"])
    t = m["models"]["torch"]
    assert t["format"] == "torch.export" and t["path"] == "model_torch.pt2" and t["check_max_abs_diff"] <= 1e-4
    p = m["models"]["tensorrt"]
    assert p["path"] == "model.plan" and p["format"] == "tensorrt"
    assert (p["gpu_name"], p["compute_capability"], p["tensorrt_version"]) == (
        H100["gpu_name"], "9.0", "10.3.0")
    assert p["profile"] == {"min": [1, 1, *ROI], "opt": [2, 1, *ROI], "max": [2, 1, *ROI]}
    assert p["precision"].startswith("fp16")


# ---------------------------------------------------------------------------------------------
# TensorRT builder and runtime, against the double
# ---------------------------------------------------------------------------------------------

def test_plan_builder_asks_for_fp16_with_norms_pinned_fp32(art):
    a, calls, cache = art
    flags = [c[1].name for c in calls if c[0] == "config.set_flag"]
    assert "FP16" in flags and "OBEY_PRECISION_CONSTRAINTS" in flags
    assert ("parser.set_flag", tensorrt_double.OnnxParserFlag.NATIVE_INSTANCENORM) in calls
    assert ("builder.create_network", 0) in calls  # TensorRT 10: no EXPLICIT_BATCH flag
    # every normalisation layer, and every layer made from a node of a normalisation region, is pinned
    fp32 = onnx.load(str(a.root / "model_fp32.onnx"))
    regions = find_norm_regions(fp32)
    region_nodes = {n for r in regions for n in r.nodes}
    norm_nodes = {n.name for n in fp32.graph.node if n.op_type == "InstanceNormalization"}
    assert len(norm_nodes) == 25 and norm_nodes <= region_nodes
    pinned = {c[1] for c in calls if c[0] == "layer.precision" and c[2] == tensorrt_double.float32}
    typed = {c[1] for c in calls if c[0] == "layer.set_output_type" and c[3] == tensorrt_double.float32}
    assert pinned == region_nodes and typed == region_nodes
    assert not any(c[0] == "layer.precision" and c[2] != tensorrt_double.float32 for c in calls)
    assert set(a.model_entry("tensorrt")["fp32_layers"]) == region_nodes
    # the optimisation profile covers batch 1..sw_batch_size at the roi
    (prof,) = [c[1] for c in calls if c[0] == "config.add_optimization_profile"]
    assert prof == {"input": ((1, 1, *ROI), (2, 1, *ROI), (2, 1, *ROI))}
    # a timing cache was used (empty at first) and written back
    assert ("config.create_timing_cache", 0) in calls and ("config.set_timing_cache", False) in calls
    assert cache.is_file() and cache.stat().st_size > 0


def test_timing_cache_is_reused(art, double, tmp_path):
    a, _, cache = art
    names = a.model_entry("tensorrt")["fp32_layers"]
    before = cache.stat().st_size
    assert before > 0
    info = trt_export.build_plan(a.root / "model_fp32.onnx", tmp_path / "p.plan", max_batch=2, in_channels=1,
                                 roi_size=ROI, fp32_node_names=names, timing_cache=cache)
    sizes = [c[1] for c in double.calls if c[0] == "config.create_timing_cache"]
    assert sizes == [before]  # the cache of the first build was loaded
    assert info["timing_cache"] == str(cache)


def test_plan_builder_refuses_without_tensorrt(art, tmp_path, monkeypatch):
    a, _, _ = art
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    from segrt.errors import ExportError

    with pytest.raises(ExportError, match="TensorRT is not installed"):
        trt_export.build_plan(a.root / "model_fp32.onnx", tmp_path / "x.plan", max_batch=2, in_channels=1,
                              roi_size=ROI)


def test_tensorrt_backend_runs_the_plan(art, double):
    a, _, _ = art
    with select_backend(a, "auto")[0] as b, OrtCpuBackend.from_artifact(a, "fp32", threads=1) as ref:
        assert b.name == "tensorrt" and b.device == "cuda" and b.threads is None
        x = _batch(3)  # 3 > max batch 2: two enqueues
        out = b.infer(x)
        np.testing.assert_allclose(out, ref.infer(x), rtol=0, atol=1e-5)
        t = b.infer_torch(torch.from_numpy(_batch(1, 4)))
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (1, 6, *ROI)
    shapes = [c[2] for c in double.calls if c[0] == "context.set_input_shape"]
    assert shapes[:2] == [(2, 1, *ROI), (1, 1, *ROI)]
    addr = [c for c in double.calls if c[0] == "context.set_tensor_address"]
    assert {c[1] for c in addr} == {"input", "output"}
    assert sum(c[0] == "context.execute_async_v3" for c in double.calls) == 3


@pytest.mark.parametrize("gpu,version,needle", [
    ({"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "10.3.0", "NVIDIA A100"),
    ({"gpu_name": H100["gpu_name"], "compute_capability": "8.9"}, "10.3.0", "compute capability 9.0"),
    (H100, "10.7.0", "TensorRT 10.3.0"),
])
def test_plan_for_another_gpu_or_version_is_refused(art, monkeypatch, gpu, version, needle):
    a, _, _ = art
    _Double(monkeypatch, gpu=gpu, version=version)
    try:
        with pytest.raises(BackendUnavailable, match="plan was built for") as ei:
            select_backend(a, "tensorrt")
        assert needle in str(ei.value) and "rebuild" in str(ei.value)
        # auto says why it passed the plan over, and falls through to the next backend
        b, reason = select_backend(a, "auto")
        with b:
            assert b.name != "tensorrt"
            assert "tensorrt: the artifact's TensorRT plan was built for" in reason
    finally:
        tensorrt_double.uninstall()


def test_gpu_batch_reaches_the_backend_or_is_refused_with_the_reason(art, double):
    a, _, _ = art
    with select_backend(a, "tensorrt", gpu_batch=1)[0] as b:  # within the plan's profile 1..2
        assert b.max_batch == 1
        assert b.infer(_batch(3)).shape == (3, 6, *ROI)
    with pytest.raises(BackendUnavailable, match=r"profile stops at batch 2 .* gpu_batch=4"):
        select_backend(a, "tensorrt", gpu_batch=4)
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(BackendUnavailable, match="gpu_batch must be a positive integer"):
            select_backend(a, "auto", gpu_batch=bad)


def test_fp32_variant_refuses_the_fp16_plan(art, double):
    a, _, _ = art
    with pytest.raises(BackendUnavailable, match="fp16"):
        select_backend(a, "tensorrt", variant="fp32")


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
    assert bk.CPU_ORDER == ("openvino-bf16",)
    assert bk.GPU_ORDER == ("tensorrt", "ort-cuda", "torch-cuda")


def test_plan_layer_names_map_to_onnx_nodes():
    """The ONNX parser names a node's layers NODE, NODE_1, NODE_2, ...: all of them are pinned."""
    names = {"node_Mul_2", "/norm1/Add"}
    assert trt_export._is_pinned_name("node_Mul_2", names)
    assert trt_export._is_pinned_name("node_Mul_2_1", names) and trt_export._is_pinned_name("/norm1/Add_3", names)
    assert not trt_export._is_pinned_name("node_Mul_28", names)
    assert not trt_export._is_pinned_name("node_Mul_2_x", names)
