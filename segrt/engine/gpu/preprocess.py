"""Preprocessing on a torch device, with the results of :mod:`segrt.engine.preprocess` (docs/semantics.md §2-§4).

The *geometry* (orientation codes, Spacingd's affine, shape and index map ``M``, per-axis interpolation
tables) is computed on the host by the NumPy engine's own functions — it is tiny — and only the data work runs
on the device:

* :class:`Uploader` — host array → device, through two reused pinned staging buffers (double-buffered, the
  host copy of one chunk overlaps the DMA of the previous one);
* :class:`OrientedImage` — orientation as a permuted *view* of the uploaded image plus per-axis flip flags,
  which the resampler folds into its gather indices (no copy);
* :func:`resample_linear` — trilinear resampling with border clamp, the algorithm of
  :func:`segrt.engine.resample.resample_linear` (torch's coordinates via ``SourceGrid``; separable gathers
  and lerps for a diagonal ``M`` in the same float64 order, near-zero voxels recomputed exactly; exact 8-corner
  values otherwise), so the result is bit-identical to it;
* the intensity ops of :mod:`segrt.spec` with the NumPy engine's formulas (statistics in float64, see
  :func:`normalize_intensity`).

Size: over 400 lines because the device twin of preprocess.py and resample.py together (upload, oriented view,
resampling gathers, intensity ops), so that each device op sits next to the statement of which NumPy function it
must equal.
"""

from __future__ import annotations

import numpy as np
import torch

from segrt.engine import preprocess as pp
from segrt.errors import SpecError, VolumeError
from segrt.engine import resample as K
from segrt.spec import INTENSITY_OPS, IntensityOp

__all__ = [
    "Uploader",
    "c_order_perm",
    "OrientedImage",
    "orient",
    "DeviceGrid",
    "axis_tables",
    "exact_values",
    "resample_linear",
    "nearest_tables",
    "fix_nearest_ties",
    "resample_nearest",
    "apply_intensity",
]

_f32 = np.float32
_CHUNK_BYTES = 256 << 20  # working-set budget of one resampling chunk


# ---- upload ----------------------------------------------------------------------------------
# Stored dtypes converted to float32 on the device (exactly as NumPy's astype(float32) would: every integer of
# these types is a float32, and float64 → float32 rounds to nearest-even on both). uint16 travels as its int16
# bit pattern (torch's uint16 support is partial on CUDA) and is corrected on the device; other dtypes (uint32,
# int64, float16, ...) are converted on the host.
_DEVICE_CAST = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64)}


def c_order_perm(array: np.ndarray) -> tuple[int, ...] | None:
    """Axes ``p`` such that ``array.transpose(p)`` is C-contiguous (a Fortran-ordered NIfTI volume: reversed
    axes), or None when no axis order makes it contiguous."""
    order = tuple(sorted(range(array.ndim), key=lambda a: (-abs(array.strides[a]), a)))
    return order if array.transpose(order).flags.c_contiguous else None


