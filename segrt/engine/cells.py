"""The cell grid of a window plan: the volume cut at every window start and end, so that every voxel of a cell is
covered by the same windows (see :mod:`segrt.engine.stitch`, "Cells"), and what is derived from it without running
anything: the slabs of rows per axis-0 start, the window orders the stitcher may visit, the cells alive in a given
order (for the memory formula, :mod:`segrt.engine.stitch_memory`), and the per-window maxima of an image (the skip
rule). Planned once per segmentation (:class:`segrt.engine.plan.SegmentationPlan`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from segrt.engine.tiling import WindowPlan, plan_windows, scan_interval
from segrt.errors import InferenceError, SpecError, VolumeError
from segrt.spec import InferenceSpec

__all__ = ["CellGrid", "ORDERS", "slab_bounds", "window_maxima"]

ORDERS = ("monai", "compact", "compact_yz")  # window orders (see segrt.engine.stitch's docstring)


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
