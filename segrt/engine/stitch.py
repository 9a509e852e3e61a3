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
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from segrt.errors import InferenceError, SpecError, VolumeError
from segrt.engine.tiling import WindowPlan, importance_map, plan_windows, scan_interval
from segrt.spec import InferenceSpec

__all__ = [
    "sliding_window_blocks",
    "sliding_window_stream",
    "sliding_window_full",
    "stitch_peak_bytes",
    "stitch_buffers",
    "stream_order",
    "ufunc_scratch_bytes",
    "slab_bounds",
    "CellGrid",
    "window_maxima",
    "physical_core_cpus",
    "fix_malloc_mmap_threshold",
    "ACCUM_DTYPES",
    "SKIP_MARGIN",
]

Predict = Callable[[np.ndarray], np.ndarray]
ACCUM_DTYPES = {"float32": np.float32, "float16": np.float16}
QUOTIENT_CHUNK_VOXELS = 1 << 16
BOOKKEEPING_PER_WINDOW = 128
BOOKKEEPING_PER_CELL = 768
SKIP_MARGIN = 10.0  # default logit gap background − other classes of a skipped window
ORDERS = ("monai", "compact", "compact_yz")  # window orders (see the module docstring)


def slab_bounds(plan: WindowPlan) -> list[tuple[int, int]]:
    """Padded axis-0 row ranges ``[lo, hi)`` finished after each axis-0 start, in order."""
    sx = plan.starts[0]
    xp = plan.padded_shape[0]
    return [(sx[i], sx[i + 1] if i + 1 < len(sx) else xp) for i in range(len(sx))]


def _unpadded_rows(plan: WindowPlan, lo: int, hi: int) -> tuple[int, int]:
    low = plan.pads[0][0]
    x = plan.spatial_shape[0]
    return max(lo - low, 0), min(hi - low, x)


def _slab_rows(plan: WindowPlan) -> list[tuple[int, int]]:
    """Unpadded row ranges ``[lo, hi)`` of the slabs :func:`sliding_window_stream` hands out (the slabs of
    :func:`slab_bounds` that hold unpadded rows), in row order."""
    out = []
    for lo, hi in slab_bounds(plan):
        ulo, uhi = _unpadded_rows(plan, lo, hi)
        if uhi > ulo:
            out.append((ulo, uhi))
    return out


def _slab_peak_rows(grid: "CellGrid", order: Sequence[int]) -> int:
    """Most rows of slabs :func:`sliding_window_stream` holds at once when windows are added in ``order``.

    A slab (the rows of one axis-0 start ``ix``) receives blocks from the windows ``(ix, iy, iz)`` that are the
    last window of some cell; it is allocated with its first block and freed once it is complete *and* every
    slab before it has been handed out. In MONAI's order the slabs come one after another (the most rows of one
    start); in ``compact`` order the last two axis-0 starts are visited together, tile by tile over axes 1/2,
    so where those axes hold at least two tiles the last two slabs are open together."""
    plan = grid.plan
    has_final = [[any(grid.axes[d].last[c] == j for c, _, _ in grid.axes[d].per_start[j])
                  for j in range(grid.counts[d])] for d in range(3)]
    rows = []
    for lo, hi in slab_bounds(plan):
        ulo, uhi = _unpadded_rows(plan, lo, hi)
        rows.append(max(uhi - ulo, 0))
    yielding = [i for i in order if all(has_final[d][j] for d, j in enumerate(grid.window_index(i)))]
    left = [0] * len(rows)
    for i in yielding:
        left[grid.window_index(i)[0]] += 1
    nxt = 0
    while nxt < len(rows) and left[nxt] == 0:  # slabs without unpadded rows
        nxt += 1
    opened: set = set()
    cur = peak = 0
    for i in yielding:
        ix = grid.window_index(i)[0]
        if ix not in opened:
            opened.add(ix)
            cur += rows[ix]
            peak = max(peak, cur)
        left[ix] -= 1
        while nxt < len(rows) and left[nxt] == 0:
            if nxt in opened:
                cur -= rows[nxt]
            nxt += 1
    return peak


