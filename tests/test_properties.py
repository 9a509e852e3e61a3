"""Property-based tests (hypothesis) of the sliding-window grid and the streaming stitcher.

Arbitrary small geometries — spatial shapes up to 24 per axis (often smaller than the ROI on some axes), ROIs up
to 12, per-axis overlaps in [0, 1), both blend modes, both padding modes, ``sw_batch_size`` 1..3 — against
invariants that must hold for every one of them:

* the window grid covers the padded volume, stays inside it, is sorted and flush with the end, and holds the
  product of the per-axis counts (and, when MONAI is importable, equals MONAI's own grid);
* the importance map is positive, finite, float32 and of the ROI's shape;
* a pointwise "network" stitched through the streaming stitcher (blocks, slabs, whole volume) reproduces the
  same pointwise function applied to the whole unpadded volume, whatever the padding;
* options documented as bit-identical (threads, window order, in-place weighting, an all-False skip mask, slabs
  vs blocks) are bit-identical; skipped windows blend exactly like a network that outputs the skip logits.

Every test is derandomized and has no example database, so a run is reproducible and writes nothing; nothing
depends on timing or on the CPU's SIMD path (all comparisons between two stitcher runs use the same kernels).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from segrt.engine.cells import CellGrid, slab_bounds, window_maxima

from segrt.engine.stitch import SKIP_MARGIN, sliding_window_blocks, sliding_window_full, sliding_window_stream

from segrt.engine.stitch_memory import stitch_buffers, stream_order
from segrt.engine.tiling import importance_map, pad_widths, plan_windows, scan_interval, window_starts
from segrt.spec import InferenceSpec


def _settings(n: int, **kw):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], **kw)


# ---- strategies -------------------------------------------------------------------------------
# overlaps: arbitrary floats in [0, 1) plus the values that hit edge cases of int(roi * (1 - overlap))
overlap_1d = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 0.999]),
                       st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
triple = lambda s: st.tuples(s, s, s)  # noqa: E731


@st.composite
def geometries(draw, max_shape=24, max_roi=12, max_windows=None):
    """(shape, InferenceSpec) with per-axis overlaps; ``max_windows`` bounds the window count (stitcher tests)."""
    roi = draw(triple(st.integers(1, max_roi)))
    shape = draw(triple(st.integers(1, max_shape)))
    overlap = draw(triple(overlap_1d))
    spec = InferenceSpec(
        roi_size=roi, overlap=overlap,
        sw_batch_size=draw(st.integers(1, 3)),
        blend_mode=draw(st.sampled_from(["constant", "gaussian"])),
        sigma_scale=draw(triple(st.sampled_from([0.125, 0.25, 0.5, 1.0]))),
        padding_mode=(pad := draw(st.sampled_from(["constant", "replicate"]))),
        cval=draw(st.sampled_from([0.0, 0.5, -3.0])) if pad == "constant" else 0.0,
    )
    if max_windows is not None:
        assume(plan_windows(shape, spec).n_windows <= max_windows)
    return shape, spec


def _image(shape, channels, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-2.0, 2.0, size=(channels, *shape)).astype(np.float32)


K = 3


def pointwise(x: np.ndarray) -> np.ndarray:
    """A per-voxel "network": out = [x0, 2·x0 + 1, 0.5·x_last − x0] (a fresh float32 array every call)."""
    x0, xl = x[:, 0], x[:, -1]
    return np.stack([x0, np.float32(2) * x0 + np.float32(1), np.float32(0.5) * xl - x0], axis=1)


def _assemble(blocks, k, shape):
    """Assemble yielded blocks into a volume, checking that they tile it exactly once."""
    out = np.full((k, *shape), np.nan, dtype=np.float32)
    hits = np.zeros(shape, dtype=np.int32)
    for (x0, y0, z0), block in blocks:
        assert block.dtype == np.float32 and block.ndim == 4 and block.shape[0] == k
        dx, dy, dz = block.shape[1:]
        assert dx >= 1 and dy >= 1 and dz >= 1
        assert 0 <= x0 and x0 + dx <= shape[0] and 0 <= y0 and y0 + dy <= shape[1] and 0 <= z0 and z0 + dz <= shape[2]
        out[:, x0:x0 + dx, y0:y0 + dy, z0:z0 + dz] = block
        hits[x0:x0 + dx, y0:y0 + dy, z0:z0 + dz] += 1
    assert (hits == 1).all(), "blocks must tile the volume exactly once"
    return out


def _assemble_slabs(slabs, k, shape):
    """Assemble yielded slabs, checking that they come in row order and cover every row exactly once."""
    parts, nxt = [], 0
    for x0, slab in slabs:
        assert x0 == nxt, (x0, nxt)
        assert slab.dtype == np.float32 and slab.shape[0] == k and slab.shape[2:] == tuple(shape[1:])
        assert slab.shape[1] >= 1
        parts.append(slab.copy())
        nxt += slab.shape[1]
    assert nxt == shape[0]
    return np.concatenate(parts, axis=1)


def _close(got, want):
    # weighted average of identical float32 values: a few ulps of |value| (values are O(1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- 1. the window grid ---------------------------------------------------------------------------
@_settings(300)
@given(geometries())
def test_window_grid_covers_padded_volume(geo):
    shape, spec = geo
    roi = spec.roi_size
    plan = plan_windows(shape, spec)

    # padding: to max(size, roi), the odd voxel at the high end; the crop gives back the volume
    assert plan.pads == pad_widths(shape, roi)
    for (lo, hi), s, r, p in zip(plan.pads, shape, roi, plan.padded_shape):
        assert lo >= 0 and hi >= 0 and lo + hi == max(r - s, 0) and hi - lo in (0, 1)
        assert p == max(s, r) == s + lo + hi
    assert tuple(c.stop - c.start for c in plan.crop) == tuple(shape)

    # intervals: MONAI's formula, always >= 1
    assert plan.interval == scan_interval(plan.padded_shape, roi, spec.overlap)
    for iv, r, p, o in zip(plan.interval, roi, plan.padded_shape, spec.overlap):
        assert iv == (r if r == p else max(int(r * (1 - o)), 1)) and iv >= 1

    for ax in range(3):
        starts, r, p, iv = plan.starts[ax], roi[ax], plan.padded_shape[ax], plan.interval[ax]
        assert starts == window_starts(p, r, iv)
        assert len(starts) >= 1 and starts[0] == 0
        assert all(b > a for a, b in zip(starts, starts[1:])), "starts strictly increasing"
        assert all(b - a <= iv for a, b in zip(starts, starts[1:])), "steps of at most one interval"
        assert starts[-1] + r == p, "last window flush with the end"
        assert all(0 <= s and s + r <= p for s in starts), "windows inside the padded volume"
        if len(starts) >= 2:  # minimal count: the window before the last does not reach the end yet
            assert starts[-2] + r < p
        # every padded voxel of this axis is covered (windows are the Cartesian product of the axes)
        cov = np.zeros(p, dtype=np.int32)
        for s in starts:
            cov[s:s + r] += 1
        assert cov.min() >= 1

    counts = [len(s) for s in plan.starts]
    assert plan.n_windows == len(plan.windows) == counts[0] * counts[1] * counts[2]
    assert list(plan.windows) == list(itertools.product(*plan.starts)), "C order, axis 0 slowest"

    if plan.n_windows <= 1500:  # the same, voxel by voxel in 3-D
        cov3 = np.zeros(plan.padded_shape, dtype=np.int32)
        for x, y, z in plan.windows:
            cov3[x:x + roi[0], y:y + roi[1], z:z + roi[2]] += 1
        assert cov3.min() >= 1


@_settings(150)
@given(geometries())
def test_window_grid_matches_monai(geo):
    """The same geometry as MONAI 1.6.1's ``_get_scan_interval`` + ``dense_patch_slices`` (when installed)."""
    utils = pytest.importorskip("monai.data.utils")
    inf_utils = pytest.importorskip("monai.inferers.utils")
    shape, spec = geo
    plan = plan_windows(shape, spec)
    image_size = tuple(max(s, r) for s, r in zip(shape, spec.roi_size))
    iv = inf_utils._get_scan_interval(image_size, spec.roi_size, 3, spec.overlap)
    assert plan.interval == tuple(iv)
    slices = utils.dense_patch_slices(image_size, spec.roi_size, iv)
    assert list(plan.windows) == [tuple(s.start for s in sl) for sl in slices]


