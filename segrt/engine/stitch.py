"""Streaming sliding-window inference: run windows, blend them, hand out finished blocks as soon as they are final.

:func:`sliding_window_blocks` reproduces ``monai.inferers.sliding_window_inference`` (MONAI 1.6.1,
``docs/semantics.md`` §5) bit for bit — same padding, windows, batches, importance map and float32 per-voxel
accumulation order — but holds only the voxels that are *live* (touched by some window, not yet by the last
window that covers them).

**Cells.** Along each axis the unpadded extent is cut at every window start and every window end (and at the
crop bounds). The cuts split the volume into a grid of *cells*; every voxel of a cell is covered by exactly the
same windows, so a cell is final right after its last covering window (in MONAI's C order: axis 0 slowest) has
been added. A cell's accumulator ``(K, dx, dy, dz)`` and count map ``(dx, dy, dz)`` are allocated when its first
window arrives and are divided, handed out and freed right after its last one. Windows are still added one after
another in window order, so every voxel sees MONAI's sequence of float32 additions. Padded voxels are never
stored (they never reach the output). This is a multi-level ring: the cells alive at any moment are

* the axis-0 overlap band left by the previous axis-0 start: ``Ox`` rows over the whole ``Y × Z`` plane, where
  ``Ox = max_g (x_g + roi_x − x_{g+1})`` over consecutive axis-0 starts (``roi_x − interval_x`` except where
  MONAI pulls the last window back to end flush, which makes the last overlap larger);
* inside the current axis-0 start, the axis-1 overlap band of the previous axis-1 start (``rx' · Oy · Z``) and
  inside that the axis-2 band (``rx' · ry' · Oz``) plus the current window (``rx' · ry' · rz``), where ``rx' =
  roi_x − Ox`` etc. are the rows not already counted in an outer band.

**Window order.** ``order="monai"`` visits windows in MONAI's C order. ``order="compact"`` (the default of
:func:`sliding_window_blocks` when ``sw_batch_size`` is 1, where a batch's composition cannot change any network
output) visits them tile by tile, the last two starts of an axis forming one tile where MONAI pulls the last
window back: that keeps the live axis-0 band at the regular overlap instead of the pulled-back one (e.g. 24
instead of 80 rows for 256 voxels, roi 96, overlap 0.25). ``order="compact_yz"`` groups axes 1 and 2 only (axis 0
in MONAI's order). A contribution that reaches a cell before an earlier (MONAI-order) window waits, copied, in
the cell's pending list, so per voxel the additions are still applied in MONAI's order: bit-identical.

**Slabs.** :func:`sliding_window_stream` assembles the blocks into the rows of each axis-0 start and hands the
slabs out strictly in row order. In ``compact`` order the last two axis-0 starts share their tiles: where axis 1
or 2 holds two tiles or more, blocks of the last slab arrive before the slab before it is complete, so both are
open together (a complete slab also waits for every slab before it). That can cost more than the smaller band
saves, so with ``sw_batch_size`` 1 and no ``order`` the stream takes whichever of ``compact``, ``compact_yz``
(one open slab, the pulled-back band) and ``monai`` has the smallest peak below (:func:`stream_order`; results are
bit-identical in every order).

**Memory.** The buffers are exact functions of the cell grid and the window order: see
:mod:`segrt.engine.stitch_memory` (formula and replay), :mod:`segrt.engine.cells` (cell geometry) and
:mod:`segrt.engine.workers` (the gather/infer threads).

**Skipping.** ``skip[i]`` true means window ``i`` is not run: its prediction is the constant logit vector
``0`` for ``background_class`` and ``-margin`` for every other class; it is weighted and added (with its weight in
the count map) exactly like a network output, in its place in the window order. So a voxel covered only by
skipped windows gets the argmax background (softmax ≈ 1 for background), and a voxel also covered by real
windows gets their blend pulled towards background by the skipped windows' share of the weight — as the
network's own confident background prediction for an all-air window would. Network batches are then formed
from the windows that run (full batches of ``sw_batch_size``); without skipping they are MONAI's batches.

**Threads.** With ``threads=True`` a gather thread extracts the next batch, an inference thread runs ``predict``
(ONNX Runtime releases the GIL) and weights the result, and the caller's thread stitches and consumes the previous
one; both helper threads are pinned to one logical CPU per physical core. Results are bit-identical to the
sequential path (same windows, same batches, same additions in the same order). ``predict`` must then return an
array it does not reuse afterwards (ONNX Runtime does).
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterator, Sequence

import numpy as np

from segrt.engine.cells import CellGrid, _planned, _slab_rows
from segrt.engine.stitch_memory import QUOTIENT_CHUNK_VOXELS, _accum, _order_kind, stream_order
from segrt.engine.tiling import WindowPlan, importance_map
from segrt.engine.workers import _threaded, fix_malloc_mmap_threshold
from segrt.errors import InferenceError, SpecError, VolumeError
from segrt.spec import InferenceSpec

__all__ = [
    "sliding_window_blocks",
    "sliding_window_stream",
    "sliding_window_full",
    "weight_batch",
    "SKIP_MARGIN",
]

Predict = Callable[[np.ndarray], np.ndarray]
SKIP_MARGIN = 10.0  # default logit gap background − other classes of a skipped window


def weight_batch(pred: np.ndarray, weight: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = pred * weight`` (weight broadcast over batch and channel), as MONAI's in-place ``pred *= w``.

    ``pred`` (B, K, rx, ry, rz); ``weight`` (rx, ry, rz) float32; ``out`` float32 of ``pred``'s shape.
    A float16 ``pred`` is weighted in float32 and rounded back to float16 (what an in-place multiply of a
    float16 tensor does), then widened; any other dtype is converted to float32 first.
    """
    if pred.dtype == np.float16:
        np.multiply(pred, weight, out=out, dtype=np.float32)
        out[...] = out.astype(np.float16)
    elif pred.dtype == np.float32:
        np.multiply(pred, weight, out=out)
    else:
        np.multiply(pred.astype(np.float32), weight, out=out)
    return out


