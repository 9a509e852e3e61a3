"""NumPy reference kernels of the streaming stitcher (the truth a GPU kernel must reproduce).

The stitcher keeps a *ring* of ``R`` rows of the padded volume along axis 0: padded row ``x`` lives at
physical row ``x % R``. Two buffers share that ring:

* ``acc``   float32 ``(K, R, Yp, Zp)`` — sum of weighted window predictions,
* ``count`` float32 ``(R, Yp, Zp)``    — sum of window weights.

Arithmetic order is MONAI's (``MONAI_NOTES.md`` §5.7): the whole batch is weighted first
(``pred *= w`` in the prediction's dtype), then windows are added one after another in window order, so
every voxel sees the same sequence of float32 additions as in ``sliding_window_inference``; the final value
is ``acc / count`` in float32. A parallel kernel must keep the per-voxel order of windows that overlap
(e.g. add overlapping windows of one batch in sequence).

Signatures (a GPU implementation mirrors them, with device arrays):

* :func:`weight_batch` ``(pred, weight, out) -> out``
* :func:`accumulate_windows` ``(acc, count, weighted, weight, starts) -> None``
* :func:`finalize_rows` ``(acc, count, x_lo, x_hi, yz_crop, out) -> out``
* :func:`clear_rows` ``(acc, count, x_lo, x_hi) -> None``
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from segrt.errors import InferenceError

__all__ = ["ring_segments", "weight_batch", "accumulate_windows", "finalize_rows", "clear_rows"]


def ring_segments(x_lo: int, n: int, ring_rows: int) -> list[tuple[int, int, int]]:
    """Split padded rows ``[x_lo, x_lo+n)`` into ``(physical_start, offset, length)`` runs of the ring."""
    if n > ring_rows:
        raise ValueError(f"{n} rows do not fit a ring of {ring_rows} rows")
    p = x_lo % ring_rows
    first = min(n, ring_rows - p)
    segs = [(p, 0, first)]
    if first < n:
        segs.append((0, first, n - first))
    return segs


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


def accumulate_windows(acc: np.ndarray, count: np.ndarray, weighted: np.ndarray, weight: np.ndarray,
                       starts: Sequence[Sequence[int]]) -> None:
    """Add weighted window predictions (and their weights) into the ring, in window order.

    ``acc`` (K, R, Yp, Zp), ``count`` (R, Yp, Zp); ``weighted`` (B, K, rx, ry, rz); ``starts`` B padded
    window starts ``(x, y, z)``. Every window's rows ``[x, x+rx)`` must be live in the ring (``rx <= R``).
    """
    ring = acc.shape[1]
    rx, ry, rz = weighted.shape[2:]
    if len(starts) != weighted.shape[0]:
        raise InferenceError(f"{len(starts)} window starts for a batch of {weighted.shape[0]} predictions")
    for b, (x0, y0, z0) in enumerate(starts):
        ys, zs = slice(y0, y0 + ry), slice(z0, z0 + rz)
        for p, off, n in ring_segments(x0, rx, ring):
            acc[:, p:p + n, ys, zs] += weighted[b, :, off:off + n]
            count[p:p + n, ys, zs] += weight[off:off + n]


def finalize_rows(acc: np.ndarray, count: np.ndarray, x_lo: int, x_hi: int,
                  yz_crop: tuple[slice, slice], out: np.ndarray) -> np.ndarray:
    """``out = acc / count`` for padded rows ``[x_lo, x_hi)``, cropped to ``yz_crop`` (float32).

    ``out`` has shape ``(K, x_hi - x_lo, len(Y crop), len(Z crop))``.
    """
    ring = acc.shape[1]
    ys, zs = yz_crop
    for p, off, n in ring_segments(x_lo, x_hi - x_lo, ring):
        np.divide(acc[:, p:p + n, ys, zs], count[p:p + n, ys, zs], out=out[:, off:off + n])
    return out


def clear_rows(acc: np.ndarray, count: np.ndarray, x_lo: int, x_hi: int) -> None:
    """Zero padded rows ``[x_lo, x_hi)`` of the ring so they can hold new rows."""
    ring = acc.shape[1]
    for p, _, n in ring_segments(x_lo, x_hi - x_lo, ring):
        acc[:, p:p + n] = 0
        count[p:p + n] = 0