@_settings(150)
@given(geometries(max_shape=16, max_roi=8))
def test_cell_grid_partitions_volume(geo):
    """Cells tile the unpadded volume; each cell is covered exactly by the windows ``covering`` lists (in C
    order); the last of them is the one ``cells_of`` marks final; ``compact`` order is a permutation."""
    shape, spec = geo
    plan = plan_windows(shape, spec)
    assume(plan.n_windows <= 300)
    grid = CellGrid(plan)
    for ax in range(3):
        b = grid.axes[ax].bounds
        assert b[0][0] == 0 and b[-1][1] == shape[ax]
        assert all(e > a for a, e in b) and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    lo = [p[0] for p in plan.pads]
    roi = plan.roi_size

    def contains(i, key):
        w = plan.windows[i]
        return all(w[d] <= grid.axes[d].bounds[key[d]][0] + lo[d]
                   and grid.axes[d].bounds[key[d]][1] + lo[d] <= w[d] + roi[d] for d in range(3))

    keys = list(itertools.product(*(range(len(a.bounds)) for a in grid.axes)))
    for key in keys:
        cov = grid.covering(key)
        assert cov == [i for i in range(plan.n_windows) if contains(i, key)]
        assert cov, "every cell is covered by some window"
    seen_final = {}
    for i in range(plan.n_windows):
        for key, sub, origin, cshape, final in grid.cells_of(i):
            assert contains(i, key)
            for d in range(3):
                assert sub[d].stop - sub[d].start == cshape[d]
                assert origin[d] + lo[d] - plan.windows[i][d] == sub[d].start
            assert final == (grid.covering(key)[-1] == i)
            if final:
                seen_final[key] = i
    assert set(seen_final) == set(keys)
    for kind in ("monai", "compact", "compact_yz"):
        assert sorted(grid.order(kind)) == list(range(plan.n_windows))