# ---- cell geometry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _AxisCells:
    bounds: tuple[tuple[int, int], ...]                 # unpadded [a, e) of each cell
    last: tuple[int, ...]                               # index of the last start covering each cell
    per_start: tuple[tuple[tuple[int, int, int], ...], ...]  # per start: (cell, lo, hi) local to the window


def _axis_cells(starts: Sequence[int], roi: int, pad_lo: int, size: int) -> _AxisCells:
    lo, hi = pad_lo, pad_lo + size
    cuts = {lo, hi}
    for s in starts:
        for c in (s, s + roi):
            if lo < c < hi:
                cuts.add(c)
    b = sorted(cuts)
    cells = list(zip(b[:-1], b[1:]))
    last, per = [], [[] for _ in starts]
    for ci, (a, e) in enumerate(cells):
        cov = [j for j, s in enumerate(starts) if s <= a and e <= s + roi]
        if not cov:  # windows cover the padded volume, so this cannot happen
            raise InferenceError(f"internal: cell [{a}, {e}) covered by no window (starts {starts}, roi {roi})")
        last.append(cov[-1])
        for j in cov:
            per[j].append((ci, a - starts[j], e - starts[j]))
    return _AxisCells(tuple((a - lo, e - lo) for a, e in cells), tuple(last), tuple(tuple(p) for p in per))


class CellGrid:
    """The cells of a window plan (see the module docstring) and, per window, the cells it covers."""

    def __init__(self, plan: WindowPlan):
        self.plan = plan
        self.axes = tuple(_axis_cells(plan.starts[d], plan.roi_size[d], plan.pads[d][0], plan.spatial_shape[d])
                          for d in range(3))
        self.counts = tuple(len(s) for s in plan.starts)
        self._cov = []
        for d in range(3):
            cov = [[] for _ in self.axes[d].bounds]
            for j, cells in enumerate(self.axes[d].per_start):
                for ci, _, _ in cells:
                    cov[ci].append(j)
            self._cov.append(cov)

    def window_index(self, i: int) -> tuple[int, int, int]:
        ny, nz = self.counts[1], self.counts[2]
        return i // (ny * nz), (i // nz) % ny, i % nz

    def cells_of(self, i: int):
        """Cells of window ``i`` in visiting order: ``(key, local slices, unpadded origin, shape, is_final)``."""
        ix, iy, iz = self.window_index(i)
        X, Y, Z = self.axes
        for cx, x0, x1 in X.per_start[ix]:
            fx = X.last[cx] == ix
            for cy, y0, y1 in Y.per_start[iy]:
                fy = fx and Y.last[cy] == iy
                for cz, z0, z1 in Z.per_start[iz]:
                    yield ((cx, cy, cz), (slice(x0, x1), slice(y0, y1), slice(z0, z1)),
                           (X.bounds[cx][0], Y.bounds[cy][0], Z.bounds[cz][0]),
                           (x1 - x0, y1 - y0, z1 - z0), fy and Z.last[cz] == iz)

    def covering(self, key) -> list[int]:
        """Windows covering cell ``key``, in MONAI's (C) order: the order their additions must be applied."""
        ny, nz = self.counts[1], self.counts[2]
        covs = [self._cov[d][key[d]] for d in range(3)]
        return [(jx * ny + jy) * nz + jz for jx in covs[0] for jy in covs[1] for jz in covs[2]]

    def order(self, kind: str = "monai") -> list[int]:
        """Window processing order. ``monai``: C order. ``compact``: where MONAI pulls the last window of an axis
        back (its overlap with the previous one exceeds the others), the last two starts of that axis form one
        group; windows are visited group-tile by group-tile (C order over groups, then C order inside), which
        keeps the live overlap band to the regular overlap. ``compact_yz``: the same with axes 1 and 2 grouped
        only (axis 0 in MONAI's order: one slab at a time, see :func:`sliding_window_stream`). Additions stay in
        MONAI's order per voxel (out-of-order contributions wait in the cell's pending list)."""
        n = self.plan.n_windows
        if kind == "monai":
            return list(range(n))
        if kind not in ORDERS:
            raise SpecError(f"window order must be one of {', '.join(map(repr, ORDERS))}, got {kind!r}")
        groups = []
        for d in range(3):
            st, iv = self.plan.starts[d], self.plan.interval[d]
            g = list(range(len(st)))
            if len(st) >= 2 and st[-1] - st[-2] < iv and not (d == 0 and kind == "compact_yz"):
                g[-1] = g[-2]
            groups.append(g)

        def key(i):
            ix, iy, iz = self.window_index(i)
            return (groups[0][ix], groups[1][iy], groups[2][iz], ix, iy, iz)

        return sorted(range(n), key=key)

    def simulate(self, order: Sequence[int], cell_bytes_per_voxel: int, pending_bytes_per_voxel: int) -> int:
        """Peak bytes of live cells plus pending (out-of-order) contributions, replaying the stitcher exactly."""
        live: dict = {}
        cur = peak = 0
        self.peak_live_cells = 0
        for i in order:
            for key, _, _, shape, _ in self.cells_of(i):
                vox = shape[0] * shape[1] * shape[2]
                st = live.get(key)
                if st is None:
                    st = live[key] = [0, self.covering(key), set()]
                    cur += vox * cell_bytes_per_voxel
                    peak = max(peak, cur)
                    self.peak_live_cells = max(self.peak_live_cells, len(live))
                pos, exp, pend = st
                if exp[pos] == i:
                    pos += 1
                    while pos < len(exp) and exp[pos] in pend:
                        pend.discard(exp[pos])
                        cur -= vox * pending_bytes_per_voxel
                        pos += 1
                    st[0] = pos
                else:
                    pend.add(i)
                    cur += vox * pending_bytes_per_voxel
                    peak = max(peak, cur)
                if pos == len(exp):
                    del live[key]
                    cur -= vox * cell_bytes_per_voxel
        return peak

    def max_cell_voxels(self) -> int:
        return max(e - a for a, e in self.axes[0].bounds) * max(e - a for a, e in self.axes[1].bounds) * \
            max(e - a for a, e in self.axes[2].bounds)


