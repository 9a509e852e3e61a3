"""segrt.export.fp16: normalisation regions stay fp32, the rest is fp16, the variant is gated."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from segrt.artifact import Artifact  # noqa: E402
from segrt.engine.backends import OrtCpuBackend  # noqa: E402
from segrt.errors import GateFailed  # noqa: E402
from segrt.export import fp16 as f16  # noqa: E402
from segrt.export.onnx import export_onnx  # noqa: E402

torch.set_num_threads(1)

SMALL = Path(__file__).resolve().parent / "fixtures" / "bundles" / "wholebody_small"
ROI = (16, 16, 16)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _segresnet():
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=[1, 1, 1],
                     blocks_up=[1, 1]).eval()


def _unet(norm):
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
               num_res_units=1, norm=norm).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


class _ManualNorm(torch.nn.Module):
    """Conv → normalisation written out by hand (exports as the ReduceMean decomposition) → Conv."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.rand(1, 4, 1, 1, 1) + 0.5)
        self.beta = torch.nn.Parameter(torch.rand(1, 4, 1, 1, 1))
        self.c2 = torch.nn.Conv3d(4, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        mu = y.mean(dim=(2, 3, 4), keepdim=True)
        d = y - mu
        var = (d * d).mean(dim=(2, 3, 4), keepdim=True)
        y = d / torch.sqrt(var + 1e-5) * self.gamma + self.beta
        return self.c2(torch.relu(y))


def _export(net, tmp_path, name, exporter, out_ch):
    p = tmp_path / f"{name}_{exporter}.onnx"
    export_onnx(net, p, in_channels=1, roi_size=ROI, num_classes=out_ch, exporter=exporter)
    return onnx.load(str(p))


CASES = [
    ("segresnet", _segresnet, 3, "dynamo", {"InstanceNormalization"}, 5),
    ("segresnet", _segresnet, 3, "torchscript", {"InstanceNormalization"}, 5),
    ("unet_batch", lambda: _unet("batch"), 2, "torchscript", {"BatchNormalization"}, 1),
    ("unet_instance", lambda: _unet("instance"), 2, "dynamo", {"InstanceNormalization"}, 1),
    ("manual_norm", _ManualNorm, 2, "torchscript", {"ReduceMean decomposition"}, None),
]


@pytest.mark.parametrize("name,make,out_ch,exporter,kinds,size", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_norm_regions_fp32_rest_fp16(tmp_path, name, make, out_ch, exporter, kinds, size):
    net = make()
    model = _export(net, tmp_path, name, exporter, out_ch)
    regions = f16.find_norm_regions(model)
    assert regions, f"no normalisation found in {name}"
    assert {r.kind for r in regions} == kinds
    by_name = {n.name: n for n in model.graph.node}
    for r in regions:
        ops = [by_name[n].op_type for n in r.nodes]
        if size is not None:
            assert len(r.nodes) == size, ops
        if name == "segresnet":  # GroupNorm as the exporters emit it
            assert ops == ["Reshape", "InstanceNormalization", "Reshape", "Mul", "Add"]
        if name == "manual_norm":  # mean, centring, variance, eps, root, division and the affine
            assert {"ReduceMean", "Sub", "Sqrt", "Div"} <= set(ops) and ops.count("ReduceMean") == 2
            assert ops[-2:] == ["Mul", "Add"]
    names = [n for r in regions for n in r.nodes]

    half = f16.convert_fp16(model)
    check = f16.check_precision(half, names)
    assert check["passed"], check
    assert check["fp16_nodes"] > 0 and not check["fp32_violations"] and not check["fp32_other"]
    # the weights of the fp16 part are stored as fp16, the norms' parameters as fp32
    dtypes = {i.data_type for i in half.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    # graph IO stays float32
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    # without the block list the same check fails on every normalisation node
    plain = f16.convert_fp16(model, keep_norms_fp32=False)
    bad = f16.check_precision(plain, names)
    assert not bad["passed"] and len(bad["fp32_violations"]) == len(names)

    # and the fp16 model runs (ORT CPU) close to the fp32 one
    x = np.random.default_rng(0).standard_normal((2, 1, *ROI), dtype=np.float32)
    s32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    a = s32.run(None, {"input": x})[0]
    b = s16.run(None, {"input": x})[0]
    assert b.dtype == np.float32 and b.shape == a.shape
    assert np.abs(a - b).max() <= f16.FP16_MAX_ABS_REL * max(1.0, np.abs(a).max())


def test_ct_like_patches_follow_the_spec():
    from segrt.export import spec_from_bundle

    spec = spec_from_bundle(SMALL, {"inferer#roi_size": [24, 24, 24]})
    (batch,) = f16.ct_like_patches(spec, 1, 2, seed=3)
    assert batch.shape == (2, 1, 24, 24, 24) and batch.dtype == np.float32
    # NormalizeIntensity(nonzero) then ScaleIntensity(-1, 1) on the whole phantom: inside [-1, 1],
    # and the crops hold both air/fat (low) and tissue/bone (high) values
    assert batch.min() >= -1.0 - 1e-6 and batch.max() <= 1.0 + 1e-6
    assert batch.std() > 0.05


@pytest.fixture(scope="module")
def fp16_artifact(exported):
    return exported(SMALL, random_init=True, overrides={"inferer#roi_size": [32, 32, 32]}, variants=("fp32", "fp16"),
                    gate_samples=1)


def test_export_fp16_variant(fp16_artifact):
    art = Artifact.load(fp16_artifact)  # verifies both hashes
    assert art.variants == ["fp32", "fp16"]
    m = art.manifest
    e = m["models"]["fp16"]
    assert e["path"] == "model_fp16.onnx" and e["precision"] == "fp16" and e["format"] == "onnx"
    # one region per GroupNorm of the network, five nodes each
    from segrt.export.bundle import load_bundle

    net = load_bundle(SMALL, {"inferer#roi_size": [32, 32, 32]}, random_init=True).network
    n_gn = sum(isinstance(mod, torch.nn.GroupNorm) for mod in net.modules())
    assert n_gn == 25
    assert e["norm_regions"] == {"InstanceNormalization": n_gn}
    assert len(e["fp32_nodes"]) == 5 * n_gn
    g = m["gate"]["fp16"]
    assert g["passed"] and set(g) >= {"random", "ct_like"}
    for key in ("random", "ct_like"):
        assert g[key]["max_abs_logit_diff"] <= g[key]["tolerance_max_abs"]
        assert g[key]["argmax_agreement"] >= f16.FP16_MIN_ARGMAX_AGREEMENT
    # the saved file passes the precision check against the fp32 model's regions
    fp32 = onnx.load(str(fp16_artifact / "model_fp32.onnx"))
    names = [n for r in f16.find_norm_regions(fp32) for n in r.nodes]
    assert f16.check_precision(onnx.load(str(fp16_artifact / "model_fp16.onnx")), names)["passed"]
    # the fp16 variant runs on the ORT CPU backend, close to fp32
    x = np.random.default_rng(5).standard_normal((2, 1, 32, 32, 32), dtype=np.float32)
    with OrtCpuBackend.from_artifact(art, "fp32", threads=1) as b32, \
            OrtCpuBackend.from_artifact(art, "fp16", threads=1) as b16:
        a, b = b32.infer(x), b16.infer(x)
    assert np.abs(a - b).max() <= f16.FP16_MAX_ABS_REL * max(1.0, np.abs(a).max())
    # default exports are unchanged: fp32 only
    assert json.loads((fp16_artifact / "manifest.json").read_text())["models"].keys() == {"fp32", "fp16"}


def test_fp16_gate_fails_against_another_network(fp16_artifact):
    art = Artifact.load(fp16_artifact)
    from segrt.export.bundle import load_bundle

    other = load_bundle(SMALL, {"inferer#roi_size": [32, 32, 32]}, random_init=True, seed=123).network
    with pytest.raises(GateFailed) as ei:
        f16.gate_fp16(other, fp16_artifact / "model_fp16.onnx", art.spec, samples=1, ct_like=False)
    assert not ei.value.report["passed"]
