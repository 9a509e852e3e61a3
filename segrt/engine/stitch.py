"""Streaming sliding-window inference: run windows, blend them, hand out finished slabs of rows.

:func:`sliding_window_stream` reproduces ``monai.inferers.sliding_window_inference`` (MONAI 1.6.1,
``MONAI_NOTES.md`` §5) bit for bit — same padding, windows, batches, importance map and float32
accumulation order — but never holds the whole output volume. Windows come in C order (axis 0 slowest),
so once every window with a given axis-0 start has been added, the rows below the next axis-0 start can no
longer change: they are divided by the count map, yielded and their ring rows are reused.

Memory (the stitcher's own buffers, float32)::

    peak = 4 · [ (K+1) · Rx · Yp · Zp          # ring: accumulator (K channels) + count map, Rx = roi_x
               + rx·ry·rz                      # importance map
               + B · (C + K) · rx·ry·rz        # input batch + weighted prediction batch (B = sw_batch_size)
               + K · S · Y · Z ]               # one finished slab, S = most rows in one slab
         + 3 · np.getbufsize() · 4            # NumPy ufunc iteration buffers (broadcast/strided ops), 96 KiB

``Yp, Zp`` are the padded sizes (``max(size, roi)``). ``S`` is the largest of the first axis-0 interval and
the final ``roi_x`` rows (both cropped to the unpadded volume); the ufunc term is an upper bound (NumPy
allocates those transient buffers only for some operand layouts). Not counted: the input image itself and the
arrays ``predict`` returns (a float16 one adds a transient ``2·B·K·rx·ry·rz`` while it is weighted); every
slab the consumer keeps adds ``4·K·rows·Y·Z``.
:func:`stitch_peak_bytes` evaluates the formula. The full-volume alternative needs ``4·(K+1)·Xp·Yp·Zp``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from segrt.errors import InferenceError, SpecError, VolumeError
from segrt.engine.tiling import WindowPlan, importance_map, plan_windows
from segrt.kernels.stitch_ref import accumulate_windows, clear_rows, finalize_rows, weight_batch
from segrt.spec import InferenceSpec

__all__ = ["sliding_window_stream", "sliding_window_full", "stitch_peak_bytes", "ufunc_scratch_bytes", "slab_bounds"]

Predict = Callable[[np.ndarray], np.ndarray]


def slab_bounds(plan: WindowPlan) -> list[tuple[int, int]]:
    """Padded axis-0 row ranges ``[lo, hi)`` finished after each axis-0 start, in order."""
    sx = plan.starts[0]
    xp = plan.padded_shape[0]
    return [(sx[i], sx[i + 1] if i + 1 < len(sx) else xp) for i in range(len(sx))]


def _unpadded_rows(plan: WindowPlan, lo: int, hi: int) -> tuple[int, int]:
    low = plan.pads[0][0]
    x = plan.spatial_shape[0]
    return max(lo - low, 0), min(hi - low, x)


def stitch_peak_bytes(spatial_shape, spec: InferenceSpec, num_classes: int, in_channels: int = 1) -> int:
    """Peak bytes of the stitcher's buffers for a volume of ``spatial_shape`` (see the module docstring)."""
    plan = plan_windows(spatial_shape, spec)
    k, c, b = int(num_classes), int(in_channels), int(spec.sw_batch_size)
    rx, ry, rz = plan.roi_size
    _, yp, zp = plan.padded_shape
    _, y, z = plan.spatial_shape
    win = rx * ry * rz
    rows = max(hi - lo for lo, hi in (_unpadded_rows(plan, a, e) for a, e in slab_bounds(plan)))
    return 4 * ((k + 1) * rx * yp * zp + win + b * (c + k) * win + k * rows * y * z) + ufunc_scratch_bytes()


def ufunc_scratch_bytes() -> int:
    """Upper bound of NumPy's transient ufunc iteration buffers in one kernel call (3 float32 operands)."""
    return 3 * np.getbufsize() * 4


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