# ---- windows ----------------------------------------------------------------------------------
def _extract_window(image: np.ndarray, start, plan: WindowPlan, spec: InferenceSpec, out: np.ndarray) -> None:
    """Copy window ``start`` (padded coordinates) of the virtually padded ``image`` into ``out`` (C, rx, ry, rz).

    Padding is never materialised: positions outside the image get ``cval`` (constant) or the nearest edge
    voxel (replicate), exactly what ``F.pad`` followed by slicing gives.
    """
    src, dst = [], []
    for s, r, (lo, _), size in zip(start, plan.roi_size, plan.pads, plan.spatial_shape):
        a = max(s - lo, 0)
        e = min(s - lo + r, size)
        src.append(slice(a, e))
        dst.append(slice(a - (s - lo), e - (s - lo)))
    padded = any(d.start > 0 or d.stop < r for d, r in zip(dst, plan.roi_size))
    if padded and spec.padding_mode == "constant":
        out[...] = np.float32(spec.cval)
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    if padded and spec.padding_mode == "replicate":
        for axis in range(3):
            d = dst[axis]
            idx_lo = [slice(None)] * 4
            idx_src = [slice(None)] * 4
            # axes after `axis` are only filled inside their core so far
            for later in range(axis + 1, 3):
                idx_lo[later + 1] = dst[later]
                idx_src[later + 1] = dst[later]
            if d.start > 0:
                idx_lo[axis + 1] = slice(0, d.start)
                idx_src[axis + 1] = slice(d.start, d.start + 1)
                out[tuple(idx_lo)] = out[tuple(idx_src)]
            if d.stop < plan.roi_size[axis]:
                idx_lo[axis + 1] = slice(d.stop, None)
                idx_src[axis + 1] = slice(d.stop - 1, d.stop)
                out[tuple(idx_lo)] = out[tuple(idx_src)]


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise VolumeError(f"image must be a NumPy array (C, X, Y, Z), got {type(image).__name__}")
    if image.ndim != 4:
        raise VolumeError(f"image must have 4 dimensions (C, X, Y, Z), got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise VolumeError(f"image must hold floating-point values (float32), got dtype {image.dtype}")
    if any(s < 1 for s in image.shape):
        raise VolumeError(f"image must not be empty, got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def sliding_window_blocks(image: np.ndarray, spec: InferenceSpec, predict: Predict, num_classes: int, *,
                          progress: Callable[[int], None] | None = None, accum_dtype="float32",
                          skip: Sequence[bool] | np.ndarray | None = None, background_class: int = 0,
                          skip_margin: float = SKIP_MARGIN, threads: bool = False,
                          inplace_weighting: bool = False, order: str | None = None,
                          grid: CellGrid | None = None) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
    """Sliding-window inference of ``image`` (C, X, Y, Z), streamed as finished blocks.

    ``predict`` maps a float32 batch ``(b, C, rx, ry, rz)`` (``b <= sw_batch_size``; do not keep the array) to
    ``(b, num_classes, rx, ry, rz)`` (float32, or float16, weighted as MONAI weights a float16 output).
    Yields ``((x0, y0, z0), block)``: ``block`` is float32 ``(K, dx, dy, dz)``, the final (count-divided)
    output of that box of the unpadded volume. Blocks tile the volume exactly once; a block is a buffer of the
    stitcher that the consumer may modify (e.g. softmax in place) but must not keep past the next iteration.
    With ``accum_dtype="float32"`` and identical network outputs the assembled result is bit-identical to
    ``monai.inferers.sliding_window_inference`` (``buffer_steps=None``); ``"float16"`` rounds every addition
    to float16 (half the memory; a reduced-precision path). ``skip``: one flag per window (see the module
    docstring). ``threads``: gather / infer ahead in background threads (bit-identical). ``inplace_weighting``:
    weight the array ``predict`` returns in place (it must be a fresh array; saves one batch buffer).
    ``progress(n)`` is called after each batch with the windows handled since the last call (skipped ones
    included); the calls sum to the number of windows. Peak memory: :func:`stitch_peak_bytes` (``slabs=False``).
    """
    image = _check_image(image)
    if not isinstance(spec, InferenceSpec):
        raise SpecError(f"spec must be an InferenceSpec, got {type(spec).__name__}")
    k = int(num_classes)
    if k < 1:
        raise InferenceError(f"num_classes must be >= 1, got {num_classes}")
    acc_t = _accum(accum_dtype)
    fix_malloc_mmap_threshold()
    c = image.shape[0]
    grid = _planned(image.shape[1:], spec, grid)  # the caller's plan (segrt.engine.plan), else planned here
    plan = grid.plan
    roi = plan.roi_size
    bsz = int(spec.sw_batch_size)
    n_win = plan.n_windows
    if skip is None:
        skip_flags = np.zeros(n_win, dtype=bool)
    else:
        skip_flags = np.asarray(skip, dtype=bool).reshape(-1)
        if skip_flags.shape != (n_win,):
            raise InferenceError(f"skip must hold one flag per window ({n_win}), got {skip_flags.shape[0]}")
    bg = int(background_class)
    if skip_flags.any() and not 0 <= bg < k:
        raise SpecError(f"background_class must be in [0, {k}), got {background_class}")

    weight = importance_map(roi, spec.blend_mode, spec.sigma_scale, spec.importance_profiles)
    skip_w = (np.float32(-float(skip_margin)) * weight) if skip_flags.any() else None
    expect = (k, *roi)
    windows = plan.windows
    seq = grid.order(_order_kind(order, spec))
    run = [i for i in seq if not skip_flags[i]]
    batches = [run[b:b + bsz] for b in range(0, len(run), bsz)]

    def gather(bw, out=None):
        buf = np.empty((len(bw), c, *roi), dtype=np.float32) if out is None else out[:len(bw)]
        for j, i in enumerate(bw):
            _extract_window(image, windows[i], plan, spec, buf[j])
        return buf

    weighted_buf = None if (inplace_weighting or threads) else np.empty((bsz, k, *roi), dtype=np.float32)

    def infer(buf):
        pred = predict(buf)
        nb = buf.shape[0]
        if not isinstance(pred, np.ndarray):
            raise InferenceError(f"predict must return a NumPy array, got {type(pred).__name__}")
        if pred.shape != (nb, *expect):
            raise InferenceError(f"predict returned shape {pred.shape}; expected {(nb, *expect)} "
                                 f"(batch, num_classes, *roi_size)")
        if weighted_buf is not None:
            return weight_batch(pred, weight, weighted_buf[:nb])
        if inplace_weighting and pred.dtype == np.float32 and pred.flags.writeable:  # any strides (axes.py)
            return weight_batch(pred, weight, pred)
        return weight_batch(pred, weight, np.empty((nb, *expect), dtype=np.float32))

    if threads and batches:
        source, release = _threaded(batches, gather, infer)
    else:
        in_buf = np.empty((bsz, c, *roi), dtype=np.float32) if batches else None
        source = ((bw, infer(gather(bw, in_buf))) for bw in batches)

        def release():
            return None

    live: dict = {}
    pending = 0  # windows handled since the last progress call

    def apply(acc, cnt, contrib, sub):
        if contrib is None:  # a skipped window: constant logits, 0 for the background, -margin elsewhere
            s = skip_w[sub]
            np.add(acc[:bg], s, out=acc[:bg], casting="unsafe")
            np.add(acc[bg + 1:], s, out=acc[bg + 1:], casting="unsafe")
        else:
            np.add(acc, contrib, out=acc, casting="unsafe")  # float32 + float32 (or rounded to float16)
        np.add(cnt, weight[sub], out=cnt)

    def add(i, wpred):
        """Add window i (weighted prediction, or None when skipped); yield the cells that become final.

        Per cell, contributions are applied in MONAI's window order; one that arrives early (``compact``
        order) waits, copied, in the cell's pending list until the windows before it are in."""
        for key, sub, origin, shape, _ in grid.cells_of(i):
            st = live.get(key)
            if st is None:
                st = live[key] = [np.zeros((k, *shape), dtype=acc_t), np.zeros(shape, dtype=np.float32), 0,
                                  grid.covering(key), {}]
            acc, cnt, pos, exp, pend = st
            contrib = None if wpred is None else wpred[(slice(None), *sub)]
            if exp[pos] == i:
                apply(acc, cnt, contrib, sub)
                pos += 1
                while pos < len(exp) and exp[pos] in pend:
                    c2, s2 = pend.pop(exp[pos])
                    apply(acc, cnt, c2, s2)
                    pos += 1
                st[2] = pos
            else:  # early: wait (float16 mode: rounded to float16 now, as its addition would round anyway)
                pend[i] = (None if contrib is None else contrib.astype(acc_t, copy=True), sub)
            del contrib
            if pos == len(exp):
                del live[key]
                if acc_t is np.float32:
                    out = np.divide(acc, cnt, out=acc)
                    del st, acc
                    yield origin, out
                    del out
                else:  # float32 quotient, a few rows at a time
                    step = max(1, QUOTIENT_CHUNK_VOXELS // (shape[1] * shape[2]))
                    del st
                    for r in range(0, shape[0], step):
                        out = np.divide(acc[:, r:r + step], cnt[r:r + step], dtype=np.float32)
                        yield (origin[0] + r, origin[1], origin[2]), out
                        del out
                    del acc

    si = 0  # position in seq of the next window to add
    try:
        for bw, wb in source:
            for j, i in enumerate(bw):
                while seq[si] != i:  # skipped windows before this one
                    yield from add(seq[si], None)
                    si += 1
                    pending += 1
                yield from add(i, wb[j])
                si += 1
                pending += 1
            del wb
            release()
            if progress is not None:
                progress(pending)
                pending = 0
        while si < n_win:
            yield from add(seq[si], None)
            si += 1
            pending += 1
        if progress is not None and pending:
            progress(pending)
    finally:
        if hasattr(source, "close"):
            source.close()
    if live:  # every cell has a last window; anything left is a bug
        raise InferenceError(f"internal: {len(live)} stitching cell(s) never finished")


def sliding_window_stream(image: np.ndarray, spec: InferenceSpec, predict: Predict, num_classes: int, *,
                          progress: Callable[[int], None] | None = None,
                          transform: Callable[[np.ndarray], object] | None = None,
                          **kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """Sliding-window inference of ``image`` (C, X, Y, Z), streamed as finished slabs of axis-0 rows.

    Yields ``(x0, slab)``: ``slab`` is float32 ``(K, rows, Y, Z)``, the final output for rows ``[x0, x0+rows)``
    of the unpadded volume (the rows of one axis-0 window start); slabs come in increasing ``x0`` and cover every
    row exactly once. The slab is assembled from :func:`sliding_window_blocks` (``kwargs`` are passed on);
    ``transform(block)`` (e.g. an in-place softmax) is applied to each block first. With identical network
    outputs the concatenation is bit-identical to ``monai.inferers.sliding_window_inference``. Any window order
    works: a slab whose blocks arrive early (``compact`` order) is held until every slab before it is out.
    Without ``order`` the stream uses :func:`stream_order`. Peak memory: :func:`stitch_peak_bytes`
    (``slabs=True``, the same ``order``).
    """
    image = _check_image(image)
    grid = kwargs["grid"] = _planned(image.shape[1:], spec, kwargs.get("grid"))
    plan = grid.plan
    k = int(num_classes)
    _, y, z = plan.spatial_shape
    if kwargs.get("order") is None:
        kwargs["order"] = stream_order(image.shape[1:], spec, k, kwargs.get("accum_dtype", "float32"), grid=grid)
    groups = _slab_rows(plan)  # unpadded [lo, hi) of every slab, in row order
    starts = [lo for lo, _ in groups]
    open_slabs: dict[int, list] = {}  # slab index -> [buffer, voxels filled]
    nxt = 0  # the next slab to hand out
    for (x0, y0, z0), block in sliding_window_blocks(image, spec, predict, num_classes, progress=progress,
                                                     **kwargs):
        if transform is not None:
            transform(block)
        dx, dy, dz = block.shape[1:]
        gi = bisect.bisect_right(starts, x0) - 1
        lo, hi = groups[gi] if gi >= 0 else (0, 0)
        inside = lo <= x0 and x0 + dx <= hi and 0 <= y0 and y0 + dy <= y and 0 <= z0 and z0 + dz <= z
        if gi < nxt or not inside:
            raise InferenceError(f"internal: block rows {x0}:{x0 + dx} outside the open slabs "
                                 f"(next slab {groups[nxt] if nxt < len(groups) else None})")
        st = open_slabs.get(gi)
        if st is None:  # compact order: the last slab may start before the one before it is complete
            st = open_slabs[gi] = [np.empty((k, hi - lo, y, z), dtype=np.float32), 0]
        st[0][:, x0 - lo:x0 - lo + dx, y0:y0 + dy, z0:z0 + dz] = block
        st[1] += dx * dy * dz
        del block, st
        # hand out every complete slab in row order (a complete slab waits for the ones before it)
        while nxt in open_slabs and open_slabs[nxt][1] == (groups[nxt][1] - groups[nxt][0]) * y * z:
            out = open_slabs.pop(nxt)[0]
            yield groups[nxt][0], out
            del out
            nxt += 1
    if open_slabs or nxt != len(groups):
        raise InferenceError("internal: the stitcher ended before every row was final")


def sliding_window_full(image: np.ndarray, spec: InferenceSpec, predict: Predict, num_classes: int, *,
                        progress: Callable[[int], None] | None = None, **kwargs) -> np.ndarray:
    """The whole stitched output ``(K, X, Y, Z)`` float32 (assembled from :func:`sliding_window_blocks`)."""
    image = _check_image(image)
    out = np.empty((int(num_classes), *image.shape[1:]), dtype=np.float32)
    for (x0, y0, z0), block in sliding_window_blocks(image, spec, predict, num_classes, progress=progress,
                                                     **kwargs):
        out[:, x0:x0 + block.shape[1], y0:y0 + block.shape[2], z0:z0 + block.shape[3]] = block
    return out
