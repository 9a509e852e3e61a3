"""Whole-brain MRI (UNesT settings): the brain_small fixture bundle with its own scripts/ network, the config-string
semantics of NormalizeIntensityd, the 133-class label table, and the --overlap override.

Parity of the fixture with MONAI's pipeline is the ``brain_small`` case of tests/test_parity.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from parity_util import BUNDLES, FIXTURES, mri_like, oblique_affine, write_volume

pytest.importorskip("monai")

BRAIN = FIXTURES / "bundles" / "brain_small"
UNEST = BUNDLES / "wholeBrainSeg_Large_UNEST_segmentation"


def segrt(*args):
    return subprocess.run([sys.executable, "-m", "segrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _copy(src: Path, dst: Path, edit=None, metadata: Path | None = None) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "models"))
    if edit is not None:
        cfg_path = dst / "configs" / "inference.json"
        cfg = json.loads(cfg_path.read_text())
        edit(cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if metadata is not None:
        shutil.copyfile(metadata, dst / "configs" / "metadata.json")
    return dst


@pytest.fixture(scope="module")
def brain_artifact(tmp_path_factory):
    from segrt.export import export

    out = tmp_path_factory.mktemp("brain") / "art"
    with pytest.warns(UserWarning, match="RANDOM"):
        return Path(export(BRAIN, out, random_init=True, gate_samples=1))


@pytest.fixture(scope="module")
def t1(tmp_path_factory):
    d = tmp_path_factory.mktemp("t1")
    return write_volume(d / "t1.nii.gz", mri_like((58, 41, 36), seed=2), oblique_affine((1.0, 1.0, 1.0)))


# ---- the fixture's spec: UNesT's inference settings ---------------------------------------------

def test_fixture_mirrors_unest_settings():
    ours = json.loads((BRAIN / "configs" / "inference.json").read_text())
    if UNEST.exists():  # every setting but the network and the (CI-sized) roi is UNesT's, verbatim
        theirs = json.loads((UNEST / "configs" / "inference.json").read_text())
        for key in set(theirs) | set(ours):
            if key in ("network_def", "inferer"):
                continue
            assert ours.get(key) == theirs.get(key), key
        assert {k: v for k, v in ours["inferer"].items() if k != "roi_size"} == \
               {k: v for k, v in theirs["inferer"].items() if k != "roi_size"}
    norm = ours["preprocessing"]["transforms"][2]
    assert norm["_target_"] == "NormalizeIntensityd" and norm["nonzero"] == "True" and norm["channel_wise"] == "True"
    assert ours["network_def"]["_target_"].startswith("scripts.networks.")
    assert (BRAIN / "scripts" / "networks" / "tiny_unest.py").is_file()


def test_brain_spec():
    from segrt.export.bundle import spec_from_bundle

    s = spec_from_bundle(BRAIN)
    assert (s.in_channels, s.num_classes) == (1, 12)
    assert s.preprocessing.orientation is None and s.preprocessing.spacing is None
    (op,) = s.preprocessing.intensity
    assert op.op == "normalize_intensity"
    assert op.params["nonzero"] is True and op.params["channel_wise"] is True
    inf = s.inference
    assert inf.roi_size == (32, 32, 32) and inf.sw_batch_size == 4 and inf.overlap == (0.7, 0.7, 0.7)
    assert inf.blend_mode == "constant" and inf.padding_mode == "constant" and inf.importance_profiles is None
    post = s.postprocessing
    assert post.softmax and post.order == "invert_then_argmax" and post.invert_interp == "bilinear"
    assert s.class_names[0] == "background" and s.class_names[11] == "Left-Cerebellum-Exterior"
    assert len(s.class_names) == 12


# ---- config strings: "False" is truthy (docs/semantics.md §4) -----------------------------------------

def test_string_false_acts_as_true_in_spec_and_engine(tmp_path):
    """NormalizeIntensityd(nonzero="False", channel_wise="False") behaves as (True, True) in MONAI and in segrt."""
    import torch
    from monai.transforms import NormalizeIntensityd

    from segrt.engine.preprocess import preprocess
    from segrt.export.bundle import spec_from_bundle
    from segrt.spec import IntensityOp, Preprocessing
    from segrt.volume import Volume

    def edit(cfg):
        cfg["preprocessing"]["transforms"][2].update(nonzero="False", channel_wise="False")

    b = _copy(BRAIN, tmp_path / "b", edit)
    pre = spec_from_bundle(b).preprocessing
    (op,) = pre.intensity
    assert op.params["nonzero"] is True and op.params["channel_wise"] is True

    # two channels of different scales, both with exact-zero background
    x = np.stack([mri_like((20, 18, 16), seed=1), 3.0 * mri_like((20, 18, 16), seed=4) + 7.0])
    x[1][x[0] == 0] = 0.0
    monai_out = NormalizeIntensityd(keys="image", nonzero="False", channel_wise="False")(
        {"image": torch.from_numpy(x.copy())})["image"]
    monai_out = np.asarray(monai_out)
    ours, _ = preprocess(Volume.from_array(x, affine=np.eye(4)), pre)
    assert np.abs(ours - monai_out).max() <= 1e-5
    assert np.array_equal(ours == 0, x == 0)  # background left at 0: the nonzero mask is in effect
    # and it is NOT what real booleans False/False give
    plain = Preprocessing(intensity=(IntensityOp.from_dict({"op": "normalize_intensity"}),))
    ours_false, _ = preprocess(Volume.from_array(x, affine=np.eye(4)), plain)
    assert np.abs(ours_false - monai_out).max() > 0.1


# ---- export with the bundle's own network code --------------------------------------------------

def test_brain_export_manifest(brain_artifact):
    import sys as _sys

    from segrt.artifact import Artifact

    art = Artifact.load(brain_artifact)
    m = art.manifest
    assert m["models"]["fp32"]["input_shape"] == ["batch", 1, 32, 32, 32]
    assert m["models"]["fp32"]["output_shape"] == ["batch", 12, 32, 32, 32]
    assert m["gate"]["fp32"]["passed"] is True
    assert m["models"]["fp32"]["exporter"] in ("dynamo", "torchscript")
    assert "scripts.networks.tiny_unest" not in _sys.modules  # the bundle's code was imported temporarily
    # the artifact runs without the bundle's network code
    assert not any(p.suffix == ".py" for p in Path(brain_artifact).rglob("*"))


# ---- the 133-class label table of the real UNesT bundle -----------------------------------------

@pytest.mark.skipif(not UNEST.exists(), reason="the shared UNesT bundle is beside the repo only in CI")
def test_unest_label_table_in_info_and_volumes(tmp_path, t1):
    from segrt.engine.engine import Engine
    from segrt.export import export

    table = json.loads((UNEST / "configs" / "metadata.json").read_text())
    names = table["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert len(names) == 133

    # the fixture network with UNesT's metadata (133 named classes) and 133 output channels
    b = _copy(BRAIN, tmp_path / "b133", lambda cfg: cfg["network_def"].update(out_channels=133),
              metadata=UNEST / "configs" / "metadata.json")
    with pytest.warns(UserWarning, match="RANDOM"):
        art = export(b, tmp_path / "art133", random_init=True, gate_samples=1)

    r = segrt("info", art)
    assert r.returncode == 0, r.stderr
    assert "133 named" in r.stdout
    assert "1 in → 133 classes (labels uint8)" in r.stdout
    for label in ("0", "1", "132"):
        assert f"{int(label):>3} {names[label]}" in r.stdout

    with Engine.load(art, device="cpu") as eng:
        assert eng.spec.class_names == {int(k): v for k, v in names.items()}
        seg = eng.segment(t1, progress=False)
    present = [int(v) for v in np.unique(seg.labels) if v != 0]
    assert len(present) >= 2  # random weights still pick several classes
    vols = seg.volumes_ml()
    for label in present:
        assert vols[names[str(label)]] == pytest.approx(
            float((seg.labels == label).sum()) * seg.voxel_volume_ml)
    assert not any(k.startswith("class_") for k in vols)

    out = tmp_path / "labels.nii.gz"
    r = segrt("run", art, t1, "-o", out, "--device", "cpu", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["volumes_ml"]) == set(vols)


# ---- --overlap override: recorded, never silent --------------------------------------------------

def test_overlap_override_engine(brain_artifact, t1, tmp_path, caplog):
    from segrt.engine.engine import Engine

    with Engine.load(brain_artifact, device="cpu") as eng:
        ref = eng.segment(t1, progress=False)
    assert ref.metadata["overlap"] == [0.7] * 3 and ref.metadata["overlap_overridden"] is False
    assert "descrip" not in ref.metadata
    with caplog.at_level(logging.WARNING, logger="segrt"):
        eng = Engine.load(brain_artifact, device="cpu", overlap=0.5)
    assert any("overlap 0.5 replaces the artifact's 0.7" in r.getMessage() for r in caplog.records)
    with eng:
        assert eng.artifact.spec.inference.overlap == (0.7, 0.7, 0.7)  # the artifact itself is unchanged
        seg = eng.segment(t1, progress=False, output=tmp_path / "o.nii.gz")
    m = seg.metadata
    assert m["overlap"] == [0.5] * 3 and m["overlap_overridden"] is True and m["artifact_overlap"] == [0.7] * 3
    assert m["windows"] < ref.metadata["windows"]
    hdr = nib.load(str(tmp_path / "o.nii.gz")).header
    assert hdr["descrip"].tobytes().rstrip(b"\0").decode() == "segrt overlap=0.5 (artifact 0.7)"
    # per-axis overlaps are accepted too; the same value as the artifact is no override
    with Engine.load(brain_artifact, device="cpu", overlap=(0.25, 0.5, 0.7)) as e2:
        assert e2.spec.inference.overlap == (0.25, 0.5, 0.7)
    with Engine.load(brain_artifact, device="cpu", overlap=0.7) as e3:
        assert e3.overlap_overridden is False


@pytest.mark.parametrize("bad", [1.0, -0.1, "half", (0.5, 0.5), True])
def test_overlap_override_rejects_bad_values(brain_artifact, bad):
    from segrt.engine.engine import Engine
    from segrt.errors import SpecError

    with pytest.raises(SpecError, match="overlap"):
        Engine.load(brain_artifact, device="cpu", overlap=bad)


def test_overlap_override_cli(brain_artifact, t1, tmp_path):
    out = tmp_path / "labels.nii.gz"
    r = segrt("run", brain_artifact, t1, "-o", out, "--device", "cpu", "--overlap", "0.25", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["overlap"] == [0.25] * 3 and report["overlap_overridden"] is True
    assert "overlap 0.25 replaces the artifact's 0.7" in r.stderr  # the warning, without -v
    assert nib.load(str(out)).header["descrip"].tobytes().rstrip(b"\0").decode() == \
        "segrt overlap=0.25 (artifact 0.7)"
    r = segrt("run", brain_artifact, t1, "-o", tmp_path / "x.nii.gz", "--overlap", "1.5")
    assert r.returncode == 2 and "overlap must be in [0, 1)" in r.stderr
    assert not (tmp_path / "x.nii.gz").exists()


# ---- probability-space Invertd when nothing is invertible ----------------------------------------

def test_identity_probability_inverter_matches_reference():
    """No geometry (the brain bundle): the streaming inverter's identity path equals the reference kernel."""
    from segrt.engine import resample as K

    rng = np.random.default_rng(3)
    C, shape = 7, (23, 11, 9)
    # quantised probabilities: exact ties between classes, where the first maximum must win
    probs = (rng.integers(0, 4, (C, *shape)) / 4.0).astype(np.float32)
    ref = K.invert_probabilities_argmax(probs, np.eye(4), shape, np.uint8)
    inv = K.ProbabilityInverter(np.eye(4), shape, shape, C, np.uint8)
    x0 = 0
    for rows in (5, 1, 9, 8):
        done = inv.push(x0, probs[:, x0:x0 + rows])
        assert done is not None and done[0] == x0 and done[1].shape[0] == rows  # every row finished at once
        x0 += rows
    got = inv.finish()
    assert np.array_equal(got, ref)
    assert np.array_equal(got, np.argmax(probs, axis=0))
    # a non-identity map still goes through interpolation (and is not a plain argmax)
    M = np.diag([0.5, 1.0, 1.0, 1.0])
    inv2 = K.ProbabilityInverter(M, shape, (45, 11, 9), C, np.uint8)
    inv2.push(0, probs)
    assert np.array_equal(inv2.finish(), K.invert_probabilities_argmax(probs, M, (45, 11, 9), np.uint8))