def window_maxima(raw: np.ndarray, plan: WindowPlan, grid: "CellGrid | None" = None) -> np.ndarray:
    """Per-window maximum (over channels and the window's unpadded voxels) of ``raw (C, X, Y, Z)``.

    One pass over the image: the maximum of every cell (a block of the window grid), then per window the
    maximum of its cells. Padded voxels are ignored (replicate padding repeats voxels of the window itself).
    """
    raw = np.asarray(raw)
    if raw.ndim != 4 or tuple(raw.shape[1:]) != tuple(plan.spatial_shape):
        raise VolumeError(f"window_maxima: expected an image (C, {', '.join(map(str, plan.spatial_shape))}), "
                          f"received shape {tuple(raw.shape)}")
    grid = _grid_of(plan, grid)
    X, Y, Z = grid.axes
    cmax = np.empty((len(X.bounds), len(Y.bounds), len(Z.bounds)), dtype=np.float64)
    for a, (x0, x1) in enumerate(X.bounds):
        for b, (y0, y1) in enumerate(Y.bounds):
            for c, (z0, z1) in enumerate(Z.bounds):
                cmax[a, b, c] = raw[:, x0:x1, y0:y1, z0:z1].max()
    out = np.empty(plan.n_windows, dtype=np.float64)
    for i in range(plan.n_windows):
        ix, iy, iz = grid.window_index(i)
        xs = [c for c, _, _ in X.per_start[ix]]
        ys = [c for c, _, _ in Y.per_start[iy]]
        zs = [c for c, _, _ in Z.per_start[iz]]
        out[i] = cmax[np.ix_(xs, ys, zs)].max()
    return out


