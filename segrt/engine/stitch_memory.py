"""The stitcher's memory formula: its buffers in bytes, by term, replayed exactly from the cell grid.

**Memory (exact).** With ``a`` bytes per accumulator element (4 for float32, 2 for float16)::

    peak = max_i live_voxels(i) · (K·a + 4)                # cells alive while window i is added
         + 4 · rx·ry·rz                                   # importance map
         + 4 · rx·ry·rz                                   # constant contribution of a skipped window (skip only)
         + n_in · 4 · B·C·rx·ry·rz                        # gathered input batches (n_in = 1, or 3 with threads)
         + n_out · 4 · B·K·rx·ry·rz                       # weighted prediction batches (n_out = 1, or 2 threads;
                                                          # one less with inplace_weighting: see stitch_buffers)
         + [a == 2] · 4 · K · q                          # float32 quotient of a few rows of a cell (float16
                                                          # mode), q = rows·dy·dz ≤ max(65536, dy·dz)
         + [slabs] · 4 · K · S · Y · Z                    # row slabs assembled by sliding_window_stream
         + 3 · np.getbufsize() · 4                        # NumPy ufunc iteration buffers, 96 KiB
         + 128 · n_windows + 768 · max_live_cells          # Python bookkeeping (lists, dicts, array headers)

``live_voxels(i)`` is evaluated exactly by :func:`stitch_peak_bytes` (it replays the cell bookkeeping: cells are
visited in the same order as the stitcher visits them, a cell counts from its first window to right after its
last; in ``compact`` order a contribution that must wait for an earlier window adds ``a·K`` bytes per voxel of
its cell until it is applied). Up to the small inner terms it is
``Ox·Y·Z + (rx−Ox)·Oy·Z + (rx−Ox)·(ry−Oy)·(Oz + rz)``. ``S`` is the
most rows of slabs open at once, also replayed exactly: the most rows of one axis-0 start (``max(interval, last
window)``), or in ``compact`` order with the last window pulled back and two tiles or more on axis 1 or 2 the rows
of the last two starts together (``x_n − x_{n−1} + last window``); the ufunc term is an upper bound.
Not counted: the input image and the arrays ``predict`` returns before they are weighted (with
``inplace_weighting`` the weighted batch *is* the returned array; a float16 output adds a float32 copy).
The old single-level ring needed ``4·(K+1)·roi_x·Yp·Zp``; the full volume ``4·(K+1)·Xp·Yp·Zp``.
"""

from __future__ import annotations

import numpy as np

from segrt.engine.cells import ORDERS, CellGrid, _planned, _slab_peak_rows
from segrt.errors import SpecError
from segrt.spec import InferenceSpec

__all__ = ["stitch_buffers", "stitch_peak_bytes", "stream_order", "ufunc_scratch_bytes", "ACCUM_DTYPES"]

ACCUM_DTYPES = {"float32": np.float32, "float16": np.float16}
QUOTIENT_CHUNK_VOXELS = 1 << 16
BOOKKEEPING_PER_WINDOW = 128
BOOKKEEPING_PER_CELL = 768


def ufunc_scratch_bytes() -> int:
    """Upper bound of NumPy's transient ufunc iteration buffers in one kernel call (3 float32 operands)."""
    return 3 * np.getbufsize() * 4


def _accum(accum_dtype) -> type:
    key = np.dtype(accum_dtype).name if not isinstance(accum_dtype, str) else accum_dtype
    if key not in ACCUM_DTYPES:
        raise SpecError(f"accum_dtype must be one of {sorted(ACCUM_DTYPES)}, got {accum_dtype!r}")
    return ACCUM_DTYPES[key]


def stitch_buffers(spatial_shape, spec: InferenceSpec, num_classes: int, in_channels: int = 1, *,
                   accum_dtype="float32", slabs: bool = False, threads: bool = False, skip: bool = False,
                   inplace_weighting: bool = False, order: str | None = None,
                   grid: CellGrid | None = None) -> dict[str, int]:
    """The stitcher's buffers for a volume of ``spatial_shape``, in bytes, by term (see the module docstring).

    ``slabs=True`` with ``order=None``: the buffers of :func:`sliding_window_stream` in the order it chooses
    (:func:`stream_order`). ``grid``: the volume's :class:`CellGrid` when the caller planned it already."""
    return _buffers(spatial_shape, spec, num_classes, in_channels, accum_dtype=accum_dtype, slabs=slabs,
                    threads=threads, skip=skip, inplace_weighting=inplace_weighting, order=order, grid=grid)[1]


