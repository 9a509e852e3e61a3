"""The int8 CPU variant (static QDQ quantization run by OpenVINO) and the calibration windows from the user's own
scans, on a small network trained here on synthetic data (random weights have near-tied logits that no reduced
precision reproduces; a trained network has confident ones, as real models do)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("openvino")
nib = pytest.importorskip("nibabel")

import segrt  # noqa: E402
from segrt.artifact import Artifact  # noqa: E402
from segrt.engine.backends import cpu_variants_by_speed, select_backend  # noqa: E402
from segrt.errors import ExportError  # noqa: E402
from segrt.export import export  # noqa: E402
from segrt.export.calibration import calibration_patches, calibration_scans  # noqa: E402
from segrt.spec import Spec  # noqa: E402

ROI = 16
K = 3


def _field(shape, rng):
    """A smooth random field in [-2, 2]-ish: low-resolution noise, upsampled and box-blurred."""
    low = rng.standard_normal(tuple(s // 4 + 2 for s in shape)).astype(np.float32)
    up = low.repeat(4, 0).repeat(4, 1).repeat(4, 2)[:shape[0], :shape[1], :shape[2]]
    t = torch.from_numpy(up)[None, None]
    return torch.nn.functional.avg_pool3d(t, 3, 1, 1, count_include_pad=False)[0, 0].numpy() * 1.5


def _truth(x):
    return (x > -0.4).astype(np.int64) + (x > 0.6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class conv net trained for a few seconds to threshold a smooth field, and a folder of 'scans'."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.InstanceNorm3d(8, affine=True),
                              torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, K, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    with torch.set_grad_enabled(True):
        for step in range(150):
            x = np.stack([_field((ROI,) * 3, rng) for _ in range(4)])[:, None]
            y = _truth(x[:, 0])
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    root = tmp_path_factory.mktemp("int8")
    scans = root / "scans"
    scans.mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(_field((40, 36, 32), rng), np.diag([1.0, 1.0, 1.5, 1.0])), scans / f"s{i}.nii.gz")
    spec = {"in_channels": 1, "num_classes": K, "class_names": {"0": "low", "1": "mid", "2": "high"},
            "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
            "inference": {"roi_size": [ROI] * 3, "sw_batch_size": 2, "overlap": 0.25,
                          "blend_mode": "constant", "padding_mode": "constant"},
            "postprocessing": {"softmax": True, "order": "argmax_then_invert", "invert_interp": "nearest"}}
    return net, spec, scans, float(loss.detach())


def test_calibration_windows_come_from_the_scans_after_preprocessing(trained, tmp_path):
    _, spec, scans, _ = trained
    assert [p.name for p in calibration_scans(scans)] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    batches = calibration_patches(Spec.from_dict(spec), scans, samples=3, batch=2, seed=1)
    assert len(batches) == 3 and all(b.shape == (2, 1, ROI, ROI, ROI) and b.dtype == np.float32 for b in batches)
    assert all(float(b.std()) > 0.1 for b in batches)  # real content, not padding
    with pytest.raises(ExportError, match="does not exist"):
        calibration_scans(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no scans"):
        calibration_scans(tmp_path / "empty")


def test_int8_variant_is_quantized_gated_on_the_scans_and_picked_when_fastest(trained, tmp_path):
    net, spec, scans, loss = trained
    assert loss < 0.3, f"the test network did not train (loss {loss:.3f})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = export(net, tmp_path / "art", spec=spec, cpu_variants=("openvino-int8",), calibration=scans)
    a = Artifact.load(art)
    entry, gate = a.manifest["models"]["openvino-int8"], a.manifest["gate"]["openvino-int8"]
    assert entry["path"] == "model_int8.onnx" and (art / "model_int8.onnx").is_file()
    assert entry["quantize_linear_nodes"] > 0 and entry["calibrated_on"] == "the user's scans"
    import onnx

    q = onnx.load(str(art / "model_int8.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "InstanceNormalization"} <= ops  # the norm stays float
    assert q.graph.node[-1].op_type == "Conv"  # the head is not followed by a QDQ pair
    assert "calibration" in gate and gate["calibration"]["voxels"] > 0
    assert gate["seconds_per_window"] > 0 and gate["fp32_seconds_per_window"] > 0
    pcd = gate["calibration"]["per_class_dice"]
    assert gate["passed"] == all(pcd["dice"][str(k)] >= 0.98 for k in pcd["gated"])
    assert gate["passed"], gate["reason"]  # a trained net quantizes within the gate
    # the runtime takes it (it is the only reduced variant) and its labels agree with fp32
    backend, reason = select_backend(a, device="cpu")
    assert backend.name == "openvino-int8", reason
    backend.close()
    vol = _field((40, 36, 32), np.random.default_rng(5))
    with segrt.Engine.load(art, device="cpu") as eng:
        fast = eng.segment(vol, np.eye(4), progress=False)
    with segrt.Engine.load(art, device="cpu", variant="fp32") as eng:
        exact = eng.segment(vol, np.eye(4), progress=False)
    assert fast.metadata["backend"] == "openvino-int8" and exact.metadata["backend"] == "ort-cpu"
    assert (fast.labels == exact.labels).mean() > 0.99
    assert (exact.labels == _truth(vol)).mean() > 0.8  # the trained net does its job (chance: ~0.4)


def test_runtime_orders_variants_by_the_gate_timing(trained, tmp_path):
    net, spec, _, _ = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = export(net, tmp_path / "art", spec=spec)
    m = json.loads((art / "manifest.json").read_text())
    fp32 = m["models"]["fp32"]
    for v, t in (("openvino-int8", 0.5), ("openvino-bf16", 0.1)):
        m["models"][v] = {**fp32, "runtime": "openvino"}
        m["gate"][v] = {"passed": True, "seconds_per_window": t}
    (art / "manifest.json").write_text(json.dumps(m))
    assert cpu_variants_by_speed(Artifact.load(art)) == ["openvino-bf16", "openvino-int8"]
    # int8 only somewhat faster than bf16: bf16 (closer to fp32) first; clearly faster (>= 1.5x): int8 first
    for t8, want in ((0.075, ["openvino-bf16", "openvino-int8"]), (0.06, ["openvino-int8", "openvino-bf16"])):
        m["gate"]["openvino-int8"]["seconds_per_window"] = t8
        (art / "manifest.json").write_text(json.dumps(m))
        assert cpu_variants_by_speed(Artifact.load(art)) == want
    del m["gate"]["openvino-bf16"]["seconds_per_window"]
    (art / "manifest.json").write_text(json.dumps(m))
    assert cpu_variants_by_speed(Artifact.load(art)) == ["openvino-int8", "openvino-bf16"]


def test_int8_of_a_multichannel_net_needs_calibration(tmp_path):
    net = torch.nn.Conv3d(2, K, 1).eval()
    spec = {"in_channels": 2, "num_classes": K, "preprocessing": {"orientation": None, "spacing": None,
                                                                  "intensity": []},
            "inference": {"roi_size": [ROI] * 3, "sw_batch_size": 1, "overlap": 0.25}}
    with pytest.raises(ExportError, match="int8 needs calibration windows.*--calibration"):
        export(net, tmp_path / "art", spec=spec, cpu_variants=("openvino-int8",))
    assert not (tmp_path / "art").exists()


class _FixedSize(torch.nn.Module):
    """Bakes its window size into a reshape: cannot run on half-size crops."""

    def __init__(self, roi):
        super().__init__()
        self.roi = roi
        self.conv = torch.nn.Conv3d(1, K, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.softmax(y.reshape(-1, K, self.roi ** 3), 1).reshape(-1, K, self.roi, self.roi, self.roi)


@pytest.mark.parametrize("fixed_size", [False, True])
def test_int8_calibrates_on_half_size_crops_when_the_network_takes_them(trained, tmp_path, fixed_size):
    from segrt.export.int8 import quantize_int8
    from segrt.export.onnx import export_onnx
    import onnx

    net = _FixedSize(32).eval() if fixed_size else trained[0]
    export_onnx(net, tmp_path / "m.onnx", in_channels=1, roi_size=(32, 32, 32), num_classes=K)
    rng = np.random.default_rng(3)
    batches = [np.stack([_field((32, 32, 32), rng)])[:, None] for _ in range(2)]
    info = quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", batches)
    if fixed_size:
        assert info["calibrated_on"] == "full windows" and info["calibration_windows"] == 2
    else:
        assert "half-size crops" in info["calibrated_on"] and info["calibration_windows"] == 16
    q = onnx.load(str(tmp_path / "q.onnx"))
    dims = [d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim[2:]]
    assert dims == [32, 32, 32]  # the window size is fixed again
    import onnxruntime as ort

    x = batches[0].astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert got.shape == ref.shape and (got.argmax(1) == ref.argmax(1)).mean() > 0.95
