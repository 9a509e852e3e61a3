"""Streaming stitcher: pointwise consistency, bit-exactness with MONAI, streaming order and memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from segrt.engine.cells import slab_bounds

from segrt.engine.stitch import sliding_window_full, sliding_window_stream

from segrt.engine.stitch_memory import stitch_buffers, stitch_peak_bytes, stream_order, ufunc_scratch_bytes
from segrt.engine.tiling import plan_windows, torch_gaussian_profiles
from segrt.errors import InferenceError, VolumeError
from segrt.spec import InferenceSpec

# K=3 output channels, each a different affine map of the first input channel (+ a mix of the second)
AFFINE = np.array([[2.0, 1.0], [-0.5, 3.0], [1.5, -2.0]], dtype=np.float32)


def pointwise(x: np.ndarray) -> np.ndarray:
    """Pointwise multi-channel predictor: out[:, k] = a_k * x[:, 0] + b_k + 0.25 * x[:, -1]."""
    out = np.empty((x.shape[0], len(AFFINE), *x.shape[2:]), dtype=np.float32)
    for k, (a, b) in enumerate(AFFINE):
        out[:, k] = a * x[:, 0] + b + np.float32(0.25) * x[:, -1]
    return out


def _spec(roi, overlap, mode, pad, bs, cval=0.0):
    return InferenceSpec(roi_size=roi, sw_batch_size=bs, overlap=(overlap,) * 3, blend_mode=mode,
                         padding_mode=pad, cval=cval)


POINTWISE_CASES = [
    # (shape, roi)  -- odd shapes, one axis smaller than the roi, exact fits
    ((23, 17, 19), (12, 10, 8)),
    ((9, 31, 13), (12, 10, 8)),    # axis 0 smaller than roi
    ((40, 5, 16), (16, 16, 16)),   # axis 1 smaller than roi
    ((16, 16, 16), (16, 16, 16)),  # exactly one window
    ((33, 20, 3), (16, 16, 16)),   # two axes small
]


@pytest.mark.parametrize("shape,roi", POINTWISE_CASES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7])
def test_pointwise_predictor_is_reproduced(shape, roi, overlap):
    rng = np.random.default_rng(hash((shape, roi)) % 2**32)
    img = rng.uniform(-2, 2, size=(2, *shape)).astype(np.float32)
    expected = pointwise(img[None])[0]
    for (mode, pad), bs in zip(itertools.product(["constant", "gaussian"], ["constant", "replicate"]),
                               [1, 2, 3, 4]):
        got = sliding_window_full(img, _spec(roi, overlap, mode, pad, bs, cval=0.3), pointwise, 3)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6, err_msg=f"{mode} {pad} bs={bs}")


@pytest.mark.parametrize("shape,roi,overlap,bs", [
    ((37, 21, 15), (12, 10, 8), 0.25, 1),
    ((50, 13, 11), (12, 10, 8), 0.5, 3),
    ((20, 8, 30), (12, 10, 8), 0.7, 4),     # axis 1 smaller than roi: padding
    ((30, 17, 9), (16, 16, 16), 0.25, 2),   # axis 2 smaller than roi
])
def test_bit_identical_to_monai(shape, roi, overlap, bs):
    torch = pytest.importorskip("torch")
    swi = pytest.importorskip("monai.inferers").sliding_window_inference
    torch.set_num_threads(1)
    torch.manual_seed(sum(shape))
    net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()

    def predict(x):
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    rng = np.random.default_rng(sum(shape))
    img = rng.standard_normal((2, *shape)).astype(np.float32)
    profiles = tuple(tuple(p) for p in torch_gaussian_profiles(roi, (0.125,) * 3))
    for mode, pad in itertools.product(["constant", "gaussian"], ["constant", "replicate"]):
        cval = 0.5 if pad == "constant" else 0.0  # torch refuses a value with replicate padding
        spec = InferenceSpec(roi_size=roi, sw_batch_size=bs, overlap=(overlap,) * 3, blend_mode=mode,
                             padding_mode=pad, cval=cval, importance_profiles=profiles)
        with torch.no_grad():
            ref = swi(torch.from_numpy(img)[None], roi, bs, net, overlap=overlap, mode=mode,
                      padding_mode=pad, cval=cval)[0].numpy()
        got = sliding_window_full(img, spec, predict, 3)
        np.testing.assert_array_equal(got, ref, err_msg=f"{mode} {pad}")


def test_float16_outputs_weighted_like_monai():
    """A float16 network output is weighted in place in float16 (docs/semantics.md §5, item 7) before float32 accumulation."""
    torch = pytest.importorskip("torch")
    swi = pytest.importorskip("monai.inferers").sliding_window_inference
    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()

    def half_net(t):
        return net(t).half()

    img = np.random.default_rng(1).standard_normal((1, 30, 14, 12)).astype(np.float32)
    roi = (12, 10, 8)
    spec = InferenceSpec(roi_size=roi, sw_batch_size=2, overlap=(0.5,) * 3, blend_mode="gaussian",
                         importance_profiles=tuple(tuple(p) for p in torch_gaussian_profiles(roi, (0.125,) * 3)))
    with torch.no_grad():
        ref = swi(torch.from_numpy(img)[None], roi, 2, half_net, overlap=0.5, mode="gaussian")[0].numpy()
        got = sliding_window_full(img, spec, lambda x: half_net(torch.from_numpy(x)).numpy(), 2)
    assert ref.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shape,roi,overlap,bs", [
    ((61, 12, 9), (12, 10, 8), 0.25, 1),
    ((61, 12, 9), (12, 10, 8), 0.7, 4),
    ((7, 12, 9), (12, 10, 8), 0.5, 2),  # axis 0 padded: one slab
    ((12, 3, 3), (12, 10, 8), 0.0, 3),
])
def test_stream_yields_every_row_once_in_order(shape, roi, overlap, bs):
    img = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    spec = _spec(roi, overlap, "gaussian", "replicate", bs)
    plan = plan_windows(shape, spec)
    done = []
    rows = []
    for x0, slab in sliding_window_stream(img, spec, pointwise, 3, progress=done.append):
        assert slab.dtype == np.float32 and slab.shape[0] == 3 and slab.shape[2:] == shape[1:]
        rows.extend(range(x0, x0 + slab.shape[1]))
        np.testing.assert_allclose(slab, pointwise(img[None])[0, :, x0:x0 + slab.shape[1]], rtol=2e-6, atol=2e-6)
    assert rows == list(range(shape[0]))
    assert done == [min(bs, plan.n_windows - b) for b in range(0, plan.n_windows, bs)]
    assert sum(done) == plan.n_windows


def test_slabs_are_emitted_before_the_end():
    """Streaming: the first slab is available after the first axis-0 row of windows, not at the end."""
    shape, roi = (80, 12, 9), (12, 10, 8)
    spec = _spec(roi, 0.25, "constant", "constant", 1)
    plan = plan_windows(shape, spec)
    calls = []

    def counting(x):
        calls.append(len(x))
        return pointwise(x)

    img = np.zeros((1, *shape), dtype=np.float32)
    gen = sliding_window_stream(img, spec, counting, 3)
    x0, slab = next(gen)
    per_x = len(plan.starts[1]) * len(plan.starts[2])
    assert x0 == 0 and slab.shape[1] == plan.starts[0][1]
    assert sum(calls) == per_x < plan.n_windows
    assert len(slab_bounds(plan)) == len(plan.starts[0])


def test_stream_compact_order_last_slabs_interleaved():
    """Regression: with sw_batch_size 1 the "compact" order visits the last two axis-0 starts (the last one pulled
    back: 28 after 27) together, tile by tile over axes 1/2 (three tiles each), so blocks of the last slab arrive
    before the slab before it is complete. The stream kept one open slab and crashed (broadcast ValueError); now
    the slabs come in row order and equal sliding_window_full bit for bit, in every order."""
    shape = (40, 30, 30)
    spec = InferenceSpec(roi_size=(12, 12, 12), overlap=(0.25, 0.25, 0.25))
    plan = plan_windows(shape, spec)
    assert plan.starts[0][-2:] == (27, 28) and len(plan.starts[1]) == 3
    assert stream_order(shape, spec, 3) == "compact"  # the default order of the stream hits the case
    img = np.random.default_rng(5).standard_normal((2, *shape)).astype(np.float32)
    full = sliding_window_full(img, spec, pointwise, 3)
    for kw in ({}, {"order": "compact"}, {"order": "compact", "threads": True}, {"order": "compact_yz"},
               {"order": "monai"}):
        nxt, parts = 0, []
        for x0, slab in sliding_window_stream(img, spec, pointwise, 3, **kw):
            assert x0 == nxt and slab.shape[1] == next(e for a, e in slab_bounds(plan) if a == x0) - x0, kw
            parts.append(slab.copy())
            nxt += slab.shape[1]
        assert nxt == shape[0]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), full, err_msg=str(kw))


class _NoAllocPredictor:
    """Pointwise predictor writing into one preallocated buffer, so that it allocates nothing per call."""

    def __init__(self, bs, k, roi):
        self.buf = np.empty((bs, k, *roi), dtype=np.float32)

    def __call__(self, x):
        out = self.buf[: len(x)]
        for k in range(out.shape[1]):
            np.multiply(x[:, 0], np.float32(k + 1), out=out[:, k])
            np.add(out[:, k], np.float32(k), out=out[:, k])
        return out


def _stream_rows_and_peak(stream, check=None) -> tuple[int, int]:
    """Consume ``stream`` (slabs in row order, each checked by ``check(x0, slab)``) under tracemalloc: the rows
    handed out and the peak of traced bytes above the start."""
    from parity_util import traced_peak

    rows = [0]

    def visit(x0, slab):
        assert x0 == rows[0]
        rows[0] += slab.shape[1]
        if check is not None:
            check(x0, slab)
        return slab.shape[1]

    return traced_peak(stream, visit)


def test_peak_memory_matches_formula_and_is_small():
    shape, roi, k, bs = (400, 40, 36), (16, 16, 16), 4, 2
    spec = _spec(roi, 0.5, "gaussian", "constant", bs)
    img = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    predictor = _NoAllocPredictor(bs, k, roi)
    predicted = stitch_peak_bytes(shape, spec, k, in_channels=1)
    full_volume = 4 * k * int(np.prod(shape))

    def check(x0, slab):  # a few voxels: (k+1)*x + k
        assert np.allclose(slab[:, :, 7, 5], (np.arange(k)[:, None] + 1) * img[0, x0:x0 + slab.shape[1], 7, 5]
                           + np.arange(k)[:, None], rtol=1e-6, atol=1e-6)

    n_rows, peak = _stream_rows_and_peak(sliding_window_stream(img, spec, predictor, k), check)
    assert n_rows == shape[0]
    # the formula accounts for every buffer; its ufunc-scratch and Python-bookkeeping terms are upper bounds
    assert predicted - ufunc_scratch_bytes() - 64 * 1024 <= peak <= predicted + 16 * 1024, (peak, predicted)
    assert peak < full_volume / 8, (peak, full_volume)


@pytest.mark.parametrize("order", ["compact", None])
def test_stream_peak_memory_with_two_open_slabs(order):
    """In compact order the last two slabs (3 + 16 rows here) are open together: the formula counts both and the
    measured peak stays within it; without an order the stream takes the cheaper one (one open slab here)."""
    shape, roi, k = (403, 40, 36), (16, 16, 16), 4
    spec = _spec(roi, 0.5, "gaussian", "constant", 1)
    plan = plan_windows(shape, spec)
    assert plan.starts[0][-2:] == (384, 387) and len(plan.starts[1]) == 4
    y, z = shape[1:]
    terms = stitch_buffers(shape, spec, k, slabs=True, order=order)
    one_slab = 4 * k * 16 * y * z
    assert terms["slab"] == (4 * k * (3 + 16) * y * z if order == "compact" else one_slab)
    totals = {o: stitch_peak_bytes(shape, spec, k, order=o) for o in ("compact", "compact_yz", "monai")}
    assert stitch_peak_bytes(shape, spec, k) == min(totals.values()) < totals["compact"]
    assert stream_order(shape, spec, k) == "compact_yz"
    img = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    predictor = _NoAllocPredictor(1, k, roi)
    for _ in sliding_window_stream(img[:, :40], spec, predictor, k, order=order):  # one-time allocations
        pass
    predicted = sum(terms.values())
    n_rows, peak = _stream_rows_and_peak(sliding_window_stream(img, spec, predictor, k, order=order))
    assert n_rows == shape[0]
    assert predicted - ufunc_scratch_bytes() - 64 * 1024 <= peak <= predicted + 16 * 1024, (peak, predicted)


def test_peak_formula_scales_with_roi_not_height():
    spec = _spec((16, 16, 16), 0.25, "constant", "constant", 1)
    short = stitch_buffers((64, 40, 40), spec, 5)
    tall = stitch_buffers((4000, 40, 40), spec, 5)
    # every buffer is independent of the height; only the Python list of windows grows with it
    assert {k: v for k, v in short.items() if k != "bookkeeping"} == \
        {k: v for k, v in tall.items() if k != "bookkeeping"}
    assert tall["cells"] > 0 and tall["bookkeeping"] > short["bookkeeping"]


def test_invalid_inputs_raise():
    spec = _spec((8, 8, 8), 0.25, "constant", "constant", 2)
    img = np.zeros((1, 10, 10, 10), dtype=np.float32)
    with pytest.raises(VolumeError, match="4 dimensions"):
        sliding_window_full(img[0], spec, pointwise, 3)
    with pytest.raises(VolumeError, match="floating"):
        sliding_window_full(img.astype(np.int16), spec, pointwise, 3)
    with pytest.raises(InferenceError, match=r"expected \(2, 2, 8, 8, 8\)"):
        sliding_window_full(img, spec, pointwise, 2)
    with pytest.raises(InferenceError, match="NumPy array"):
        sliding_window_full(img, spec, lambda x: x.tolist(), 1)


def test_runtime_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, segrt.engine.stitch, segrt.engine.tiling, segrt.engine.resample; "
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": root})
    assert res.returncode == 0, res.stderr
