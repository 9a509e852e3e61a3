"""segrt.stats: per-structure statistics against a phantom of known structures, the writers, label subsets."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from segrt.engine.segmentation import Segmentation
from segrt.errors import OutputError, UsageError
from segrt.stats import label_statistics, parse_label_list, read_statistics, select_labels, write_statistics
from segrt.volume import Volume

SHAPE = (40, 36, 30)
NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "pancreas"}  # 4 is absent


def _affine():
    """Anisotropic (0.7, 1.3, 2.5 mm) and oblique (rotated about two axes), with an offset."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.7, 1.3, 2.5])
    aff[:3, 3] = [-100.0, 35.5, 12.25]
    return aff


def _phantom():
    lab = np.zeros(SHAPE, np.uint8)
    lab[0:5, 10:20, 5:15] = 1  # a box on face i0: 5*10*10 voxels
    i, j, k = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    lab[(i - 20) ** 2 + (j - 18) ** 2 + (k - 14) ** 2 <= 36] = 2  # a sphere inside
    lab[30:40, 30:36, 25:30] = 3  # a box in the corner: faces i1, j1, k1; 10*6*5 voxels
    lab[10:12, 2:5, 3:4] = 7  # unnamed: 2*3*1 voxels
    rng = np.random.default_rng(0)
    img = (1000.0 + rng.normal(0, 0.5, SHAPE) + 10 * lab).astype(np.float32)  # large mean, small std
    return lab, img


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


def _by_label(stats):
    return {r["label"]: r for r in stats}


def test_known_structures(phantom):
    lab, img = phantom
    aff = _affine()
    stats = label_statistics(lab, aff, img, NAMES)
    recs = _by_label(stats)
    assert [r["label"] for r in stats] == [1, 2, 3, 4, 7]
    voxel_ml = 0.7 * 1.3 * 2.5 / 1000
    assert recs[1]["voxels"] == 500 and recs[3]["voxels"] == 300 and recs[7]["voxels"] == 6
    assert recs[7]["name"] == "class_7"
    for label in (1, 2, 3, 7):
        r, m = recs[label], lab == label
        assert r["present"] is True
        assert r["voxels"] == int(m.sum())
        assert r["volume_ml"] == pytest.approx(m.sum() * voxel_ml, rel=1e-12)
        vals = img[m].astype(np.float64)
        assert r["intensity_mean"] == pytest.approx(vals.mean(), rel=1e-12)
        assert r["intensity_std"] == pytest.approx(vals.std(), rel=1e-7)  # std 0.5 at mean 1000+: no cancellation
        assert r["intensity_min"] == float(vals.min()) and r["intensity_max"] == float(vals.max())
        idx = np.argwhere(m)
        assert r["bbox_voxels"] == [[int(idx[:, d].min()), int(idx[:, d].max())] for d in range(3)]
        corners = np.array(list(itertools.product(*r["bbox_voxels"])), np.float64)
        world = corners @ aff[:3, :3].T + aff[:3, 3]
        np.testing.assert_allclose(r["bbox_mm"], np.stack([world.min(0), world.max(0)], 1), rtol=0, atol=1e-9)
        np.testing.assert_allclose(r["centroid_mm"], aff[:3, :3] @ idx.mean(0) + aff[:3, 3], rtol=0, atol=1e-9)
    assert recs[1]["touches_border"] is True and recs[1]["border_faces"] == ["i0"]
    assert recs[2]["touches_border"] is False and recs[2]["border_faces"] == []
    assert recs[3]["border_faces"] == ["i1", "j1", "k1"]
    absent = recs[4]
    assert absent["present"] is False and absent["voxels"] == 0 and absent["volume_ml"] == 0.0
    assert absent["name"] == "pancreas" and absent["intensity_mean"] is None and absent["bbox_voxels"] is None


