"""State-dict sources (a ``.pt`` plus ``"network": {"class": "module:Class", ...}`` in the spec, as nnU-Net / HD-BET
users hold their models) and in-memory ``nn.Module`` sources, exported and compared with torch."""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import segrt  # noqa: E402
from segrt.artifact import Artifact  # noqa: E402
from segrt.errors import ExportError, SpecError  # noqa: E402
from segrt.export import export  # noqa: E402

torch.set_num_threads(1)
ROI = 16
K = 3

NET_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyUNet(nn.Module):
        """nnU-Net-like: conv / instance norm / leaky ReLU, one down and one up level, deep supervision."""

        def __init__(self, in_channels=1, num_classes=3, features=4, deep_supervision=True):
            super().__init__()
            f = features
            self.enc = nn.Sequential(nn.Conv3d(in_channels, f, 3, padding=1), nn.InstanceNorm3d(f, affine=True),
                                     nn.LeakyReLU(0.01))
            self.down = nn.Sequential(nn.Conv3d(f, 2 * f, 3, stride=2, padding=1),
                                      nn.InstanceNorm3d(2 * f, affine=True), nn.LeakyReLU(0.01))
            self.up = nn.ConvTranspose3d(2 * f, f, 2, stride=2)
            self.dec = nn.Sequential(nn.Conv3d(2 * f, f, 3, padding=1), nn.InstanceNorm3d(f, affine=True),
                                     nn.LeakyReLU(0.01))
            self.seg = nn.Conv3d(f, num_classes, 1)
            self.seg_low = nn.Conv3d(2 * f, num_classes, 1)
            self.deep_supervision = deep_supervision

        def forward(self, x):
            e = self.enc(x)
            d = self.down(e)
            y = self.seg(self.dec(torch.cat([e, self.up(d)], 1)))
            return (y, self.seg_low(d)) if self.deep_supervision else y
