"""segrt.export: spec derivation from MONAI bundles, ONNX export, accuracy gate, artifact writing."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from segrt.artifact import Artifact  # noqa: E402
from segrt.errors import ArtifactError, ExportError, GateFailed, SpecError, UnsupportedTransform  # noqa: E402
from segrt.export import export, spec_from_bundle  # noqa: E402
from segrt.export import gate as gate_mod  # noqa: E402
from segrt.export.bundle import gaussian_profiles, load_bundle  # noqa: E402

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BUNDLES = SHARED / "bundles"
WHOLEBODY = BUNDLES / "wholeBody_ct_segmentation"
SPLEEN = BUNDLES / "spleen_ct_segmentation"
UNEST = BUNDLES / "wholeBrainSeg_Large_UNEST_segmentation"
SMALL = Path(__file__).resolve().parent / "fixtures" / "bundles" / "wholebody_small"

needs_shared = pytest.mark.skipif(not BUNDLES.is_dir(), reason="../shared/bundles is absent")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _copy_bundle(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src / "configs", dst / "configs")
    if edit is not None:
        cfg = json.loads((dst / "configs" / "inference.json").read_text())
        edit(cfg)
        (dst / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    return dst


# ---------------------------------------------------------------------------------------------
# spec derivation
# ---------------------------------------------------------------------------------------------

@needs_shared
def test_spec_wholebody_highres():
    s = spec_from_bundle(WHOLEBODY)
    pre, inf, post = s.preprocessing, s.inference, s.postprocessing
    assert (s.in_channels, s.num_classes) == (1, 105)
    assert pre.orientation == "RAS"
    assert pre.spacing.pixdim == (1.5, 1.5, 1.5) and pre.spacing.mode == "bilinear"
    assert [op.op for op in pre.intensity] == ["normalize_intensity", "scale_intensity"]
    assert pre.intensity[0].params["nonzero"] is True and pre.intensity[0].params["channel_wise"] is False
    assert (pre.intensity[1].params["minv"], pre.intensity[1].params["maxv"]) == (-1.0, 1.0)
    assert inf.roi_size == (96, 96, 96) and inf.sw_batch_size == 1
    assert inf.overlap == (0.25, 0.25, 0.25)
    assert inf.blend_mode == "gaussian" and inf.padding_mode == "replicate"
    assert inf.sigma_scale == (0.125,) * 3 and inf.cval == 0.0
    assert post.softmax and post.order == "argmax_then_invert" and post.invert_interp == "nearest"
    assert len(s.class_names) == 105 and s.class_names[0] == "background" and s.class_names[1] == "spleen"
    assert s.class_names[104] == json.loads((WHOLEBODY / "configs/metadata.json").read_text())[
        "network_data_format"]["outputs"]["pred"]["channel_def"]["104"]
    # the JSON form round-trips
    assert type(s).from_dict(json.loads(json.dumps(s.to_dict()))) == s


@needs_shared
def test_gaussian_profiles_reproduce_monai_importance_map():
    from monai.data.utils import compute_importance_map

    s = spec_from_bundle(WHOLEBODY)
    prof = [np.asarray(p, dtype=np.float32) for p in s.inference.importance_profiles]
    assert [len(p) for p in prof] == [96, 96, 96]
    m = (prof[0][:, None, None] * prof[1][None, :, None]) * prof[2][None, None, :]
    m = np.maximum(m, max(float(m.min()), 1e-3)).astype(np.float32)
    ref = compute_importance_map((96, 96, 96), mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_array_equal(m, ref)
    # an odd, anisotropic roi too
    p2 = gaussian_profiles((7, 10, 33), (0.125, 0.2, 0.3))
    m2 = np.asarray(p2[0], np.float32)[:, None, None] * np.asarray(p2[1], np.float32)[None, :, None]
    m2 = m2 * np.asarray(p2[2], np.float32)[None, None, :]
    m2 = np.maximum(m2, max(float(m2.min()), 1e-3)).astype(np.float32)
    ref2 = compute_importance_map((7, 10, 33), mode="gaussian", sigma_scale=(0.125, 0.2, 0.3)).numpy()
    np.testing.assert_array_equal(m2, ref2)


@needs_shared
def test_spec_wholebody_lowres_override_and_missing_weights():
    over = {"displayable_configs#highres": False}
    s = spec_from_bundle(WHOLEBODY, over)
    assert s.preprocessing.spacing.pixdim == (3.0, 3.0, 3.0)
    assert s.num_classes == 105
    # no weights here: the error names the low-res checkpoint that the override selects
    with pytest.raises(ExportError, match="model_lowres.pt"):
        load_bundle(WHOLEBODY, over)
    with pytest.raises(ExportError, match=r"models/model\.pt.*random"):
        load_bundle(WHOLEBODY)


@needs_shared
def test_spec_spleen():
    s = spec_from_bundle(SPLEEN)
    assert (s.in_channels, s.num_classes) == (1, 2)
    assert s.preprocessing.spacing.pixdim == (1.5, 1.5, 2.0)
    (op,) = s.preprocessing.intensity
    assert op.op == "scale_intensity_range"
    assert (op.params["a_min"], op.params["a_max"], op.params["b_min"], op.params["b_max"]) == (-57, 164, 0, 1)
    assert op.params["clip"] is True
    assert s.inference.sw_batch_size == 4 and s.inference.overlap == (0.5, 0.5, 0.5)
    assert s.inference.blend_mode == "constant" and s.inference.padding_mode == "constant"
    assert s.inference.importance_profiles is None
    assert s.postprocessing.order == "invert_then_argmax" and s.postprocessing.invert_interp == "bilinear"
    assert s.class_names == {0: "background", 1: "spleen"}


@needs_shared
def test_unest_spec_and_missing_scripts():
    s = spec_from_bundle(UNEST)
    assert s.num_classes == 133 and s.preprocessing.orientation is None and s.preprocessing.spacing is None
    (op,) = s.preprocessing.intensity
    # the config strings "True" are used for their truthiness, as MONAI does
    assert op.params["nonzero"] is True and op.params["channel_wise"] is True
    assert s.inference.overlap == (0.7, 0.7, 0.7)
    with pytest.raises(ExportError, match="scripts"):
        load_bundle(UNEST, random_init=True)
    with pytest.raises(ExportError, match="scripts"):  # reported before its missing weights
        load_bundle(UNEST)


def test_string_flags_use_truthiness(tmp_path):
    def edit(cfg):
        cfg["preprocessing"]["transforms"][5]["nonzero"] = "False"
        cfg["preprocessing"]["transforms"][5]["channel_wise"] = ""

    b = _copy_bundle(SMALL, tmp_path / "b", edit)
    p = spec_from_bundle(b).preprocessing.intensity[0].params
    assert p["nonzero"] is True  # bool("False")
    assert p["channel_wise"] is False  # bool("")


def _insert(i, tr):
    return lambda cfg: cfg["preprocessing"]["transforms"].insert(i, tr)


def _set(i, **kw):
    return lambda cfg: cfg["preprocessing"]["transforms"][i].update(kw)


@pytest.mark.parametrize("edit, needle", [
    (_insert(5, {"_target_": "CropForegroundd", "keys": "@image_key", "source_key": "@image_key"}),
     "CropForegroundd"),
    (_set(4, diagonal=True), "diagonal"),
    (_set(4, keys=["image", "label"], mode=["bilinear", "nearest"]), "mode per key"),
    (_set(4, mode="bicubic"), "bicubic"),
    (_set(4, padding_mode="zeros"), "padding_mode"),
    (_set(6, dtype="$numpy.float16"), "dtype"),
    (lambda cfg: cfg["postprocessing"]["transforms"].insert(2, {"_target_": "KeepLargestConnectedComponentd",
                                                                "keys": "pred"}),
     "KeepLargestConnectedComponentd"),
    (lambda cfg: cfg.update(inferer={"_target_": "SimpleInferer"}), "SimpleInferer"),
    (lambda cfg: cfg["inferer"].update(padding_mode="reflect"), "reflect"),
    (lambda cfg: cfg["inferer"].update(buffer_steps=2), "buffer_steps"),
    (lambda cfg: cfg["postprocessing"]["transforms"][0].update(sigmoid=True), "sigmoid"),
    (lambda cfg: cfg["postprocessing"]["transforms"][1].update(to_onehot=6), "to_onehot"),
    (lambda cfg: cfg["postprocessing"]["transforms"].pop(1), "argmax"),
    (lambda cfg: cfg["postprocessing"]["transforms"].pop(2), "Invertd"),
])
def test_unsupported_transforms_are_named(tmp_path, edit, needle):
    b = _copy_bundle(SMALL, tmp_path / "b", edit)
    with pytest.raises(UnsupportedTransform, match=needle):
        spec_from_bundle(b)


def test_postprocessing_variants(tmp_path):
    def edit(cfg):
        post = cfg["postprocessing"]["transforms"]
        post[1]["dim"] = 0  # AsDiscrete kwargs with their default values are accepted
        post[1], post[2] = post[2], post[1]  # Invertd before AsDiscreted
        post[1]["nearest_interp"] = False
        cfg["preprocessing"]["transforms"][4]["mode"] = "nearest"
        post[0]["softmax"] = False

    s = spec_from_bundle(_copy_bundle(SMALL, tmp_path / "b", edit))
    assert s.preprocessing.spacing.mode == "nearest"
    # Invertd(nearest_interp=False) replays the recorded Spacingd mode, here nearest
    assert s.postprocessing.order == "invert_then_argmax" and s.postprocessing.invert_interp == "nearest"
    assert s.postprocessing.softmax is False


def test_disabled_transform_is_skipped(tmp_path):
    b = _copy_bundle(SMALL, tmp_path / "b", _insert(5, {"_target_": "CropForegroundd", "_disabled_": True,
                                                       "keys": "@image_key", "source_key": "@image_key"}))
    assert [op.op for op in spec_from_bundle(b).preprocessing.intensity] == [
        "normalize_intensity", "scale_intensity"]


def test_bad_sources(tmp_path):
    import segrt

    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    # segrt.export stays callable although the subpackage segrt.export is imported
    with pytest.raises(ExportError, match="does not exist"):
        segrt.export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="inference.json"):
        export(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "m.ts").write_bytes(b"not a module")
    with pytest.raises(ExportError, match="spec"):
        export(tmp_path / "m.ts", tmp_path / "out")
    with pytest.raises(ExportError, match="TorchScript"):
        export(tmp_path / "m.ts", tmp_path / "out", spec=_small_spec_dict())
    with pytest.raises(ExportError, match="missing"):
        export(SMALL, tmp_path / "out")  # no weights, no random_init
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# end-to-end exports
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spleen_artifact(tmp_path_factory):
    if not SPLEEN.is_dir():
        pytest.skip("../shared/bundles is absent")
    out = tmp_path_factory.mktemp("spleen") / "art"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        export(SPLEEN, out, random_init=True, gate_samples=1)
    return out


def test_spleen_random_init_export(spleen_artifact):
    art = Artifact.load(spleen_artifact)
    m = art.manifest
    assert art.random_weights and m["weights"]["random_init"] is True
    assert m["source"]["kind"] == "bundle" and m["source"]["bundle_version"] == "0.5.9"
    assert m["versions"]["opset"] >= 17 and m["versions"]["torch"] and m["versions"]["monai"]
    fp32 = m["models"]["fp32"]
    assert fp32["input_name"] == "input" and fp32["output_name"] == "output"
    assert fp32["input_shape"] == ["batch", 1, 96, 96, 96]
    assert fp32["output_shape"] == ["batch", 2, 96, 96, 96]
    assert fp32["exporter"] in ("dynamo", "torchscript")
    g = m["gate"]["fp32"]
    assert g["passed"] is True and g["max_abs_logit_diff"] <= g["tolerance_max_abs"]
    assert g["argmax_agreement"] >= 0.999
    assert art.spec == spec_from_bundle(SPLEEN)


def test_tampered_artifact_is_rejected(spleen_artifact, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(spleen_artifact, copy)
    model = copy / "model_fp32.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash"):
        Artifact.load(copy)


def test_small_wholebody_real_weights_lowres(tmp_path):
    """The reduced wholeBody fixture with weights on disk: the highres=false override picks model_lowres.pt."""
    from monai.networks.nets import SegResNet

    b = _copy_bundle(SMALL, tmp_path / "bundle")
    torch.manual_seed(7)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=6, init_filters=8,
                    blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], dropout_prob=0.2)
    (b / "models").mkdir()
    torch.save({"model": net.state_dict()}, b / "models" / "model_lowres.pt")
    out = tmp_path / "art"
    # a 32³ roi instead of the bundle's 96³: the same weight selection, a 27x cheaper gate and check below
    overrides = {"displayable_configs#highres": False, "inferer#roi_size": [32, 32, 32]}
    export(b, out, overrides=overrides, gate_samples=1)
    art = Artifact.load(out)
    m = art.manifest
    assert m["weights"]["random_init"] is False and m["weights"]["path"] == "models/model_lowres.pt"
    assert len(m["weights"]["sha256"]) == 64
    assert m["source"]["overrides"] == overrides
    assert art.spec.num_classes == 6 and art.spec.class_names[5] == "liver"
    assert art.spec.preprocessing.spacing.pixdim == (3.0, 3.0, 3.0)
    assert m["models"]["fp32"]["output_shape"] == ["batch", 6, 32, 32, 32]
    assert m["gate"]["fp32"]["passed"] is True
    # the ONNX holds *these* weights: compare with the saved network directly
    import onnxruntime as ort

    net.eval()
    x = np.random.default_rng(3).standard_normal((1, 1, 32, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(art.model_path()), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    # weights that do not fit the network are refused
    torch.save({"model": {"bogus": torch.zeros(1)}}, b / "models" / "model_lowres.pt")
    with pytest.raises(ExportError, match="do not fit"):
        load_bundle(b, {"displayable_configs#highres": False})


# ---- TorchScript / ONNX sources --------------------------------------------------------------

ROI = 32


def _small_spec_dict(num_classes=3, roi=ROI):
    return {
        "in_channels": 1, "num_classes": num_classes,
        "class_names": {str(i): f"c{i}" for i in range(num_classes)},
        "preprocessing": {"orientation": "RAS", "spacing": {"pixdim": [2.0, 2.0, 2.0]},
                          "intensity": [{"op": "shift_intensity", "offset": 1.0}]},
        "inference": {"roi_size": [roi] * 3, "sw_batch_size": 2, "overlap": 0.5, "blend_mode": "gaussian",
                      "padding_mode": "constant"},
        "postprocessing": {"softmax": True, "order": "argmax_then_invert", "invert_interp": "nearest"},
    }


@pytest.fixture(scope="module")
def small_ts(tmp_path_factory):
    from monai.networks.nets import UNet

    torch.manual_seed(11)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
               num_res_units=1, norm="batch").eval()
    # give BatchNorm non-trivial running statistics
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ts") / "small.ts"
    torch.jit.script(net).save(str(path))
    return path


@pytest.fixture(scope="module")
def small_ts_artifact(small_ts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tsart") / "art"
    export(small_ts, out, spec=_small_spec_dict(), gate_samples=2)
    return out


def test_torchscript_source(small_ts_artifact, small_ts):
    art = Artifact.load(small_ts_artifact)
    m = art.manifest
    assert m["source"]["kind"] == "torchscript"
    assert m["weights"]["random_init"] is False
    assert m["models"]["fp32"]["exporter"] == "torchscript"  # torch.export cannot trace a ScriptModule
    assert m["models"]["fp32"]["input_shape"] == ["batch", 1, ROI, ROI, ROI]
    assert m["gate"]["fp32"]["passed"] is True and m["gate"]["fp32"]["samples"] == 2
    # a gaussian spec without profiles gets torch-computed ones
    assert art.spec.inference.importance_profiles == gaussian_profiles((ROI,) * 3, (0.125,) * 3)
    # the spec must match the network
    with pytest.raises(ExportError, match="num_classes=5"):
        export(small_ts, small_ts_artifact.parent / "bad", spec=_small_spec_dict(num_classes=5))


def test_onnx_source(small_ts_artifact, tmp_path):
    src = Artifact.load(small_ts_artifact).model_path()
    out = tmp_path / "art"
    export(src, out, spec=_small_spec_dict())
    art = Artifact.load(out)
    m = art.manifest
    assert m["source"]["kind"] == "onnx"
    assert m["models"]["fp32"]["exporter"] == "copied"
    assert m["models"]["fp32"]["sha256"] == Artifact.load(small_ts_artifact).manifest["models"]["fp32"]["sha256"]
    assert m["gate"]["fp32"]["passed"] is True and m["gate"]["fp32"]["reference"] is None
    assert "no torch reference" in m["gate"]["fp32"]["note"]
    with pytest.raises(ExportError, match="num_classes=4"):
        export(src, tmp_path / "bad", spec=_small_spec_dict(num_classes=4))
    with pytest.raises(ExportError, match="roi_size"):
        export(src, tmp_path / "bad", spec=_small_spec_dict(roi=48))
    with pytest.raises(ExportError, match="spec"):
        export(src, tmp_path / "bad")
    with pytest.raises(ExportError, match="random_init"):
        export(src, tmp_path / "bad", spec=_small_spec_dict(), random_init=True)
    with pytest.raises(ExportError, match="overrides"):
        export(src, tmp_path / "bad", spec=_small_spec_dict(), overrides={"a": 1})
    assert not (tmp_path / "bad").exists()


def test_gate_failure_leaves_no_artifact(small_ts, tmp_path, monkeypatch):
    real = gate_mod._run_onnx

    def wrong(session, x):
        y = real(session, x)
        return y + np.float32(0.05) * np.abs(y).max() * np.sign(y)

    monkeypatch.setattr(gate_mod, "_run_onnx", wrong)
    out = tmp_path / "art"
    with pytest.raises(GateFailed) as info:
        export(small_ts, out, spec=_small_spec_dict(), gate_samples=1)
    rep = info.value.report
    assert rep["passed"] is False and rep["max_abs_logit_diff"] > rep["tolerance_max_abs"]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the temp dir was cleaned up too


def test_gate_passes_on_a_faithful_model(small_ts_artifact, small_ts):
    model = torch.jit.load(str(small_ts)).eval()
    art = Artifact.load(small_ts_artifact)
    a = gate_mod.run_gate(model, art.model_path(), in_channels=1, roi_size=(ROI,) * 3, num_classes=3,
                          samples=1, seed=1)
    b = gate_mod.run_gate(model, art.model_path(), in_channels=1, roi_size=(ROI,) * 3, num_classes=3,
                          samples=1, seed=2)
    assert a["passed"] and b["passed"] and a["max_abs_logit_diff"] != b["max_abs_logit_diff"]
    assert a["max_abs_logit_diff"] < 1e-4


def test_overwrite_rules(small_ts_artifact, small_ts, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export(small_ts, foreign, spec=_small_spec_dict(), force=True)
    assert (foreign / "precious.txt").read_text() == "keep me"
    # an existing artifact is replaced atomically
    art_copy = tmp_path / "art"
    shutil.copytree(small_ts_artifact, art_copy)
    before = json.loads((art_copy / "manifest.json").read_text())["created"]
    src = Artifact.load(small_ts_artifact).model_path()
    with pytest.raises(ExportError, match="force"):
        export(src, art_copy, spec=_small_spec_dict(), gate_samples=1)
    assert json.loads((art_copy / "manifest.json").read_text())["source"]["kind"] == "torchscript"
    export(src, art_copy, spec=_small_spec_dict(), gate_samples=1, force=True)
    m = Artifact.load(art_copy).manifest
    assert m["source"]["kind"] == "onnx" and before  # replaced by the new export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "foreign"]


def test_bad_spec_input(small_ts, tmp_path):
    with pytest.raises(SpecError):
        export(small_ts, tmp_path / "a", spec={"num_classes": 3})
    with pytest.raises(SpecError, match="does not exist"):
        export(small_ts, tmp_path / "a", spec=tmp_path / "missing.json")


# ---- bundles with their own network code (scripts/) -------------------------------------------

_TINY_NET = '''
import torch


class TinyNet(torch.nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)
'''


def _scripts_bundle(tmp_path, with_scripts: bool, code: str = _TINY_NET, name: str = "bundle") -> Path:
    def edit(cfg):
        cfg["network_def"] = {"_target_": "scripts.networks.tiny.TinyNet", "in_channels": 1, "out_channels": 6}
        cfg["inferer"]["roi_size"] = [16, 16, 16]

    b = _copy_bundle(SMALL, tmp_path / name, edit)
    if with_scripts:
        (b / "scripts" / "networks").mkdir(parents=True)
        (b / "scripts" / "__init__.py").write_text("")
        (b / "scripts" / "networks" / "__init__.py").write_text("")
        (b / "scripts" / "networks" / "tiny.py").write_text(code)
    return b


def test_bundle_scripts_do_not_leak_into_later_exports(tmp_path):
    """Two bundles whose network code has the same module name: each export builds its own bundle's network."""
    import sys

    import onnx

    # same module path and class name, another architecture (1x1x1 kernel, two layers)
    other_code = _TINY_NET.replace("self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)",
                                   "self.conv = torch.nn.Sequential(torch.nn.Conv3d(in_channels, 5, 1), "
                                   "torch.nn.Conv3d(5, out_channels, 1))")
    assert other_code != _TINY_NET
    a = _scripts_bundle(tmp_path, True, name="a")
    b = _scripts_bundle(tmp_path, True, other_code, name="b")

    def weight_shapes(art):
        m = onnx.load(str(Path(art) / "model_fp32.onnx"))
        return sorted(tuple(i.dims) for i in m.graph.initializer if len(i.dims) == 5)

    with pytest.warns(UserWarning, match="RANDOM"):
        art_a = export(a, tmp_path / "art_a", random_init=True, gate_samples=1)
    assert not any(n == "scripts" or n.startswith("scripts.") for n in sys.modules
                   if str(getattr(sys.modules[n], "__file__", "") or "").startswith(str(tmp_path)))
    with pytest.warns(UserWarning, match="RANDOM"):
        art_b = export(b, tmp_path / "art_b", random_init=True, gate_samples=1)
    with pytest.warns(UserWarning, match="RANDOM"):
        art_a2 = export(a, tmp_path / "art_a2", random_init=True, gate_samples=1)
    assert weight_shapes(art_a) == [(6, 1, 3, 3, 3)]
    assert weight_shapes(art_b) == [(5, 1, 1, 1, 1), (6, 5, 1, 1, 1)]
    assert weight_shapes(art_a2) == [(6, 1, 3, 3, 3)]
    assert not any(str(tmp_path) in p for p in sys.path)
    # nothing of either bundle stays importable or imported
    assert not any(str(getattr(m, "__file__", "") or "").startswith(str(tmp_path)) for m in list(sys.modules.values()))


def test_bundle_missing_scripts_fixture(tmp_path):
    b = _scripts_bundle(tmp_path, with_scripts=False)
    assert spec_from_bundle(b).num_classes == 6  # the spec needs no network code
    with pytest.raises(ExportError, match=r"scripts/"):
        load_bundle(b, random_init=True)


def test_bundle_with_scripts_is_imported_temporarily(tmp_path):
    import sys
    import types

    b = _scripts_bundle(tmp_path, with_scripts=True)
    # an unrelated, already imported "scripts" package must neither shadow the bundle's nor be lost
    other = types.ModuleType("scripts")
    other.__path__ = []
    sys.modules["scripts"] = other
    path_before = list(sys.path)
    try:
        with pytest.warns(UserWarning, match="RANDOM"):
            out = export(b, tmp_path / "art", random_init=True, gate_samples=1)
        assert sys.modules["scripts"] is other
        assert "scripts.networks.tiny" not in sys.modules
        assert sys.path == path_before
    finally:
        sys.modules.pop("scripts", None)
    art = Artifact.load(out)
    assert art.manifest["models"]["fp32"]["input_shape"] == ["batch", 1, 16, 16, 16]
    assert art.manifest["gate"]["fp32"]["passed"] is True