def _grid_of(plan: WindowPlan, grid: "CellGrid | None") -> "CellGrid":
    """``grid`` when the caller planned it (it must be ``plan``'s), else the cell grid of ``plan``."""
    if grid is None:
        return CellGrid(plan)
    if grid.plan != plan:
        raise SpecError("the cell grid given was planned for other windows")
    return grid


def _planned(spatial_shape, spec: InferenceSpec, grid: "CellGrid | None") -> "CellGrid":
    """The cell grid of ``spec``'s windows over ``spatial_shape``: the caller's (checked to match), else planned."""
    if grid is None:
        return CellGrid(plan_windows(spatial_shape, spec))
    p = grid.plan
    if (tuple(p.spatial_shape) != tuple(int(v) for v in spatial_shape) or tuple(p.roi_size) != tuple(spec.roi_size)
            or tuple(p.interval) != tuple(scan_interval(p.padded_shape, p.roi_size, spec.overlap))):
        raise SpecError("the cell grid given was planned for another volume or window spec")
    return grid


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


# ---- memory formula ---------------------------------------------------------------------------
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


def physical_core_cpus() -> list[int]:
    """One logical CPU per physical core this process may run on (hyper-thread siblings dropped)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))
    seen, out = set(), []
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                sib = f.read().strip()
        except OSError:
            sib = str(cpu)
        if sib not in seen:
            seen.add(sib)
            out.append(cpu)
    return out or allowed


def _pin_current_thread(cpus: Sequence[int]) -> None:
    try:
        os.sched_setaffinity(0, set(cpus))  # pid 0: the calling thread (Linux)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux / not permitted
        pass


_MALLOC_FIXED = False


def fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap (returned to the system on
    free). glibc otherwise raises that threshold after the first large free (up to 32 MiB), and the stitcher's
    many cell-sized arrays then fragment the heap: resident memory grows past the live set (measured +8 % on a
    256³ × 105-class job). Process-wide; done once; False where not glibc."""
    global _MALLOC_FIXED
    if _MALLOC_FIXED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _MALLOC_FIXED = bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        _MALLOC_FIXED = False
    return _MALLOC_FIXED


class _Stop(Exception):
    pass


def _threaded(batches, gather, infer, slots: int = 2):
    """Yield ``(windows, weighted)`` of each batch, gathering and inferring ahead in two pinned threads.

    At most ``slots`` weighted batches exist at once (the one the caller stitches and the one being inferred);
    the caller must call the returned ``release`` after it is done with each batch.
    """
    q_in: queue.Queue = queue.Queue(maxsize=1)
    q_out: queue.Queue = queue.Queue()
    sem = threading.Semaphore(slots)
    stop = threading.Event()
    cpus = physical_core_cpus()

    def put(q, item):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(q):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def gatherer():
        _pin_current_thread(cpus)
        try:
            for bw in batches:
                put(q_in, ("ok", bw, gather(bw)))
            put(q_in, ("end", None, None))
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            try:
                put(q_in, ("error", exc, None))
            except _Stop:
                return

    def inferer():
        _pin_current_thread(cpus)
        try:
            while True:
                kind, bw, buf = get(q_in)
                if kind != "ok":
                    put(q_out, (kind, bw, None))
                    return
                while not sem.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                try:
                    wb = infer(buf)
                except BaseException as exc:  # noqa: BLE001
                    put(q_out, ("error", exc, None))
                    return
                del buf
                put(q_out, ("ok", bw, wb))
        except _Stop:
            return

    threads = [threading.Thread(target=gatherer, name="segrt-gather", daemon=True),
               threading.Thread(target=inferer, name="segrt-infer", daemon=True)]
    for t in threads:
        t.start()

    def gen():
        try:
            while True:
                kind, bw, wb = q_out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise bw
                yield bw, wb
        finally:
            stop.set()
            for t in threads:
                t.join()

    return gen(), sem.release


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
        if inplace_weighting and pred.dtype == np.float32 and pred.flags.writeable and pred.flags.c_contiguous:
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