def test_background_and_no_image(phantom):
    lab, img = phantom
    stats = label_statistics(lab, _affine(), img, NAMES, include_background=True)
    bg = stats[0]
    assert bg["label"] == 0 and bg["name"] == "background"
    m = lab == 0
    assert bg["voxels"] == int(m.sum())
    assert bg["intensity_mean"] == pytest.approx(img[m].astype(np.float64).mean(), rel=1e-12)
    assert bg["intensity_std"] == pytest.approx(img[m].astype(np.float64).std(), rel=1e-7)
    assert bg["intensity_min"] == float(img[m].min()) and bg["intensity_max"] == float(img[m].max())
    assert bg["bbox_voxels"] == [[0, s - 1] for s in SHAPE]
    idx = np.argwhere(m)
    np.testing.assert_allclose(bg["centroid_mm"], _affine()[:3, :3] @ idx.mean(0) + _affine()[:3, 3], atol=1e-9)
    assert _by_label(stats)[1] == _by_label(label_statistics(lab, _affine(), img, NAMES))[1]
    plain = label_statistics(lab, _affine(), None, NAMES)
    assert all(r["intensity_mean"] is None and r["intensity_std"] is None for r in plain)
    assert [r["voxels"] for r in plain] == [r["voxels"] for r in stats[1:]]


def _close(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-12, abs=1e-9), k
            elif k in ("bbox_mm", "centroid_mm") and ra[k] is not None:
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-12, atol=1e-9)
            else:
                assert ra[k] == rb[k], k


@pytest.mark.parametrize("lab_order,img_order", [("F", "F"), ("F", "C"), ("C", "F")])
def test_memory_order_and_channel_first(phantom, lab_order, img_order):
    lab, img = phantom
    ref = label_statistics(lab, _affine(), img, NAMES, include_background=True)
    got = label_statistics(np.asarray(lab, order=lab_order), _affine(), np.asarray(img, order=img_order), NAMES,
                           include_background=True)
    _close(got, ref)
    _close(label_statistics(lab, _affine(), img[None], NAMES), ref[1:])  # (C, X, Y, Z): first channel


def test_large_label_values_and_bool(phantom):
    lab, img = phantom
    big = lab.astype(np.int32) * 5000  # beyond the direct histogram: renumbered densely
    ref = label_statistics(lab, _affine(), img)
    got = label_statistics(big, _affine(), img)
    assert [r["label"] for r in got] == [5000 * r["label"] for r in ref]
    for r in got:
        r["label"] //= 5000
        r["name"] = f"class_{r['label']}"
    _close(got, ref)
    b = label_statistics(lab == 2, _affine(), img)
    assert len(b) == 1 and b[0]["voxels"] == int((lab == 2).sum())


def test_matches_scipy(phantom):
    ndi = pytest.importorskip("scipy.ndimage")
    lab, img = phantom
    lab = np.asfortranarray(lab)
    aff = np.eye(4)  # world = voxel index: centroid_mm is the centre of mass in index space
    recs = _by_label(label_statistics(lab, aff, img))
    objs = ndi.find_objects(lab)
    for label, sl in enumerate(objs, start=1):
        if sl is None:
            assert label not in recs
            continue
        assert recs[label]["bbox_voxels"] == [[s.start, s.stop - 1] for s in sl]
        np.testing.assert_allclose(recs[label]["centroid_mm"], ndi.center_of_mass(lab == label), atol=1e-9)
        assert recs[label]["intensity_mean"] == pytest.approx(float(ndi.mean(img.astype(np.float64), lab, label)),
                                                              rel=1e-12)
        assert recs[label]["intensity_min"] == float(ndi.minimum(img, lab, label))


def test_bad_inputs(phantom):
    lab, img = phantom
    with pytest.raises(UsageError, match="3-D"):
        label_statistics(lab[0], _affine())
    with pytest.raises(UsageError, match="integers"):
        label_statistics(lab.astype(np.float32), _affine())
    with pytest.raises(UsageError, match="non-negative"):
        label_statistics(lab.astype(np.int16) - 1, _affine())
    with pytest.raises(UsageError, match="does not match"):
        label_statistics(lab, _affine(), img[:-1])
    with pytest.raises(UsageError, match="4x4"):
        label_statistics(lab, np.eye(3))