class Uploader:
    """Copies host arrays to ``device`` through two reused pinned staging buffers of ``chunk_bytes`` each.

    :meth:`upload` takes an array in any memory order (a NIfTI file's Fortran order included: its bytes are sent
    as they lie and the axes permuted on the device, never transposed on the host) and any of the stored dtypes
    in ``_DEVICE_CAST`` (sent as stored, half the bytes of float32 for an int16 CT, converted on the device), and
    returns a C-contiguous float32 tensor. On a CPU device the result may share the array's memory (callers must
    not write into it).
    """

    def __init__(self, device, chunk_bytes: int = 64 << 20):
        self.device = torch.device(device)
        self.chunk_bytes = int(chunk_bytes)
        self._bufs: list[torch.Tensor] = []
        self._events: list = []

    def _staging(self):
        if not self._bufs:
            n = self.chunk_bytes
            self._bufs = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        return self._bufs, self._events

    def _copy(self, array: np.ndarray) -> torch.Tensor:
        """C-contiguous ``array`` → a tensor of the same dtype and shape on the device."""
        if self.device.type != "cuda":
            return torch.from_numpy(array).to(self.device)
        out = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, device=self.device)
        src = torch.from_numpy(array.reshape(-1).view(np.uint8))
        dst = out.view(-1).view(torch.uint8)
        bufs, events = self._staging()
        n, step = src.numel(), self.chunk_bytes
        for k, s in enumerate(range(0, n, step)):
            m = min(step, n - s)
            events[k % 2].synchronize()  # the DMA that last read this staging buffer is done
            bufs[k % 2][:m].copy_(src[s:s + m])  # multi-threaded host copy into pinned memory
            dst[s:s + m].copy_(bufs[k % 2][:m], non_blocking=True)
            events[k % 2].record()
        return out

    def upload(self, array: np.ndarray) -> torch.Tensor:
        array = np.asarray(array)
        if array.dtype not in _DEVICE_CAST:
            array = array.astype(np.float32)
        perm = c_order_perm(array)
        if perm is None:
            array = np.ascontiguousarray(array)
            perm = tuple(range(array.ndim))
        unsigned16 = array.dtype == np.uint16
        src = array.transpose(perm)
        if unsigned16:
            src = src.view(np.int16)
        t = self._copy(src).permute(tuple(np.argsort(perm)))
        # one device kernel: cast + permute into a contiguous float32 tensor (.to() alone returns a float32
        # view unchanged, whatever its strides)
        out = t.contiguous() if t.dtype == torch.float32 else t.to(torch.float32,
                                                                     memory_format=torch.contiguous_format)
        if unsigned16:  # int16 bit pattern s of v: v = s + 65536 when s < 0 (exact in float32)
            out += (t < 0).to(torch.float32) * 65536.0
        return out


# ---- orientation -----------------------------------------------------------------------------
class OrientedImage:
    """The uploaded ``(C, X, Y, Z)`` image as seen after Orientationd, without moving data.

    ``view`` is the input permuted to the oriented axis order; oriented axis ``p`` additionally runs backwards
    when ``flips[p]`` (index ``i`` of the oriented grid is index ``n_p - 1 - i`` of ``view``).
    """

    def __init__(self, raw: torch.Tensor, perm=(0, 1, 2), flips=(False, False, False)):
        self.raw = raw
        self.perm = tuple(int(p) for p in perm)
        self.flips = tuple(bool(f) for f in flips)
        self.view = raw.permute(0, *(p + 1 for p in self.perm)) if self.perm != (0, 1, 2) else raw

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.view.shape[1:])

    def map_index(self, axis: int, idx: torch.Tensor) -> torch.Tensor:
        """Oriented-grid indices along ``axis`` → indices into :attr:`view`."""
        return (self.shape[axis] - 1) - idx if self.flips[axis] else idx

    def materialize(self, copy: bool = True) -> torch.Tensor:
        """The oriented image as a contiguous tensor: a new one (``copy``), or possibly :attr:`raw` itself."""
        dims = [p + 1 for p in range(3) if self.flips[p]]
        if dims:
            return torch.flip(self.view, dims).contiguous()
        out = self.view.contiguous()
        return out.clone() if copy and out.data_ptr() == self.raw.data_ptr() else out


def oriented(raw: torch.Tensor, ornt) -> "OrientedImage":
    """Orientationd's data part on a device tensor, from a planned ``ornt`` (:func:`segrt.engine.preprocess.
    plan_geometry`; None: no orientation): flips folded into later gathers, see :class:`OrientedImage`."""
    if raw.dim() != 4:
        raise VolumeError(f"expected a channel-first (C, X, Y, Z) tensor, received shape {tuple(raw.shape)}")
    if ornt is None:
        return OrientedImage(raw)
    perm = tuple(int(p) for p in np.argsort(ornt[:, 0]))  # oriented axis p ← input axis perm[p]
    flips = tuple(bool(ornt[perm[p], 1] == -1) for p in range(3))
    return OrientedImage(raw, perm, flips)


def orient(raw: torch.Tensor, affine: np.ndarray, axcodes: str | None):
    """Orientationd on a device tensor: ``(OrientedImage, oriented_affine, ornt or None)``; the geometry is
    :func:`segrt.engine.preprocess.plan_orientation`'s, the data part :func:`oriented`."""
    affine = np.asarray(affine, dtype=np.float64)
    if axcodes is None:
        return oriented(raw, None), affine, None
    new_affine, ornt = pp.plan_orientation(affine, tuple(raw.shape[1:]), axcodes.upper())
    return oriented(raw, ornt), new_affine, ornt