''')


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture()
def code_dir(tmp_path):
    d = tmp_path / "code"
    d.mkdir()
    (d / "tiny_models_sd.py").write_text(NET_CODE)
    return d


def _net(code_dir, **kwargs):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_models_sd_ref", code_dir / "tiny_models_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(50)
    net = mod.TinyUNet(**kwargs).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def _spec(tmp_path, network=None, name="spec.json"):
    spec = {
        "in_channels": 1, "num_classes": K, "class_names": {str(i): f"c{i}" for i in range(K)},
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"roi_size": [ROI] * 3, "sw_batch_size": 2, "overlap": 0.5,
                      "blend_mode": "constant", "padding_mode": "constant"},
        "postprocessing": {"softmax": True, "order": "argmax_then_invert", "invert_interp": "nearest"},
    }
    if network is not None:
        spec["network"] = network
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


def _max_diff(onnx_path, fn, batch=2, seed=0):
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((batch, 1, ROI, ROI, ROI), dtype=np.float32)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = fn(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max())


NETWORK = {"class": "tiny_models_sd:TinyUNet", "kwargs": {"features": 4}, "python_path": ["code"]}


def test_state_dict_with_class_path_exports_and_matches_torch(tmp_path, code_dir):
    net = _net(code_dir, features=4)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    art = export(tmp_path / "weights.pt", tmp_path / "art", spec=_spec(tmp_path, NETWORK))
    m = Artifact.load(art).manifest
    assert m["source"]["kind"] == "state_dict"
    assert m["source"]["network"]["class"] == "tiny_models_sd:TinyUNet"
    assert m["source"]["network"]["missing_keys"] == 0
    assert "network" not in m["spec"]  # the runtime never sees the class path
    entry = m["models"]["fp32"]
    assert entry["output_index"] == 0 and entry["input_shape"][0] == "batch"  # the full-resolution head
    for batch in (1, 3):
        assert _max_diff(art / entry["path"], lambda x: net(x)[0], batch=batch) < 1e-4
    with segrt.Engine.load(art, device="cpu") as eng:
        seg = eng.segment(np.random.default_rng(1).standard_normal((20, 18, 16)).astype(np.float32), np.eye(4),
                          progress=False)
    assert seg.labels.shape == (20, 18, 16)


def test_nnunet_style_checkpoint_entry_and_prefix(tmp_path, code_dir):
    net = _net(code_dir, features=4)
    ckpt = {"network_weights": {f"module.{k}": v for k, v in net.state_dict().items()},
            "init_args": {"plans": "3d_fullres", "fold": 0}, "trainer_name": "nnUNetTrainer", "current_epoch": 999}
    torch.save(ckpt, tmp_path / "checkpoint_final.pth")
    with pytest.raises(ExportError, match=r"strip_prefix' to 'module\.'"):
        export(tmp_path / "checkpoint_final.pth", tmp_path / "art", spec=_spec(tmp_path, NETWORK))
    assert not (tmp_path / "art").exists()
    art = export(tmp_path / "checkpoint_final.pth", tmp_path / "art",
                 spec=_spec(tmp_path, {**NETWORK, "strip_prefix": "module."}))
    info = Artifact.load(art).manifest["source"]["network"]
    assert info["state_dict_key"] == "network_weights" and info["strip_prefix"] == "module."
    assert _max_diff(art / "model_fp32.onnx", lambda x: net(x)[0]) < 1e-4


@pytest.mark.parametrize("network,needle", [
    ({**NETWORK, "kwargs": {"features": 8}}, r"shape\(s\) differ .*check 'network.kwargs'"),
    ({**NETWORK, "class": "tiny_models_sd:NoSuchNet"}, "has no 'NoSuchNet'"),
    ({"class": "tiny_models_absent:TinyUNet"}, "cannot import 'tiny_models_absent'.*python_path"),
    ({**NETWORK, "state_dict_key": "nope"}, "no entry 'nope'"),
])
def test_state_dict_errors_name_the_problem(tmp_path, code_dir, network, needle):
    torch.save(_net(code_dir).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ExportError, match=needle):
        export(tmp_path / "weights.pt", tmp_path / "art", spec=_spec(tmp_path, network))
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("network,needle", [
    ({**NETWORK, "kwarg": {}}, "unknown key 'kwarg' \\(did you mean 'kwargs'\\?\\)"),
    ({"class": "no colon here"}, "is not 'module:Class'"),
    ({**NETWORK, "strict": "yes"}, "strict' must be true or false"),
])
def test_network_section_is_checked(tmp_path, code_dir, network, needle):
    torch.save(_net(code_dir).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(SpecError, match=needle):
        export(tmp_path / "weights.pt", tmp_path / "art", spec=_spec(tmp_path, network))


def test_pickled_objects_are_not_unpickled(tmp_path, code_dir):
    torch.save(torch.nn.Conv3d(1, K, 1), tmp_path / "whole_model.pt")  # a module object: unpickling runs code
    with pytest.raises(ExportError, match="weights_only=True.*state_dict"):
        export(tmp_path / "whole_model.pt", tmp_path / "art", spec=_spec(tmp_path, NETWORK))


def test_state_dict_without_network_section_says_what_to_add(tmp_path, code_dir):
    torch.save(_net(code_dir).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ExportError, match="needs its network class: add \"network\""):
        export(tmp_path / "weights.pt", tmp_path / "art", spec=_spec(tmp_path))


def test_in_memory_module_source(tmp_path, code_dir):
    net = _net(code_dir, deep_supervision=False)
    art = export(net, tmp_path / "art", spec=_spec(tmp_path))
    m = Artifact.load(art).manifest
    assert m["source"]["kind"] == "module" and m["source"]["name"] == "TinyUNet"
    assert m["models"]["fp32"]["exporter"] == "dynamo"
    assert _max_diff(art / "model_fp32.onnx", net, batch=3) < 1e-4