# ---- 2. the importance map ------------------------------------------------------------------------
@_settings(200)
@given(triple(st.integers(1, 12)), st.sampled_from(["constant", "gaussian"]),
       triple(st.one_of(st.sampled_from([0.125, 1.0]), st.floats(0.01, 4.0, allow_nan=False))))
def test_importance_map_positive_finite(roi, mode, sigma):
    m = importance_map(roi, mode, sigma)
    assert m.dtype == np.float32 and m.shape == tuple(roi)
    assert np.isfinite(m).all() and (m > 0).all()
    assert m.min() >= np.float32(1e-3) and m.max() <= 1
    if mode == "constant":
        assert (m == 1).all()
    else:  # the Gaussian is centred: exactly symmetric along each axis, maximal in the centre
        for ax in range(3):
            np.testing.assert_array_equal(m, np.flip(m, axis=ax))
        assert m[tuple(r // 2 for r in roi)] == m.max()


# ---- 3. pointwise predictor through the stitcher ----------------------------------------------------
STITCH = geometries(max_shape=20, max_roi=10, max_windows=80)


@_settings(100)
@given(STITCH, st.integers(1, 2), st.integers(0, 2**16))
def test_pointwise_blocks_and_stream_reproduce_function(geo, channels, seed):
    shape, spec = geo
    img = _image(shape, channels, seed)
    want = pointwise(img[None])[0]
    plan = plan_windows(shape, spec)

    calls = []
    blocks = _assemble(sliding_window_blocks(img, spec, pointwise, K, progress=calls.append), K, shape)
    _close(blocks, want)
    assert sum(calls) == plan.n_windows

    slabs = _assemble_slabs(sliding_window_stream(img, spec, pointwise, K), K, shape)
    np.testing.assert_array_equal(slabs, blocks)
    # one slab per axis-0 start that owns unpadded rows
    low = plan.pads[0][0]
    n_slabs = sum(1 for a, e in slab_bounds(plan) if min(e - low, shape[0]) > max(a - low, 0))
    assert len(list(sliding_window_stream(img, spec, pointwise, K))) == n_slabs

    full = sliding_window_full(img, spec, pointwise, K)
    np.testing.assert_array_equal(full, blocks)

    # float16 accumulation: every addition rounds the running sum (|sum| <= count · max|value|) to 2^-11
    half = _assemble(sliding_window_blocks(img, spec, pointwise, K, accum_dtype="float16"), K, shape)
    cover = np.zeros(plan.padded_shape, dtype=np.int32)
    for x, y, z in plan.windows:
        cover[x:x + spec.roi_size[0], y:y + spec.roi_size[1], z:z + spec.roi_size[2]] += 1
    bound = cover[plan.crop].max() * float(np.abs(want).max()) * 2.0 ** -11 * 1.01 + 1e-6
    assert float(np.abs(half - want).max()) <= bound


@_settings(60)
@given(STITCH, st.integers(0, 2**16))
def test_pointwise_bit_identical_across_options(geo, seed):
    """threads, in-place weighting, window order and an all-False skip mask change nothing, bit for bit."""
    shape, spec = geo
    img = _image(shape, 2, seed)
    plan = plan_windows(shape, spec)
    ref = sliding_window_full(img, spec, pointwise, K)
    _close(ref, pointwise(img[None])[0])
    variants = [
        dict(threads=True),
        dict(inplace_weighting=True),
        dict(order="monai"),
        dict(order="compact"),
        dict(order="compact_yz"),
        dict(skip=np.zeros(plan.n_windows, dtype=bool)),
        dict(skip=[False] * plan.n_windows, threads=True, order="compact"),
    ]
    for kw in variants:
        np.testing.assert_array_equal(sliding_window_full(img, spec, pointwise, K, **kw), ref, err_msg=str(kw))
    for order in ("monai", "compact"):
        slabs = _assemble_slabs(sliding_window_stream(img, spec, pointwise, K, threads=True, order=order,
                                                      skip=np.zeros(plan.n_windows, dtype=bool)), K, shape)
        np.testing.assert_array_equal(slabs, ref, err_msg=order)


# Regression: in "compact" order (the default of the blocks when sw_batch_size == 1) the last two axis-0 starts
# are visited together, tile by tile over axes 1/2, when the last one is pulled back; with >= 2 such tiles blocks
# of the last slab arrive before the slab before it is complete. The stream used to keep one open slab and crashed
# (InferenceError 'block rows .. outside slab ..', or a broadcast ValueError); it now holds both and hands them
# out in row order.
@_settings(30, report_multiple_bugs=False)
@example(((3, 1, 2), InferenceSpec(roi_size=(2, 1, 1), overlap=(0.0, 0.0, 0.0))), 0)
@example(((40, 30, 30), InferenceSpec(roi_size=(12, 12, 12), overlap=(0.25, 0.25, 0.25))), 0)
@given(STITCH, st.integers(0, 2**16))
def test_stream_compact_order(geo, seed):
    """The stream in every order (and in its default one) equals the blocks, bit for bit, slabs in row order."""
    shape, spec = geo
    img = _image(shape, 1, seed)
    want = _assemble(sliding_window_blocks(img, spec, pointwise, K, order="compact"), K, shape)
    for order in ("compact", "compact_yz", "monai", None):
        got = _assemble_slabs(sliding_window_stream(img, spec, pointwise, K, order=order), K, shape)
        np.testing.assert_array_equal(got, want, err_msg=str(order))


def _open_slab_rows(blocks, plan):
    """Most rows of slabs open at once when the blocks arrive in this order: a slab opens with its first block and
    is handed out once complete and every slab before it is out (what sliding_window_stream does)."""
    low, (x, y, z) = plan.pads[0][0], plan.spatial_shape
    rows = [(max(a - low, 0), min(e - low, x)) for a, e in slab_bounds(plan)]
    rows = [(a, e) for a, e in rows if e > a]
    filled, nxt, cur, peak = {}, 0, 0, 0
    for (x0, _, _), block in blocks:
        gi = max(i for i, (a, _) in enumerate(rows) if a <= x0)
        assert gi >= nxt, "a block of a slab already handed out"
        if gi not in filled:
            filled[gi] = 0
            cur += rows[gi][1] - rows[gi][0]
            peak = max(peak, cur)
        filled[gi] += block[0].size
        while nxt in filled and filled[nxt] == (rows[nxt][1] - rows[nxt][0]) * y * z:
            cur -= rows[nxt][1] - rows[nxt][0]
            del filled[nxt]
            nxt += 1
    assert nxt == len(rows) and not filled
    return peak


@_settings(40)
@given(STITCH)
def test_slab_memory_term_replays_block_order(geo):
    """The slab term of the memory formula is the most rows the stream holds at once in each order (two slabs in
    compact order where the last two axis-0 starts share their tiles), and the stream's default order has the
    smallest peak of all orders."""
    shape, spec = geo
    plan = plan_windows(shape, spec)
    img = _image(shape, 1, 3)
    y, z = shape[1:]
    totals = {}
    for order in ("compact", "compact_yz", "monai"):
        rows = _open_slab_rows(sliding_window_blocks(img, spec, pointwise, K, order=order), plan)
        terms = stitch_buffers(shape, spec, K, slabs=True, order=order)
        assert terms["slab"] == 4 * K * rows * y * z, order
        assert rows >= max(e - a for a, e in slab_bounds(plan)) or plan.pads[0] != (0, 0)
        totals[order] = sum(terms.values())
    default = stitch_buffers(shape, spec, K, slabs=True)
    if spec.sw_batch_size == 1:
        assert stream_order(shape, spec, K) in totals
        assert sum(default.values()) == min(totals.values())
    else:
        assert stream_order(shape, spec, K) == "monai" and sum(default.values()) == totals["monai"]


@st.composite
def small_volumes(draw):
    """Geometries where the volume is smaller than the ROI on at least one axis, with replicate padding."""
    roi = draw(triple(st.integers(2, 10)))
    forced = draw(st.integers(0, 2))
    small = [draw(st.booleans()) or ax == forced for ax in range(3)]
    shape = tuple(draw(st.integers(1, r - 1)) if sm else draw(st.integers(1, 20)) for r, sm in zip(roi, small))
    spec = InferenceSpec(roi_size=roi, overlap=draw(triple(overlap_1d)), sw_batch_size=draw(st.integers(1, 3)),
                         blend_mode=draw(st.sampled_from(["constant", "gaussian"])), padding_mode="replicate")
    assume(plan_windows(shape, spec).n_windows <= 80)
    return shape, spec


@_settings(60)
@given(small_volumes(), st.integers(0, 2**16))
def test_pointwise_with_replicate_padding_smaller_than_roi(geo, seed):
    shape, spec = geo
    plan = plan_windows(shape, spec)
    assert any(p > s for p, s in zip(plan.padded_shape, shape))
    img = _image(shape, 2, seed)
    want = pointwise(img[None])[0]
    _close(_assemble(sliding_window_blocks(img, spec, pointwise, K), K, shape), want)
    _close(_assemble_slabs(sliding_window_stream(img, spec, pointwise, K), K, shape), want)


# ---- 4. skipping, window maxima -------------------------------------------------------------------
@_settings(60)
@given(STITCH, st.integers(0, 2), st.sampled_from([SKIP_MARGIN, 3.0]), st.data())
def test_skipped_window_equals_network_outputting_skip_logits(geo, bg, margin, data):
    """A skipped window adds the constant logits (0 for background, -margin elsewhere) weighted like a network
    output: with a network that outputs exactly those logits, any skip mask gives the same result, bit for bit;
    with every window skipped the network is never called and the output is those logits."""
    shape, spec = geo
    plan = plan_windows(shape, spec)
    logits = np.full(K, -np.float32(margin), dtype=np.float32)
    logits[bg] = 0

    def const(x):
        return np.broadcast_to(logits[None, :, None, None, None], (x.shape[0], K, *x.shape[2:])).copy()

    img = _image(shape, 1, 0)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=plan.n_windows, max_size=plan.n_windows)))
    ref = sliding_window_full(img, spec, const, K)
    got = sliding_window_full(img, spec, const, K, skip=mask, background_class=bg, skip_margin=margin)
    np.testing.assert_array_equal(got, ref)

    def never(x):
        raise AssertionError("predict called although every window is skipped")

    calls = []
    allskip = sliding_window_full(img, spec, never, K, skip=np.ones(plan.n_windows, bool), background_class=bg,
                                  skip_margin=margin, progress=calls.append)
    assert sum(calls) == plan.n_windows
    _close(allskip, np.broadcast_to(logits[:, None, None, None], allskip.shape))
    assert (allskip[bg] == 0).all()