# ---- resampling ------------------------------------------------------------------------------
# Coordinates are the reference's (segrt.engine.resample.SourceGrid: torch's affine_grid/grid_sample
# arithmetic); the per-axis tables are computed on the host (tiny), per-voxel coordinates on the device with the
# same float64 operations in the same order (eager torch ops: no FMA contraction).
class DeviceGrid:
    """:class:`segrt.engine.resample.SourceGrid` with its per-voxel coordinates computed on ``device``."""

    def __init__(self, M: np.ndarray, src_shape, out_shape, device):
        self.grid = K.SourceGrid(M, src_shape, out_shape)
        self.device = torch.device(device)
        self.base = [torch.as_tensor(np.array(b), device=self.device) for b in self.grid.base]

    def separable_tables(self, dtype=torch.float64):
        """Per axis ``(i0, i1, w0, w1)`` device tensors: the reference's separable tables."""
        out = []
        for i0, i1, w0, w1 in K._separable_tables(self.grid):
            out.append((torch.as_tensor(np.asarray(i0, dtype=np.int64), device=self.device),
                        torch.as_tensor(np.asarray(i1, dtype=np.int64), device=self.device),
                        torch.as_tensor(np.asarray(w0, dtype=np.float64), device=self.device).to(dtype),
                        torch.as_tensor(np.asarray(w1, dtype=np.float64), device=self.device).to(dtype)))
        return out

    def point_coords(self, o0: torch.Tensor, o1: torch.Tensor, o2: torch.Tensor) -> torch.Tensor:
        """Clamped float64 source coordinates ``(3, *shape)`` of output voxels (broadcastable index tensors)."""
        o = torch.broadcast_tensors(o0, o1, o2)
        g = [self.base[k][o[k]] for k in range(3)]
        th = self.grid.theta
        out = []
        for d in range(3):
            c = ((g[2] * float(th[d, 2]) + g[1] * float(th[d, 1])) + g[0] * float(th[d, 0])) + float(th[d, 3])
            n = float(self.grid.src_shape[d])
            out.append(torch.clamp(((c + 1.0) * n - 1.0) / 2.0, 0.0, n - 1.0))
        return torch.stack(out)


def axis_tables(M: np.ndarray, out_shape, src_shape, device, dtype=torch.float64):
    """Per-axis ``(i0, i1, w0, w1)`` device tensors of the reference's separable resampling from ``src_shape``
    to ``out_shape`` by ``M`` (indices int64, weights in ``dtype``)."""
    return DeviceGrid(M, src_shape, out_shape, device).separable_tables(dtype)


