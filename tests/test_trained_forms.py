"""The forms trained 3D segmentation networks come in, exported by ``segrt.export`` and compared with torch.

Deep-supervision outputs (a tuple/list of heads, the full-resolution one selected), the usual norms in eval
(InstanceNorm3d with and without running statistics, GroupNorm, BatchNorm3d, Dropout3d) through both ONNX
exporters, and a network that ends in a softmax (exported with ``postprocessing.softmax: false``).
Small seeded nets at roi 16³; ``segrt.export`` takes TorchScript files, so the nets are traced or scripted to
``.ts`` files; the dynamo path is exercised through :func:`segrt.export.onnx.export_onnx` on the nn.Module.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

import segrt  # noqa: E402
from segrt.artifact import Artifact  # noqa: E402
from segrt.errors import ExportError  # noqa: E402
from segrt.export import export  # noqa: E402
from segrt.export.gate import run_gate  # noqa: E402
from segrt.export.onnx import export_onnx  # noqa: E402

torch.set_num_threads(1)

ROI = 16
K = 3


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _spec(softmax=True, sw_batch_size=2):
    return {
        "in_channels": 1, "num_classes": K, "class_names": {str(i): f"c{i}" for i in range(K)},
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"roi_size": [ROI] * 3, "sw_batch_size": sw_batch_size, "overlap": 0.5,
                      "blend_mode": "constant", "padding_mode": "constant"},
        "postprocessing": {"softmax": softmax, "order": "argmax_then_invert", "invert_interp": "nearest"},
    }


def _to_ts(net, path, how):
    net.eval()
    if how == "trace":
        with torch.no_grad():
            ts = torch.jit.trace(net, torch.zeros(1, 1, ROI, ROI, ROI), check_trace=False)
    else:
        ts = torch.jit.script(net)
    ts.save(str(path))
    return path


def _ort_vs_torch(onnx_path, fn, batch=2, seed=0):
    """Max abs difference between the ONNX model (ORT CPU) and ``fn`` (torch) on random patches."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert len(sess.get_outputs()) == 1
    x = np.random.default_rng(seed).standard_normal((batch, 1, ROI, ROI, ROI), dtype=np.float32)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = fn(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


def _segment(art):
    vol = np.random.default_rng(5).standard_normal((20, 18, 16)).astype(np.float32)
    with segrt.Engine.load(art, device="cpu") as eng:
        seg = eng.segment(vol, np.eye(4), progress=False)
    assert seg.labels.shape == vol.shape and seg.labels.max() < K
    return seg


# ---- deep supervision ------------------------------------------------------------------------

class DeepSup(nn.Module):
    """nnU-Net style: the full-resolution head first, then a half-resolution one (a tuple; traced)."""

    def __init__(self, heads=("full", "half")):
        super().__init__()
        self.enc = nn.Conv3d(1, 4, 3, padding=1)
        self.down = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.head_full = nn.Conv3d(4, K, 1)
        self.head_half = nn.Conv3d(4, K, 1)
        self.heads = list(heads)

    def both(self, x):
        h = torch.relu(self.enc(x))
        return self.head_full(h), self.head_half(torch.relu(self.down(h)))

    def forward(self, x):
        full, half = self.both(x)
        return tuple(full if name == "full" else half for name in self.heads)


class DeepSupList(DeepSup):
    """The same heads as a list, with data-dependent control flow (scripted)."""

    def forward(self, x):
        full, half = self.both(x)
        if bool(x.sum() > 1e9):  # never true: keeps an If in the scripted graph
            full = full * 2.0
        return [full, half]


@pytest.mark.parametrize("how,as_list", [("trace", False), ("script", True)])
def test_deep_supervision_takes_the_full_resolution_output(tmp_path, how, as_list):
    torch.manual_seed(1)
    net = (DeepSupList() if as_list else DeepSup()).eval()
    src = _to_ts(net, tmp_path / "ds.ts", how)
    art = export(src, tmp_path / "art", spec=_spec())
    m = Artifact.load(art).manifest
    entry = m["models"]["fp32"]
    assert entry["output_index"] == 0
    assert entry["outputs_seen"] == [[1, K, ROI, ROI, ROI], [1, K, ROI // 2, ROI // 2, ROI // 2]]
    assert entry["output_shape"] == ["batch", K, ROI, ROI, ROI]
    assert m["gate"]["fp32"]["passed"] is True
    assert _ort_vs_torch(art / entry["path"], lambda x: net(x)[0]) < 1e-4
    _segment(art)


def test_deep_supervision_output_not_first(tmp_path):
    torch.manual_seed(2)
    net = DeepSup(heads=("half", "full")).eval()
    art = export(_to_ts(net, tmp_path / "ds.ts", "trace"), tmp_path / "art", spec=_spec())
    entry = Artifact.load(art).manifest["models"]["fp32"]
    assert entry["output_index"] == 1
    assert _ort_vs_torch(art / entry["path"], lambda x: net(x)[1]) < 1e-4


@pytest.mark.parametrize("heads,needle", [(("half", "half"), "none of them"),
                                          (("full", "full"), "2 \\(indices \\[0, 1\\]\\)")])
def test_deep_supervision_ambiguous_or_missing_is_refused(tmp_path, heads, needle):
    torch.manual_seed(3)
    src = _to_ts(DeepSup(heads=heads), tmp_path / "ds.ts", "trace")
    with pytest.raises(ExportError, match=needle) as info:
        export(src, tmp_path / "art", spec=_spec())
    assert "[1, 3, 8, 8, 8]" in str(info.value) or "[1, 3, 16, 16, 16]" in str(info.value)
    assert not (tmp_path / "art").exists()


def test_deep_supervision_nn_module_dynamo(tmp_path):
    """The selection wrapper around an nn.Module goes through the dynamo exporter."""
    from segrt.export import _select_output

    torch.manual_seed(4)
    net = DeepSup().eval()
    wrapped = _select_output(net, 0)
    info = export_onnx(wrapped, tmp_path / "m.onnx", in_channels=1, roi_size=(ROI,) * 3, num_classes=K)
    assert info["exporter"] == "dynamo"
    assert _ort_vs_torch(tmp_path / "m.onnx", lambda x: net(x)[0]) < 1e-4


# ---- norms -----------------------------------------------------------------------------------

def _norm_net(kind):
    norms = {
        "instance_affine": lambda: nn.InstanceNorm3d(4, affine=True),
        "instance_running": lambda: nn.InstanceNorm3d(4, affine=True, track_running_stats=True),
        "group": lambda: nn.GroupNorm(2, 4),
        "batch": lambda: nn.BatchNorm3d(4),
        "dropout": lambda: nn.Dropout3d(0.5),
    }
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), norms[kind](), nn.ReLU(), nn.Conv3d(4, K, 1))
    for mod in net.modules():  # non-trivial affine parameters and running statistics
        if getattr(mod, "weight", None) is not None and not isinstance(mod, nn.Conv3d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
        if getattr(mod, "running_mean", None) is not None:
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return net.eval()


NORMS = ["instance_affine", "instance_running", "group", "batch", "dropout"]


@pytest.mark.parametrize("kind", NORMS)
def test_norms_torchscript_source(tmp_path, kind):
    torch.manual_seed(10 + NORMS.index(kind))
    net = _norm_net(kind)
    how = "script" if kind in ("instance_running", "batch") else "trace"
    art = export(_to_ts(net, tmp_path / "n.ts", how), tmp_path / "art", spec=_spec())
    m = Artifact.load(art).manifest
    entry = m["models"]["fp32"]
    assert entry["exporter"] == "torchscript"
    assert entry["input_shape"][0] == "batch"  # the batch stays dynamic, running-statistics instance norm too
    assert "output_index" not in entry
    assert m["gate"]["fp32"]["passed"] is True
    for batch in (1, 3):
        assert _ort_vs_torch(art / entry["path"], net, batch=batch) < 1e-4
    _segment(art)


@pytest.mark.parametrize("kind", NORMS)
def test_norms_nn_module_dynamo(tmp_path, kind):
    torch.manual_seed(20 + NORMS.index(kind))
    net = _norm_net(kind)
    path = tmp_path / "m.onnx"
    info = export_onnx(net, path, in_channels=1, roi_size=(ROI,) * 3, num_classes=K, exporter="dynamo")
    assert info["exporter"] == "dynamo" and info["input_shape"][0] == "batch"
    report = run_gate(net, path, in_channels=1, roi_size=(ROI,) * 3, num_classes=K)
    assert report["passed"] is True
    assert _ort_vs_torch(path, net, batch=3) < 1e-4


# ---- a softmax inside the network ------------------------------------------------------------

def test_softmax_inside_the_network(tmp_path):
    torch.manual_seed(30)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                        nn.Conv3d(4, K, 1), nn.Softmax(dim=1)).eval()
    art = export(_to_ts(net, tmp_path / "sm.ts", "trace"), tmp_path / "art", spec=_spec(softmax=False))
    m = Artifact.load(art).manifest
    assert m["spec"]["postprocessing"]["softmax"] is False and m["gate"]["fp32"]["passed"] is True
    assert _ort_vs_torch(art / m["models"]["fp32"]["path"], net) < 1e-4
    # one window covers the whole volume (no resampling, no intensity ops): labels == torch argmax
    vol = np.random.default_rng(6).standard_normal((ROI,) * 3).astype(np.float32)
    with segrt.Engine.load(art, device="cpu") as eng:
        seg = eng.segment(vol, np.eye(4), progress=False)
    with torch.no_grad():
        ref = net(torch.from_numpy(vol)[None, None]).argmax(1)[0].numpy()
    assert np.array_equal(seg.labels, ref)


# ---- instance statistics with running buffers (nnU-Net style) and the fixed-batch fallback ----

class InstanceStatsWithBuffers(nn.Module):
    """Norms that keep running buffers but normalise with each instance's own statistics, as a network traced in
    train mode (or a custom nnU-Net-style norm) does: torch's TorchScript symbolic refuses these under a dynamic
    batch ("instance_norm training for unknown batch size")."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
        self.head = nn.Conv3d(4, K, 1)

    def forward(self, x):
        h = torch.nn.functional.instance_norm(self.conv(x), self.norm.running_mean, self.norm.running_var,
                                              self.norm.weight, self.norm.bias, use_input_stats=True)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("how", ["trace_train_mode", "script_custom_norm"])
def test_instance_statistics_with_running_buffers_keep_a_dynamic_batch(tmp_path, how):
    torch.manual_seed(40)
    if how == "trace_train_mode":  # a plain InstanceNorm3d(track_running_stats=True), traced while training
        net = _norm_net("instance_running").train()
        with torch.no_grad():
            ts = torch.jit.trace(net, torch.randn(2, 1, ROI, ROI, ROI), check_trace=False)
        ts.save(str(tmp_path / "n.ts"))
        ref = torch.jit.load(str(tmp_path / "n.ts")).eval()  # the traced graph keeps instance statistics
    else:
        net = InstanceStatsWithBuffers().eval()
        with torch.no_grad():
            net.norm.running_mean.uniform_(-0.5, 0.5)
            net.norm.weight.uniform_(0.5, 1.5)
        _to_ts(net, tmp_path / "n.ts", "script")
        ref = net
    art = export(tmp_path / "n.ts", tmp_path / "art", spec=_spec())
    entry = Artifact.load(art).manifest["models"]["fp32"]
    assert entry["input_shape"][0] == "batch" and "fixed_batch" not in entry
    for batch in (1, 3):  # each sample normalised by its own statistics, whatever the batch
        assert _ort_vs_torch(art / entry["path"], ref, batch=batch) < 1e-4
    _segment(art)


class BatchBakedIn(nn.Module):
    """A network that reshapes with a literal batch size (as some hand-written heads do): no exporter can keep the
    batch dynamic."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch
        self.conv = nn.Conv3d(1, K, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        flat = y.reshape(self.batch, K, ROI * ROI * ROI)  # the batch baked in
        return torch.softmax(flat, dim=1).reshape(self.batch, K, ROI, ROI, ROI)


def test_fixed_batch_fallback_is_recorded_and_the_runtime_pads_the_last_batch(tmp_path):
    torch.manual_seed(41)
    net = BatchBakedIn(2).eval()
    with torch.no_grad():
        ts = torch.jit.trace(net, torch.zeros(2, 1, ROI, ROI, ROI), check_trace=False)
    ts.save(str(tmp_path / "b.ts"))
    art = export(tmp_path / "b.ts", tmp_path / "art", spec=_spec(softmax=False, sw_batch_size=2))
    m = Artifact.load(art).manifest
    entry = m["models"]["fp32"]
    assert entry["fixed_batch"] == 2 and entry["input_shape"][0] == 2
    assert "fixed batch of 2" in entry["exporter_note"]
    assert m["gate"]["fp32"]["passed"] is True
    # 3 windows per axis at roi 16, overlap 0.5 on 32³ → 27 windows: the last batch of 1 is padded
    vol = np.random.default_rng(8).standard_normal((32, 32, 32)).astype(np.float32)
    with segrt.Engine.load(art, device="cpu") as eng:
        assert eng.backend.fixed_batch == 2
        seg = eng.segment(vol, np.eye(4), progress=False)
    assert seg.metadata["windows_run"] % 2 == 1
    with segrt.Engine.load(art, device="cpu") as eng:  # the same windows one at a time through the padding
        single = np.stack([eng.backend.infer(np.random.default_rng(9).standard_normal(
            (1, 1, ROI, ROI, ROI), dtype=np.float32))[0] for _ in range(1)])
    with torch.no_grad():
        x = np.random.default_rng(9).standard_normal((1, 1, ROI, ROI, ROI), dtype=np.float32)
        ref = torch.jit.load(str(tmp_path / "b.ts"))(torch.from_numpy(np.concatenate([x, x])))[:1].numpy()
    assert np.abs(single - ref).max() < 1e-5


def test_fixed_batch_refuses_variants_that_need_a_dynamic_batch(tmp_path):
    net = BatchBakedIn(2).eval()
    with torch.no_grad():
        torch.jit.trace(net, torch.zeros(2, 1, ROI, ROI, ROI), check_trace=False).save(str(tmp_path / "b.ts"))
    with pytest.raises(ExportError, match="fixed batch of 2.*fp16 need a dynamic batch"):
        export(tmp_path / "b.ts", tmp_path / "art", spec=_spec(softmax=False), variants=("fp32", "fp16"))
    assert not (tmp_path / "art").exists()