def sliding_window_stream(image: np.ndarray, spec: InferenceSpec, predict: Predict, num_classes: int, *,
                          progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Sliding-window inference of ``image`` (C, X, Y, Z), streamed as finished slabs of axis-0 rows.

    ``predict`` maps a float32 batch ``(b, C, rx, ry, rz)`` (``b <= sw_batch_size``; the array is reused
    between calls, do not keep it) to ``(b, num_classes, rx, ry, rz)`` (float32, or float16, weighted as
    MONAI weights a float16 output). Yields ``(x0, slab)``: ``slab`` is float32 ``(K, rows, Y, Z)``, the final
    (count-divided) output for rows ``[x0, x0+rows)`` of the unpadded volume; slabs come in increasing
    ``x0`` and cover every row exactly once. With identical network outputs the concatenation is
    bit-identical to ``monai.inferers.sliding_window_inference`` (``buffer_steps=None``).
    ``progress(n)`` is called after each batch with the number ``n`` of windows in that batch (tqdm's
    ``update`` fits); the calls sum to the number of windows.
    Peak memory: see the module docstring and :func:`stitch_peak_bytes`.
    """
    image = _check_image(image)
    if not isinstance(spec, InferenceSpec):
        raise SpecError(f"spec must be an InferenceSpec, got {type(spec).__name__}")
    k = int(num_classes)
    if k < 1:
        raise InferenceError(f"num_classes must be >= 1, got {num_classes}")
    c = image.shape[0]
    plan = plan_windows(image.shape[1:], spec)
    roi = plan.roi_size
    rx = roi[0]
    _, yp, zp = plan.padded_shape
    crop_y, crop_z = plan.crop[1], plan.crop[2]
    bsz = int(spec.sw_batch_size)

    weight = importance_map(roi, spec.blend_mode, spec.sigma_scale, spec.importance_profiles)
    acc = np.zeros((k, rx, yp, zp), dtype=np.float32)
    count = np.zeros((rx, yp, zp), dtype=np.float32)
    batch_in = np.empty((bsz, c, *roi), dtype=np.float32)
    weighted = np.empty((bsz, k, *roi), dtype=np.float32)

    windows = plan.windows
    n_win = len(windows)
    per_x = len(plan.starts[1]) * len(plan.starts[2])  # windows per axis-0 start (contiguous in C order)
    bounds = slab_bounds(plan)
    expect = (k, *roi)

    for b0 in range(0, n_win, bsz):
        nb = min(bsz, n_win - b0)
        batch = windows[b0:b0 + nb]
        for j, st in enumerate(batch):
            _extract_window(image, st, plan, spec, batch_in[j])
        pred = predict(batch_in[:nb])
        if not isinstance(pred, np.ndarray):
            raise InferenceError(f"predict must return a NumPy array, got {type(pred).__name__}")
        if pred.shape != (nb, *expect):
            raise InferenceError(f"predict returned shape {pred.shape}; expected {(nb, *expect)} "
                                 f"(batch, num_classes, *roi_size)")
        wb = weight_batch(pred, weight, weighted[:nb])
        del pred
        j = 0
        while j < nb:
            gi = (b0 + j) // per_x  # index of this window's axis-0 start
            e = min(nb, (gi + 1) * per_x - b0)
            accumulate_windows(acc, count, wb[j:e], weight, batch[j:e])
            j = e
            if b0 + e == (gi + 1) * per_x:  # every window of this axis-0 start is in
                lo, hi = bounds[gi]
                ulo, uhi = _unpadded_rows(plan, lo, hi)
                if uhi > ulo:
                    low = plan.pads[0][0]
                    slab = np.empty((k, uhi - ulo, crop_y.stop - crop_y.start, crop_z.stop - crop_z.start),
                                    dtype=np.float32)
                    finalize_rows(acc, count, ulo + low, uhi + low, (crop_y, crop_z), slab)
                    clear_rows(acc, count, lo, hi)
                    yield ulo, slab
                    del slab
                else:
                    clear_rows(acc, count, lo, hi)
        if progress is not None:
            progress(nb)


def sliding_window_full(image: np.ndarray, spec: InferenceSpec, predict: Predict, num_classes: int, *,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The whole stitched output ``(K, X, Y, Z)`` float32 (concatenation of :func:`sliding_window_stream`)."""
    image = _check_image(image)
    out = np.empty((int(num_classes), *image.shape[1:]), dtype=np.float32)
    for x0, slab in sliding_window_stream(image, spec, predict, num_classes, progress=progress):
        out[:, x0:x0 + slab.shape[1]] = slab
    return out