@_settings(60)
@given(STITCH, st.data())
def test_skip_only_changes_voxels_of_skipped_windows(geo, data):
    """Voxels covered by no skipped window get exactly the unskipped result (same additions, same order)."""
    shape, spec = geo
    plan = plan_windows(shape, spec)
    img = _image(shape, 2, 7)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=plan.n_windows, max_size=plan.n_windows)))
    ref = sliding_window_full(img, spec, pointwise, K)
    got = sliding_window_full(img, spec, pointwise, K, skip=mask)
    touched = np.zeros(plan.padded_shape, dtype=bool)
    roi = plan.roi_size
    for (x, y, z), s in zip(plan.windows, mask):
        if s:
            touched[x:x + roi[0], y:y + roi[1], z:z + roi[2]] = True
    untouched = ~touched[plan.crop]
    np.testing.assert_array_equal(got[:, untouched], ref[:, untouched])


@_settings(100)
@given(geometries(max_windows=400), st.integers(1, 2), st.integers(0, 2**16))
def test_window_maxima_brute_force(geo, channels, seed):
    shape, spec = geo
    plan = plan_windows(shape, spec)
    img = _image(shape, channels, seed)
    got = window_maxima(img, plan)
    assert got.shape == (plan.n_windows,)
    roi = plan.roi_size
    for i, w in enumerate(plan.windows):
        sl = tuple(slice(max(s - lo, 0), min(s - lo + r, n)) for s, r, (lo, _), n in zip(w, roi, plan.pads, shape))
        assert got[i] == img[(slice(None), *sl)].max()