def _rows_per_chunk(row_elems: int, elem_bytes: int, budget: int = _CHUNK_BYTES) -> int:
    return max(1, budget // max(1, row_elems * elem_bytes))


def exact_values(img: OrientedImage, p: torch.Tensor) -> torch.Tensor:
    """torch ``grid_sample`` (bilinear, border) of the oriented image at clamped coordinates ``p (3, ...)``:
    float64 ``(C, ...)``, corners and weight products in ``reference._exact_values``'s order."""
    n = img.shape
    C = img.view.shape[0]
    f0 = [torch.floor(p[d]) for d in range(3)]
    w = [((f0[d] + 1.0) - p[d], p[d] - f0[d]) for d in range(3)]
    i0 = [a.long() for a in f0]
    acc = torch.zeros((C, *p.shape[1:]), dtype=torch.float64, device=p.device)
    for c0 in (0, 1):
        for c1 in (0, 1):
            for c2 in (0, 1):
                j = [i0[0] + c0, i0[1] + c1, i0[2] + c2]
                valid = (j[0] < n[0]) & (j[1] < n[1]) & (j[2] < n[2])
                jj = [img.map_index(d, torch.clamp(j[d], max=n[d] - 1)) for d in range(3)]
                wt = (w[2][c2] * w[1][c1]) * w[0][c0]
                v = img.view[:, jj[0], jj[1], jj[2]].to(torch.float64)
                acc = torch.where(valid, acc + v * wt, acc)
    return acc


def resample_linear(img: OrientedImage, M: np.ndarray, out_shape, dtype=torch.float64,
                    out: torch.Tensor | None = None, exact_zeros: bool = True) -> torch.Tensor:
    """Trilinear resampling of the oriented image to ``out_shape`` (float32 ``(C, *out_shape)``).

    ``M`` maps an output index to an oriented-grid index (``SpacingPlan.M``). The reference's algorithm
    (:func:`segrt.engine.resample.resample_linear`): for a diagonal ``M`` separable gathers + lerps per axis;
    with ``exact_zeros`` the voxels whose value is within rounding noise of 0 are recomputed with torch's exact
    8-corner arithmetic, so that exactly MONAI's zeros are zeros (its ``nonzero`` masks rely on it); a general
    ``M`` takes the exact per-voxel path. ``dtype`` is the separable compute type: float64 reproduces the
    reference bit for bit; float32 is faster and within a few float32 ulps.
    """
    M = np.asarray(M, dtype=np.float64)
    out_shape = tuple(int(s) for s in out_shape)
    src = img.view
    C = src.shape[0]
    n = img.shape
    dev = src.device
    if out is None:
        out = torch.empty((C, *out_shape), dtype=torch.float32, device=dev)
    grid = DeviceGrid(M, n, out_shape, dev)
    esz = torch.finfo(dtype).bits // 8
    if K.is_diagonal(M):
        (xi0, xi1, xw0, xw1), (yi0, yi1, yw0, yw1), (zi0, zi1, zw0, zw1) = grid.separable_tables(dtype)
        xi0, xi1 = img.map_index(0, xi0), img.map_index(0, xi1)
        yi0, yi1 = img.map_index(1, yi0), img.map_index(1, yi1)
        zi0, zi1 = img.map_index(2, zi0), img.map_index(2, zi1)
        tol = None
        if exact_zeros:
            tol = float(src.abs().amax()) * (K._ZERO_TOL + 2.0 * float(grid.grid.coord_bound.sum()))
        plane = C * max(n[1] * n[2], out_shape[1] * n[2], out_shape[1] * out_shape[2])
        step = _rows_per_chunk(plane, esz * 3)
        for a in range(0, out_shape[0], step):
            b = min(a + step, out_shape[0])
            lo = src.index_select(1, xi0[a:b]).to(dtype)
            hi = src.index_select(1, xi1[a:b]).to(dtype)
            rows = lo.mul_(xw0[a:b, None, None]).add_(hi.mul_(xw1[a:b, None, None]))
            del hi
            t = rows.index_select(2, yi0).mul_(yw0[:, None]).add_(rows.index_select(2, yi1).mul_(yw1[:, None]))
            del rows
            v = t.index_select(3, zi0).mul_(zw0).add_(t.index_select(3, zi1).mul_(zw1))
            del t
            if tol is not None:
                r, y, z = torch.nonzero((v.abs() <= tol).any(dim=0), as_tuple=True)
                if r.numel():
                    v[:, r, y, z] = exact_values(img, grid.point_coords(r + a, y, z)).to(dtype)
            out[:, a:b] = v
        return out
    oy = torch.arange(out_shape[1], device=dev)[None, :, None]
    oz = torch.arange(out_shape[2], device=dev)[None, None, :]
    step = _rows_per_chunk(out_shape[1] * out_shape[2], 8 * (12 + 2 * C))
    for a in range(0, out_shape[0], step):
        b = min(a + step, out_shape[0])
        p = grid.point_coords(torch.arange(a, b, device=dev)[:, None, None], oy, oz)
        out[:, a:b] = exact_values(img, p)
    return out


def nearest_tables(M: np.ndarray, out_shape, src_shape, device):
    """``(DeviceGrid, [per-axis nearest index tensors])``: rint of the separable coordinates (exact when
    ``grid.grid.theta_diagonal``; otherwise fix the near-tie planes with :func:`fix_nearest_ties`)."""
    grid = DeviceGrid(M, src_shape, out_shape, device)
    idx = [torch.as_tensor(np.rint(grid.grid.axis_coords(d)).astype(np.int64), device=grid.device)
           for d in range(3)]
    return grid, idx


def fix_nearest_ties(src: torch.Tensor, grid: DeviceGrid, out: torch.Tensor) -> None:
    """``reference._fix_nearest_ties`` on the device: redo the planes whose separable coordinate is within the
    coordinate bound of a .5 tie with exact per-voxel coordinates. ``src (C, X, Y, Z)`` → ``out (C, *out_shape)``."""
    g = grid.grid
    shape = g.out_shape
    dev = grid.device
    for d in range(3):
        p = g.axis_coords(d)
        frac = p - np.floor(p)
        for o in np.nonzero(np.abs(frac - 0.5) <= g.coord_bound[d])[0]:
            idx = [torch.arange(s, device=dev) for s in shape]
            idx[d] = torch.tensor([int(o)], device=dev)
            q = torch.round(grid.point_coords(idx[0][:, None, None], idx[1][None, :, None],
                                              idx[2][None, None, :])).long()
            sl = [slice(None)] * 3
            sl[d] = slice(int(o), int(o) + 1)
            out[(slice(None), *sl)] = src[:, q[0], q[1], q[2]]


def resample_nearest(img: OrientedImage, M: np.ndarray, out_shape) -> torch.Tensor:
    """Nearest-neighbour resampling of the oriented image (``reference.resample_nearest``), dtype kept."""
    M = np.asarray(M, dtype=np.float64)
    out_shape = tuple(int(s) for s in out_shape)
    n = img.shape
    dev = img.view.device
    if K.is_diagonal(M):
        grid, (ix, iy, iz) = nearest_tables(M, out_shape, n, dev)
        ix, iy, iz = (img.map_index(d, i) for d, i in enumerate((ix, iy, iz)))
        out = img.view[:, ix[:, None, None], iy[None, :, None], iz[None, None, :]]
        if not grid.grid.theta_diagonal:
            fix_nearest_ties(img.materialize(copy=False), grid, out)
        return out
    grid = DeviceGrid(M, n, out_shape, dev)
    dense = img.materialize(copy=False)
    out = torch.empty((dense.shape[0], *out_shape), dtype=dense.dtype, device=dev)
    oy = torch.arange(out_shape[1], device=dev)[None, :, None]
    oz = torch.arange(out_shape[2], device=dev)[None, None, :]
    step = _rows_per_chunk(out_shape[1] * out_shape[2], 8 * 6)
    for a in range(0, out_shape[0], step):
        b = min(a + step, out_shape[0])
        q = torch.round(grid.point_coords(torch.arange(a, b, device=dev)[:, None, None], oy, oz)).long()
        out[:, a:b] = dense[:, q[0], q[1], q[2]]
    return out


# ---- intensity (segrt.engine.preprocess formulas) -----------------------------------------------
def _stats(vals: torch.Tensor):
    """float32 mean and population std of ``vals``: the NumPy engine's own functions (``preprocess._mean_f32`` and
    ``_std_f32``) on a host copy, so that both engines normalise with the very same numbers (a float32 pairwise sum
    cannot be reproduced on the device). Costs one device-to-host copy of the values, for NormalizeIntensity only."""
    host = vals.detach().cpu().numpy()
    return pp._mean_f32(host), pp._std_f32(host)


def _as_param(v, like: torch.Tensor, mask: torch.Tensor | None):
    t = torch.as_tensor(np.asarray(v, dtype=np.float32), device=like.device)
    if t.dim() and mask is not None:
        t = torch.broadcast_to(t, like.shape)[mask]
    return t


def _normalize_one(x: torch.Tensor, nonzero: bool, sub, div) -> torch.Tensor:
    """``NormalizeIntensity._normalize`` on one float32 tensor, in place."""
    if nonzero:
        mask = x != 0
        if not bool(mask.any()):
            return x
        vals = x[mask]
    else:
        mask = None
        vals = x  # the same shape the NumPy engine reduces (its pairwise sum depends on the memory layout)
    mean = std = None
    if sub is None or div is None:
        mean, std = _stats(vals)
    sub_v = mean if sub is None else _as_param(sub, x, mask)
    if div is None:
        div_v = std if std != 0 else _f32(1.0)
    else:
        div_v = _as_param(div, x, mask)
        if div_v.dim():
            div_v = torch.where(div_v == 0, torch.ones_like(div_v), div_v)
        elif float(div_v) == 0:
            div_v = _f32(1.0)
    sub_v = float(sub_v) if isinstance(sub_v, np.floating) else sub_v
    div_v = float(div_v) if isinstance(div_v, np.floating) else div_v
    if mask is not None:
        x[mask] = (vals - sub_v) / div_v
        return x
    if not isinstance(sub_v, torch.Tensor) and not isinstance(div_v, torch.Tensor):
        return x.sub_(sub_v).div_(div_v)
    return (x - sub_v) / div_v


def normalize_intensity(x, nonzero=False, channel_wise=False, subtrahend=None, divisor=None):
    nonzero, channel_wise = bool(nonzero), bool(channel_wise)
    if channel_wise:
        return pp.normalize_per_channel(x, _normalize_one, nonzero, subtrahend, divisor)
    return _normalize_one(x, nonzero, subtrahend, divisor)


def _rescale(x: torch.Tensor, minv, maxv) -> torch.Tensor:
    mn, mx = x.min(), x.max()
    if bool(mn == mx):
        return x.mul_(float(_f32(minv))) if minv is not None else x
    x.sub_(mn).div_(mx - mn)
    if minv is None or maxv is None:
        return x
    return x.mul_(float(_f32(maxv - minv))).add_(float(_f32(minv)))


def scale_intensity(x, minv=0.0, maxv=1.0, factor=None, channel_wise=False):
    if minv is not None or maxv is not None:
        if bool(channel_wise):
            for c in range(len(x)):
                _rescale(x[c], minv, maxv)
            return x
        return _rescale(x, minv, maxv)
    if factor is not None:
        return x.mul_(float(_f32(1 + factor)))
    return x


def scale_intensity_range(x, a_min, a_max, b_min=None, b_max=None, clip=False):
    if a_max - a_min == 0.0:
        import warnings

        warnings.warn("Divide by zero (a_min == a_max)", stacklevel=3)
        x.sub_(float(_f32(a_min)))
        return x if b_min is None else x.add_(float(_f32(b_min)))
    x.sub_(float(_f32(a_min))).div_(float(_f32(a_max - a_min)))
    if b_min is not None and b_max is not None:
        x.mul_(float(_f32(b_max - b_min))).add_(float(_f32(b_min)))
    if bool(clip):
        x.clamp_(None if b_min is None else float(_f32(b_min)), None if b_max is None else float(_f32(b_max)))
    return x


def scale_intensity_range_percentiles(x, **params):
    """Percentiles need a global sort with MONAI's two interpolation rules: done by the NumPy engine on a host
    copy (no bundle here uses this op)."""
    host = x.detach().cpu().numpy()
    res = pp.scale_intensity_range_percentiles(host, **params)
    return torch.as_tensor(np.ascontiguousarray(res, dtype=np.float32), device=x.device)


def shift_intensity(x, offset):
    return x.add_(float(_f32(offset)))


_OPS = {
    "normalize_intensity": normalize_intensity,
    "scale_intensity": scale_intensity,
    "scale_intensity_range": scale_intensity_range,
    "scale_intensity_range_percentiles": scale_intensity_range_percentiles,
    "shift_intensity": shift_intensity,
}
if set(_OPS) != set(INTENSITY_OPS):
    raise ImportError(f"device intensity ops out of sync with segrt.spec: {sorted(set(_OPS) ^ set(INTENSITY_OPS))}")


def apply_intensity(x: torch.Tensor, ops: tuple[IntensityOp, ...]) -> torch.Tensor:
    """Apply ``ops`` in order to the float32 device tensor ``x``, which is modified in place (own it)."""
    if x.dtype != torch.float32:
        raise VolumeError(f"intensity ops expect a float32 tensor, received {x.dtype}")
    for op in ops:
        fn = _OPS.get(op.op)
        if fn is None:
            raise SpecError(f"unknown intensity op {op.op!r}; expected one of {sorted(_OPS)}")
        x = fn(x, **op.params)
    return x
