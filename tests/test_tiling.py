"""Sliding-window geometry and importance map against MONAI 1.6.1's own functions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_data_utils = pytest.importorskip("monai.data.utils")
monai_inferer_utils = pytest.importorskip("monai.inferers.utils")

from segrt.engine.stitch import _extract_window  # noqa: E402
from segrt.engine.tiling import (  # noqa: E402
    gaussian_profile,
    importance_map,
    pad_widths,
    plan_windows,
    scan_interval,
    torch_gaussian_profiles,
    window_starts,
)
from segrt.errors import SpecError, VolumeError  # noqa: E402
from segrt.spec import InferenceSpec  # noqa: E402

torch.set_num_threads(1)

SHAPES = [(1, 1, 1), (5, 7, 3), (16, 16, 16), (17, 33, 9), (40, 23, 61), (96, 100, 200), (130, 11, 6)]
ROIS = [(16, 16, 16), (12, 10, 8), (96, 96, 96), (7, 5, 3)]
OVERLAPS = [(0.0, 0.0, 0.0), (0.25, 0.25, 0.25), (0.5, 0.5, 0.5), (0.7, 0.7, 0.7), (0.1, 0.6, 0.9),
            (0.99, 0.5, 0.33)]


def _monai_geometry(shape, roi, overlap):
    image_size = tuple(max(s, r) for s, r in zip(shape, roi))
    iv = monai_inferer_utils._get_scan_interval(image_size, roi, 3, overlap)
    slices = monai_data_utils.dense_patch_slices(image_size, roi, iv)
    return image_size, iv, [tuple(s.start for s in sl) for sl in slices]


# keep the window count small (a 7x5x3 ROI over 96x100x200 would give ~900k windows)
CASES = [(s, r, o) for s, r, o in itertools.product(SHAPES, ROIS, OVERLAPS)
         if np.prod(s) / np.prod(r) < 5000]


@pytest.mark.parametrize("shape,roi,overlap", CASES)
def test_plan_matches_monai(shape, roi, overlap):
    spec = InferenceSpec(roi_size=roi, overlap=overlap)
    plan = plan_windows(shape, spec)
    image_size, iv, starts = _monai_geometry(shape, roi, overlap)
    assert plan.padded_shape == image_size
    assert plan.interval == iv
    assert list(plan.windows) == starts
    assert plan.n_windows == len(starts)
    # per-axis starts: last one flush with the end, strictly increasing
    for ax in range(3):
        st = plan.starts[ax]
        assert st[0] == 0 and st[-1] == image_size[ax] - roi[ax]
        assert all(b > a for a, b in zip(st, st[1:]))
    # padding: extra voxel at the high end
    for (lo, hi), s, r in zip(plan.pads, shape, roi):
        assert lo + hi == max(r - s, 0) and hi - lo in (0, 1)
    assert tuple(sl.stop - sl.start for sl in plan.crop) == shape


def test_known_values_from_notes():
    # docs/semantics.md §5.3/§5.4: roi 96, overlap 0.7 -> interval 28; S=200, iv=48 -> 0,48,96,104
    assert scan_interval((200, 200, 200), (96, 96, 96), (0.25, 0.5, 0.7)) == (72, 48, 28)
    assert window_starts(200, 96, 48) == (0, 48, 96, 104)
    assert scan_interval((96, 97, 50), (96, 96, 50), (0.5, 0.5, 0.5)) == (96, 48, 50)
    assert pad_widths((5, 96, 93), (96, 96, 96)) == ((45, 46), (0, 0), (1, 2))


@pytest.mark.parametrize("padding_mode", ["constant", "replicate"])
def test_window_content_matches_monai(padding_mode):
    """The windows MONAI hands to the network equal the ones segrt extracts (padding never materialised)."""
    rng = np.random.default_rng(3)
    for shape, roi in [((9, 14, 5), (12, 10, 8)), ((20, 6, 3), (16, 16, 16)), ((4, 4, 30), (7, 5, 3))]:
        img = rng.standard_normal((2, *shape)).astype(np.float32)
        cval = 0.75 if padding_mode == "constant" else 0.0
        seen = []

        def net(x):
            seen.append(x.numpy().copy())
            return x[:, :1]

        monai_inferer_utils.sliding_window_inference(
            torch.from_numpy(img)[None], roi, 1, net, overlap=0.5, padding_mode=padding_mode, cval=cval)
        spec = InferenceSpec(roi_size=roi, overlap=(0.5,) * 3, padding_mode=padding_mode, cval=cval)
        plan = plan_windows(shape, spec)
        assert len(seen) == plan.n_windows
        out = np.empty((2, *roi), dtype=np.float32)
        for win, ref in zip(plan.windows, seen):
            out[...] = np.nan
            _extract_window(img, win, plan, spec, out)
            np.testing.assert_array_equal(out, ref[0])


ROI_SIGMA = [((16, 16, 16), (0.125,) * 3), ((12, 10, 8), (0.125, 0.25, 0.5)), ((96, 96, 96), (0.125,) * 3),
             ((1, 2, 3), (0.125,) * 3), ((33, 7, 64), (0.3, 0.1, 1.0)), ((128, 128, 64), (0.125,) * 3)]


def _ulp_diff(a, b):
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("roi,sigma", ROI_SIGMA)
def test_gaussian_map_bit_exact_with_torch_profiles(roi, sigma):
    ref = monai_data_utils.compute_importance_map(roi, mode="gaussian", sigma_scale=sigma).numpy()
    got = importance_map(roi, "gaussian", sigma, profiles=torch_gaussian_profiles(roi, sigma))
    assert got.dtype == np.float32 and got.shape == roi
    np.testing.assert_array_equal(got, ref)
    # the profiles survive a JSON round trip through the spec
    spec = InferenceSpec(roi_size=roi, blend_mode="gaussian", sigma_scale=sigma,
                         importance_profiles=tuple(tuple(p) for p in torch_gaussian_profiles(roi, sigma)))
    np.testing.assert_array_equal(
        importance_map(roi, "gaussian", sigma, profiles=spec.importance_profiles), ref)


@pytest.mark.parametrize("roi,sigma", ROI_SIGMA)
def test_gaussian_map_numpy_within_ulps(roi, sigma):
    ref = monai_data_utils.compute_importance_map(roi, mode="gaussian", sigma_scale=sigma).numpy()
    got = importance_map(roi, "gaussian", sigma)
    assert got.dtype == np.float32
    # each profile entry is within 1 ulp of torch's; a product of three (two roundings) within 6 ulps
    assert _ulp_diff(got, ref).max() <= 6
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert got.min() >= np.float32(1e-3) or got.min() == ref.min()


def test_numpy_profile_within_one_ulp():
    worst = 0
    for n in range(1, 130):
        for s in (0.125, 0.3, 1.0):
            ref = np.asarray(torch_gaussian_profiles((n, 1, 1), (s, s, s))[0], dtype=np.float32)
            worst = max(worst, int(_ulp_diff(gaussian_profile(n, s), ref).max()))
    assert worst <= 1


def test_clamp_floor_96():
    m = importance_map((96, 96, 96), "gaussian", (0.125,) * 3, torch_gaussian_profiles((96,) * 3, (0.125,) * 3))
    assert m.min() == np.float32(1e-3)
    assert abs(float(m.max()) - 0.99740) < 1e-5


def test_constant_map():
    ref = monai_data_utils.compute_importance_map((12, 10, 8), mode="constant").numpy()
    got = importance_map((12, 10, 8), "constant")
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.float32


def test_invalid_inputs_raise():
    with pytest.raises(SpecError, match="blend mode"):
        importance_map((4, 4, 4), "cosine")
    with pytest.raises(SpecError, match="length 4"):
        importance_map((4, 4, 4), "gaussian", profiles=[[1.0] * 4, [1.0] * 3, [1.0] * 4])
    with pytest.raises(SpecError, match="3 values"):
        importance_map((4, 4), "constant")
    with pytest.raises(VolumeError, match="positive"):
        plan_windows((0, 4, 4), InferenceSpec(roi_size=(2, 2, 2)))
    with pytest.raises(SpecError, match="InferenceSpec"):
        plan_windows((4, 4, 4), {"roi_size": [2, 2, 2]})
    with pytest.raises(SpecError, match="size 3 < roi 5"):
        window_starts(3, 5, 1)