def stream_order(spatial_shape, spec: InferenceSpec, num_classes: int, accum_dtype="float32",
                 grid: CellGrid | None = None) -> str:
    """The window order :func:`sliding_window_stream` uses when none is given.

    With ``sw_batch_size`` 1 (where the order cannot change any result): of ``compact``, ``compact_yz`` and
    ``monai`` the one whose peak (:func:`stitch_peak_bytes`, ``slabs=True``) is smallest, the first of them on
    a tie. ``compact`` keeps the axis-0 overlap band small but can leave the last two slabs open together;
    ``compact_yz`` keeps one slab open but holds the pulled-back axis-0 band. Otherwise MONAI's order."""
    return _buffers(spatial_shape, spec, num_classes, 1, accum_dtype=accum_dtype, slabs=True, grid=grid)[0]


def _buffers(spatial_shape, spec: InferenceSpec, num_classes: int, in_channels: int = 1, *,
             accum_dtype="float32", slabs: bool = False, threads: bool = False, skip: bool = False,
             inplace_weighting: bool = False, order: str | None = None,
             grid: CellGrid | None = None) -> tuple[str, dict[str, int]]:
    """``(order, buffers)``: see :func:`stitch_buffers`; ``order`` is the window order the terms are for."""
    grid = _planned(spatial_shape, spec, grid)
    plan = grid.plan
    k, c, b = int(num_classes), int(in_channels), int(spec.sw_batch_size)
    a = np.dtype(_accum(accum_dtype)).itemsize
    win = int(np.prod(plan.roi_size))
    _, y, z = plan.spatial_shape
    if slabs and order is None and b == 1:
        kinds = ("compact", "compact_yz", "monai")  # the stream's choice; "compact" wins ties
    else:
        kinds = (_order_kind(order, spec),)
    best, seen = None, []
    for kind in kinds:
        seq = grid.order(kind)
        if seq in seen:  # e.g. compact_yz is compact where the last axis-0 start is not pulled back
            continue
        seen.append(seq)
        out = {
            "cells": grid.simulate(seq, k * a + 4, a * k),
            "importance_map": 4 * win,
            "skip_constant": 4 * win if skip else 0,
            "input_batches": (3 if threads else 1) * 4 * b * c * win,
            # with inplace_weighting the first weighted batch is the backend's own output buffer (counted in its
            # workspace, see segrt.engine.budget.measure_workspace); each further one in flight is extra
            "weighted_batches": ((2 if threads else 1) - (1 if inplace_weighting else 0)) * 4 * b * k * win,
            "fp16_quotient": 4 * k * _quotient_voxels(grid) if a == 2 else 0,
            # the slabs sliding_window_stream holds at once (one, or the last two in compact order)
            "slab": 4 * k * _slab_peak_rows(grid, seq) * y * z if slabs else 0,
            "ufunc_scratch": ufunc_scratch_bytes(),
            # Python objects: window lists (~128 B per window) and per live cell its arrays' headers, lists, dict
            "bookkeeping": BOOKKEEPING_PER_WINDOW * plan.n_windows + BOOKKEEPING_PER_CELL * grid.peak_live_cells,
        }
        if best is None or sum(out.values()) < sum(best[1].values()):
            best = (kind, out)
    return best


def stitch_peak_bytes(spatial_shape, spec: InferenceSpec, num_classes: int, in_channels: int = 1, *,
                      accum_dtype="float32", slabs: bool = True, threads: bool = False, skip: bool = False,
                      inplace_weighting: bool = False, order: str | None = None,
                      grid: CellGrid | None = None) -> int:
    """Peak bytes of the stitcher's buffers (the module docstring's formula; ``slabs``: row slabs are
    assembled, as :func:`sliding_window_stream` does; False for :func:`sliding_window_blocks`)."""
    return sum(stitch_buffers(spatial_shape, spec, num_classes, in_channels, accum_dtype=accum_dtype, slabs=slabs,
                              threads=threads, skip=skip, inplace_weighting=inplace_weighting,
                              order=order, grid=grid).values())


def _quotient_voxels(grid: CellGrid) -> int:
    """Most voxels of one float32 quotient chunk in float16 mode (rows of a cell, ``QUOTIENT_CHUNK_VOXELS``)."""
    dyz = max(e - a for a, e in grid.axes[1].bounds) * max(e - a for a, e in grid.axes[2].bounds)
    dx = max(e - a for a, e in grid.axes[0].bounds)
    return min(dx, max(1, QUOTIENT_CHUNK_VOXELS // dyz)) * dyz


def _order_kind(order: str | None, spec: InferenceSpec) -> str:
    """Default window order: ``compact`` when batches are single windows (a batch's composition then cannot
    change any network output), MONAI's own order otherwise (its batches are kept as they are)."""
    if order is None:
        return "compact" if int(spec.sw_batch_size) == 1 else "monai"
    if order not in ORDERS:
        raise SpecError(f"window order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    return order