@pytest.mark.parametrize("ext", [".json", ".csv", ".CSV"])
def test_write_read_round_trip(phantom, tmp_path, ext):
    lab, img = phantom
    stats = label_statistics(lab, _affine(), img, NAMES, include_background=True)
    out = write_statistics(stats, tmp_path / f"stats{ext}")
    assert sorted(os.listdir(tmp_path)) == [f"stats{ext}"]  # no temporary file left
    assert read_statistics(out) == stats  # exact: JSON and repr() floats round-trip
    if ext == ".json":
        doc = json.loads(out.read_text())
        assert doc["units"]["volume_ml"] == "mL" and len(doc["structures"]) == len(stats)
    else:
        lines = out.read_text().splitlines()
        assert lines[0].startswith("label,name,present,voxels,volume_ml,")
        assert len(lines) == 1 + len(stats)
        assert ",pancreas,false,0,0.0," in lines[5]


def test_write_unknown_extension(tmp_path):
    with pytest.raises(OutputError, match="unknown extension"):
        write_statistics([], tmp_path / "stats.txt")
    with pytest.raises(OutputError, match="unknown extension"):
        write_statistics([], tmp_path / ".json")
    assert os.listdir(tmp_path) == []


def test_select_labels(phantom):
    lab, _ = phantom
    flab = np.asfortranarray(lab)
    out, names = select_labels(flab, NAMES, ["LIVER", 3])
    assert out.dtype == lab.dtype and out.flags.f_contiguous
    np.testing.assert_array_equal(out, np.where(np.isin(lab, [1, 3]), lab, 0))
    assert names == {0: "background", 1: "liver", 3: "kidney_left"}
    out, names = select_labels(lab, NAMES, parse_label_list(" spleen , 7"))  # 7: unnamed but present
    np.testing.assert_array_equal(out, np.where(np.isin(lab, [2, 7]), lab, 0))
    assert names == {0: "background", 2: "spleen"}
    np.testing.assert_array_equal(select_labels(lab, NAMES, "Spleen,7")[0], out)  # one comma-separated string
    out, _ = select_labels(lab, NAMES, "pancreas")  # named and absent: allowed, nothing left
    assert not out.any()
    with pytest.raises(UsageError, match=r"did you mean 'liver'\?.*Valid names: background, liver, spleen"):
        select_labels(lab, NAMES, ["livr"])
    with pytest.raises(UsageError, match="label 9 is neither"):
        select_labels(lab, NAMES, [9])
    with pytest.raises(UsageError, match="no class"):
        select_labels(lab, NAMES, [])


def test_parse_label_list():
    assert parse_label_list("liver,spleen") == ["liver", "spleen"]
    assert parse_label_list(" liver , 5,,") == ["liver", 5]
    with pytest.raises(UsageError):
        parse_label_list(" , ")


def test_segmentation_methods(phantom, tmp_path):
    lab, img = phantom
    vol = Volume.from_array(img, affine=_affine())
    seg = Segmentation(labels=lab, affine=_affine(), class_names=dict(NAMES), source=vol, metadata={"a": 1})
    stats = seg.statistics()
    _close(stats, label_statistics(lab, _affine(), img, NAMES))
    assert stats[0]["intensity_mean"] is not None
    sub = seg.select(["spleen"])
    assert sub is not seg and sub.class_names == {0: "background", 2: "spleen"}
    assert set(np.unique(sub.labels)) == {0, 2} and sub.source is vol and sub.metadata == {"a": 1}
    assert [r["label"] for r in sub.statistics()] == [2]
    p = seg.write_statistics(tmp_path / "s.csv")
    assert read_statistics(p) == stats
    with pytest.raises(OutputError, match="unknown extension"):
        seg.write_statistics(tmp_path / "s.xlsx")
    assert Segmentation(labels=lab, affine=_affine(), class_names={}).statistics()[0]["intensity_mean"] is None
