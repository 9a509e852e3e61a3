"""segrt.preview: the PNG opens at the expected size, shows the overlay colours and a legend of the visible classes,
keeps the voxel aspect ratio, and is the same picture whatever the storage orientation (RAS, LPS, permuted)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from segrt.engine.segmentation import Segmentation  # noqa: E402
from segrt.errors import OutputError  # noqa: E402
from segrt.phantom import make_phantom  # noqa: E402
from segrt.preview import OVERLAY_ALPHA, _render, label_colour, write_preview  # noqa: E402
from segrt.volume import Volume  # noqa: E402

W, H = 1500, 600


@pytest.fixture(scope="module")
def ras():
    img, lab, aff, names = make_phantom((64, 64, 40), (2.5, 2.5, 4.0), axcodes="RAS", seed=1, noise_std=10.0)
    return img, lab, aff, names


def _png(path):
    a = imread(str(path))
    assert a.dtype == np.float32
    return a[..., :3]


def _overlay_mask(rgb, colour, tol=2.5 / 255):
    """Pixels that are ``colour`` blended at OVERLAY_ALPHA over some grey level."""
    q = (rgb - OVERLAY_ALPHA * np.asarray(colour)) / (1 - OVERLAY_ALPHA)
    grey = (np.abs(q[..., 0] - q[..., 1]) < tol) & (np.abs(q[..., 1] - q[..., 2]) < tol)
    return grey & (q.min(-1) > -tol) & (q.max(-1) < 1 + tol)


def _pure_mask(rgb, colour, tol=1.5 / 255):
    return np.all(np.abs(rgb - np.asarray(colour)) < tol, axis=-1)


def test_png_size_overlay_and_legend(ras, tmp_path):
    img, lab, aff, names = ras
    out = write_preview(lab, aff, img, tmp_path / "p.png", names, title="case 1")
    assert os.listdir(tmp_path) == ["p.png"]  # written through a temporary name, nothing left
    rgb = _png(out)
    assert rgb.shape == (H, W, 3)
    _, info = _render(lab, aff, img, names, None)
    shown = [v for v, _ in info["legend"]]
    assert len(shown) >= 3 and all(names[v] == n for v, n in info["legend"])
    panels, legend_area = rgb[:, : int(W * 0.8)], rgb[:, int(W * 0.8):]
    for v in shown:
        assert _overlay_mask(panels, label_colour(v)).sum() > 50, names[v]  # the blended overlay
        assert _pure_mask(legend_area, label_colour(v)).sum() > 50, names[v]  # the legend's patch
    absent = [v for v in range(1, 20) if v not in shown]
    assert not _pure_mask(legend_area, label_colour(absent[0])).any()
    assert rgb.std() > 0.1  # a picture, not a blank


def _reoriented(img, lab, aff, flips, perm):
    """The same voxels stored with axes ``perm`` of the RAS arrays, each then flipped where ``flips``: same world."""
    a, l, m = img, lab, aff.copy()
    for ax, f in enumerate(flips):
        if f:
            a, l = np.flip(a, ax), np.flip(l, ax)
            fl = np.eye(4)
            fl[ax, ax], fl[ax, 3] = -1, img.shape[ax] - 1
            m = m @ fl
    a, l = np.transpose(a, perm), np.transpose(l, perm)
    p = np.eye(4)
    p[:3, :3] = np.eye(3)[:, list(perm)]
    return np.ascontiguousarray(a), np.asfortranarray(l), m @ p


@pytest.mark.parametrize("flips,perm", [((1, 1, 0), (0, 1, 2)),  # LPS
                                        ((0, 0, 1), (2, 0, 1)),  # axes permuted (S I, R, A), I first
                                        ((1, 0, 1), (1, 2, 0))])
def test_same_picture_whatever_the_storage_orientation(ras, tmp_path, flips, perm):
    img, lab, aff, names = ras
    ref = _png(write_preview(lab, aff, img, tmp_path / "ras.png", names))
    a, l, m = _reoriented(img, lab, aff, flips, perm)
    # every voxel keeps its world position
    idx = np.argwhere(np.ones(l.shape, bool))[::97]
    back = (np.linalg.inv(aff) @ (m @ np.c_[idx, np.ones(len(idx))].T))[:3].T
    back = np.rint(back).astype(int)
    np.testing.assert_array_equal(l[tuple(idx.T)], lab[tuple(back.T)])
    np.testing.assert_array_equal(a[tuple(idx.T)], img[tuple(back.T)])
    got = _png(write_preview(l, m, a, tmp_path / "other.png", names))
    np.testing.assert_array_equal(got, ref)


def test_voxel_aspect_ratio(tmp_path):
    # a 40 mm cube sampled 1 x 1 x 4 mm: in the coronal panel it must be drawn square, not 4x squashed
    shape = (80, 80, 30)
    lab = np.zeros(shape, np.uint8)
    lab[20:60, 20:60, 10:20] = 1
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    rgb = _png(write_preview(lab, aff, None, tmp_path / "c.png", {1: "cube"}))
    fig, _ = _render(lab, aff, None, {1: "cube"}, None)
    box = fig.axes[1].get_window_extent()  # the coronal panel, in pixels from the bottom left
    coronal = rgb[H - int(box.y1):H - int(box.y0), int(box.x0):int(box.x1)]
    ys, xs = np.nonzero(_overlay_mask(coronal, label_colour(1)) & (coronal.sum(-1) > 0.05))
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(h - w) <= 2 and h > 100


def test_oblique_and_no_image_no_foreground(tmp_path):
    lab = np.zeros((20, 30, 10), np.int16)
    aff = np.array([[0.0, -1.2, 0.3, 10], [0.9, 0.0, 0.0, -5], [0.0, 0.1, 3.0, 2], [0, 0, 0, 1]])
    _, info = _render(lab, aff, None, {}, None)
    assert info["legend"] == [] and info["window"] == (0.0, 1.0)
    rgb = _png(write_preview(lab, aff, None, tmp_path / "e.png", {}))
    assert rgb.shape == (H, W, 3)


def test_legend_capped(tmp_path):
    lab = np.zeros((50, 8, 8), np.uint8)
    for v in range(1, 46):
        lab[v, :, :] = v  # 45 classes, all in the axial and coronal slices
    fig, info = _render(lab, np.eye(4), None, {3: "three"}, None)
    assert len(info["legend"]) == 45 and info["legend"][2] == (3, "three")
    texts = [t.get_text() for t in fig.axes[3].get_legend().get_texts()]
    assert len(texts) == 30 and texts[-1] == "+16 more" and texts[2] == "3  three"
    assert len({label_colour(v) for v in range(1, 200)}) == 199  # distinct colours


def test_no_pyplot_and_errors(ras, tmp_path, monkeypatch):
    img, lab, aff, names = ras
    had_pyplot = "matplotlib.pyplot" in sys.modules
    write_preview(lab, aff, img, tmp_path / "x.png", names)
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    with pytest.raises(OutputError, match="unknown extension"):
        write_preview(lab, aff, img, tmp_path / "x.jpg", names)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(OutputError, match=r"--preview needs matplotlib: pip install 'segrt\[preview\]'"):
        write_preview(lab, aff, img, tmp_path / "y.png", names)
    assert not (tmp_path / "y.png").exists()


def test_segmentation_write_preview(ras, tmp_path):
    img, lab, aff, names = ras
    seg = Segmentation(labels=lab, affine=aff, class_names=names, source=Volume.from_array(img, affine=aff))
    a = _png(seg.write_preview(tmp_path / "s.png"))
    b = _png(write_preview(lab, aff, img, tmp_path / "t.png", names))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(OutputError):
        seg.write_preview(tmp_path / "s.nii.gz")
