"""The CPU engine's resampler and inverter (NumPy): Spacingd's resampling, Invertd's nearest and bilinear inversion —
the production code, and the truth the device kernels (``segrt.engine.gpu``, ``segrt.kernels``) are tested against.

Semantics are MONAI 1.6.1 ``SpatialResample`` on the torch path (``affine_grid`` + ``grid_sample`` in
float64, ``padding_mode="border"``, ``align_corners=False``), see ``docs/semantics.md`` (spacing; inversion).

``M`` (4x4) maps an *output* voxel index ``o`` to a *source* voxel index (``M = solve(A_src, A_dst)``).
Mathematically the source coordinate is just ``p = M·[o; 1]``, but MONAI does not compute it that way,
and the float64 noise of its route decides things that matter: whether an interpolated voxel is exactly
0 (``NormalizeIntensityd(nonzero=True)`` masks on ``x != 0``) and which way nearest rounds an exact .5.
So the coordinates here follow torch's arithmetic operation for operation (:class:`SourceGrid`):

1. ``θ = N_src·M·N_dst⁻¹`` as ``monai.networks.utils.to_norm_affine`` builds it: ``N(n) = [diag(2/n), 1/n - 1]``
   (``2/n`` as ``2·(1/n)``), ``N_dst⁻¹`` by ``np.linalg.inv``, the two products as torch's small-matrix
   kernel sums them (sequentially over k, no FMA).
2. ``affine_grid``'s base coordinates per output axis: ``linspace(-1, 1, n)·(n-1)/n`` with torch's CPU
   linspace (``fma(step, i, -1)`` below ``n//2``, ``fma(-step, n-1-i, 1)`` from there on, ``step = 2/(n-1)``;
   the FMA is computed exactly here with integers), then multiplied by ``n-1`` and divided by ``n``.
3. The grid is ``base·θᵀ`` summed sequentially: for MONAI axis d (torch reverses the axes),
   ``c_d = ((g_2·θ[d,2] + g_1·θ[d,1]) + g_0·θ[d,0]) + θ[d,3]``.
4. ``grid_sample``: ``p = ((c + 1)·n_src - 1)/2``, clamped to ``[0, n_src-1]`` (border), then
   ``floor``; linear weights ``(i0+1) - p`` and ``p - i0``; the value is the sum over the 8 corners, in the
   order tnw, tne, tsw, tse, bnw, bne, bsw, bse (torch's x = MONAI axis 2, z = MONAI axis 0), of
   ``v·((w_2·w_1)·w_0)``; nearest is ``rint`` (half to even) of the clamped ``p``.

Checked against torch 2.13 (CPU) bit for bit where torch's small float64 matmuls round without FMA (MKL with
``MKL_CBWR=COMPATIBLE``; ``tests/parity_util.torch_arithmetic`` detects it), within an ulp bound elsewhere: θ, the grid and the resampled values
(``tests/test_resample.py``). The FMA in step 2 is what torch's vectorised CPU build does (AVX2/AVX512/NEON);
a torch built without FMA (baseline x86-64 capability) would round those ~half of its linspace values differently.

Fast paths. When ``θ[:3, :3]`` is diagonal (always the case for Spacingd on non-sheared, non-rotated
affines) each coordinate depends on its own output index only, and the resampling is separable: along each
axis two source indices and two weights per output index, exactly torch's. Rotated affines give a ``θ`` with
~1e-17 off-diagonal terms: the separable path then uses the diagonal part (exact up to ~1e-14 voxel),
and :func:`resample_nearest` recomputes the few planes whose coordinate lies within that distance of a .5
tie with the exact per-voxel coordinates. The separable trilinear value sums in a different order than
torch (≤ a few float64 ulps of the neighbourhood's magnitude, invisible after the float32 cast except at
float32 rounding ties), which matters only where the value is ~0: :func:`resample_linear` recomputes every
voxel whose value is that close to 0 with torch's exact 8-corner sum (except, for a diagonal θ, voxels whose
corners of non-zero weight all hold 0: torch's sum is exactly 0 there too), so exact zeros are exactly
MONAI's; with inf/NaN in the source every non-finite result is recomputed as well. A non-diagonal ``M``
(sheared input) takes the general path, torch's arithmetic per voxel, in slabs.

Size: over 400 lines because torch's exact float64 coordinate arithmetic (SourceGrid) is shared by every path here:
separable and general trilinear resampling, nearest with tie fixing, label inversion and the streaming probability
inverter; splitting would expose SourceGrid's internals across modules.
"""

from __future__ import annotations

import functools

import numpy as np

from segrt.errors import SpecError

__all__ = [
    "is_diagonal",
    "SourceGrid",
    "torch_matmul",
    "torch_theta",
    "base_grid",
    "axis_tables",
    "axis_weights",
    "resample_linear",
    "resample_linear_points",
    "resample_nearest",
    "resample_nearest_labels",
    "invert_probabilities_argmax",
    "ProbabilityInverter",
]

_DIAG_TOL = 1e-12
_CHUNK_POINTS = 1 << 21  # output voxels per slab in the general path (~2 M points)
_ZERO_TOL = 1e-9  # |value| ≤ _ZERO_TOL·max|src| (+ the coordinate bound) is recomputed exactly


def _check_M(M) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.shape != (4, 4):
        raise SpecError(f"resampling matrix must be 4x4, received shape {tuple(M.shape)}")
    if not np.all(np.isfinite(M)):
        raise SpecError("resampling matrix must be finite")
    return M


def _check_shape(name: str, shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise SpecError(f"{name} must be 3 positive integers, received {shape!r}") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise SpecError(f"{name} must be 3 positive integers, received {shape}")
    return shape


def is_diagonal(M: np.ndarray) -> bool:
    """True when the 3x3 part of ``M`` is diagonal up to float64 noise (relative 1e-12)."""
    M = np.asarray(M, dtype=np.float64)
    R = M[:3, :3]
    off = R - np.diag(np.diag(R))
    scale = max(float(np.max(np.abs(np.diag(R)))), 1.0)
    return bool(np.all(np.abs(off) <= _DIAG_TOL * scale))


# ---- torch's coordinate arithmetic ---------------------------------------------------------------
def torch_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """float64 ``A @ B`` of small matrices as torch's CPU matmul rounds it (4x4, checked against torch 2.13):
    ``acc = 0; acc += a_k·b_k`` for k = 0, 1, ..., each product and sum rounded (no FMA). NumPy's ``@``
    (BLAS, FMA) can differ in the last bit."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise SpecError(f"torch_matmul needs (n, k) and (k, m) matrices, received {A.shape} and {B.shape}")
    C = np.zeros((A.shape[0], B.shape[1]), dtype=np.float64)
    for k in range(A.shape[1]):
        C = C + A[:, k:k + 1] * B[k:k + 1, :]
    return C


def _norm_xform(shape) -> np.ndarray:
    """``monai.networks.utils.normalize_transform(shape, align_corners=False)`` (4x4)."""
    r = 1.0 / np.asarray(shape, dtype=np.float64)  # torch: 2.0 / t is t.reciprocal() * 2.0
    N = np.diag(np.append(2.0 * r, 1.0))
    N[:3, 3] = r - 1.0
    return N


def torch_theta(M: np.ndarray, src_shape, out_shape) -> np.ndarray:
    """The normalised 4x4 ``θ`` MONAI's ``to_norm_affine`` hands to ``affine_grid`` (before its axis reversal)."""
    M = _check_M(M)
    Nd_inv = np.linalg.inv(_norm_xform(out_shape)[None])[0]  # MONAI inverts the batched (1, 4, 4) array
    return torch_matmul(torch_matmul(_norm_xform(src_shape), M), Nd_inv)


@functools.lru_cache(maxsize=512)
def _base_grid_cached(n: int) -> np.ndarray:
    if n <= 1:
        out = np.zeros(1, dtype=np.float64)
    else:
        num, den = (2.0 / (n - 1)).as_integer_ratio()  # step = num/den exactly, den a power of two
        half = n // 2
        # exact fma then one rounding: Python's int / int true division is correctly rounded
        lin = [(num * i - den) / den if i < half else (den - num * (n - 1 - i)) / den for i in range(n)]
        out = np.array(lin, dtype=np.float64) * float(n - 1) / float(n)
    out.flags.writeable = False
    return out


def base_grid(n: int) -> np.ndarray:
    """torch ``affine_grid``'s base coordinates (align_corners=False) for ``n`` output voxels (read-only)."""
    n = int(n)
    if n < 1:
        raise SpecError(f"grid size must be a positive integer, received {n}")
    return _base_grid_cached(n)


class SourceGrid:
    """Source coordinates of MONAI's resampling from ``src_shape`` to ``out_shape`` by ``M``, torch's way.

    :meth:`axis_coords` gives, per axis, the clamped float64 coordinates of the separable part (exactly
    torch's when ``theta_diagonal``); :meth:`point_coords` gives torch's coordinates of any output voxels.
    """

    def __init__(self, M: np.ndarray, src_shape, out_shape):
        self.M = _check_M(M)
        self.src_shape = _check_shape("src_shape", src_shape)
        self.out_shape = _check_shape("out_shape", out_shape)
        self.theta = torch_theta(self.M, self.src_shape, self.out_shape)
        T = self.theta[:3, :3]
        self.offdiag = np.abs(T - np.diag(np.diag(T))).sum(axis=1)  # per axis Σ_{k≠d} |θ[d,k]|
        self.theta_diagonal = bool(np.all(self.offdiag == 0.0))
        self.base = [base_grid(n) for n in self.out_shape]
        # bound on |separable - exact| coordinate per axis (voxels); 0 when θ is diagonal
        self.coord_bound = np.array([
            0.0 if self.offdiag[d] == 0.0 else
            self.src_shape[d] * (4.0 * self.offdiag[d]
                                 + 4e-15 * (1.0 + abs(self.theta[d, d]) + abs(self.theta[d, 3]))) + 1e-12
            for d in range(3)])

    def _unnormalize(self, c: np.ndarray, d: int) -> np.ndarray:
        n = float(self.src_shape[d])
        return np.clip(((c + 1.0) * n - 1.0) / 2.0, 0.0, n - 1.0)

    def axis_coords(self, d: int) -> np.ndarray:
        """Clamped source coordinates along axis ``d`` per output index, from θ's diagonal part."""
        c = self.base[d] * self.theta[d, d] + self.theta[d, 3]
        return self._unnormalize(c, d)

    def point_coords(self, o0, o1, o2) -> np.ndarray:
        """Clamped source coordinates ``(3, *shape)`` of output voxels (broadcastable index arrays)."""
        o = np.broadcast_arrays(np.asarray(o0), np.asarray(o1), np.asarray(o2))
        g = [self.base[k][o[k]] for k in range(3)]
        th = self.theta
        out = np.empty((3, *o[0].shape), dtype=np.float64)
        for d in range(3):
            c = ((g[2] * th[d, 2] + g[1] * th[d, 1]) + g[0] * th[d, 0]) + th[d, 3]
            out[d] = self._unnormalize(c, d)
        return out


def _tables(p: np.ndarray, n_src: int):
    i0f = np.floor(p)
    w1 = p - i0f
    w0 = (i0f + 1.0) - p
    i0 = i0f.astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, w0, w1


def axis_tables(M: np.ndarray, src_shape, out_shape):
    """Per axis ``(i0, i1, w0, w1)`` of the separable linear interpolation for a (near-)diagonal ``M``.

    Exactly the tables :func:`resample_linear` and :class:`ProbabilityInverter` use (torch's coordinates
    from the full θ; for a rotated affine these can differ in the last bit from :func:`axis_weights`, which
    sees one axis only). ``np.rint`` of the clamped coordinates, i.e. ``SourceGrid(...).axis_coords(d)``,
    gives the nearest indices.
    """
    return _separable_tables(SourceGrid(M, src_shape, out_shape))


def axis_weights(scale: float, offset: float, n_out: int, n_src: int):
    """Per output index along one axis: ``(i0, i1, w0, w1)`` of the clamped linear interpolation.

    The axis of a diagonal ``M`` with ``M[d, d] = scale``, ``M[d, 3] = offset``; ``p`` is torch's source
    coordinate (see the module notes), clamped to ``[0, n_src-1]``; ``i0 = floor(p)``,
    ``i1 = min(i0+1, n_src-1)``, ``w1 = p - i0``, ``w0 = (i0+1) - p`` (float64). Equal to
    :func:`axis_tables` when ``θ`` is exactly diagonal (axis-aligned grids); prefer that one for a full ``M``.
    """
    return _tables(_axis_grid(scale, offset, n_out, n_src).axis_coords(0), int(n_src))


def _axis_grid(scale, offset, n_out, n_src) -> SourceGrid:
    M = np.eye(4)
    M[0, 0], M[0, 3] = float(scale), float(offset)
    return SourceGrid(M, (int(n_src), 1, 1), (int(n_out), 1, 1))


def _nearest_index(scale: float, offset: float, n_out: int, n_src: int) -> np.ndarray:
    return np.rint(_axis_grid(scale, offset, n_out, n_src).axis_coords(0)).astype(np.intp)


def _exact_values(src: np.ndarray, p: np.ndarray, finite: bool | None = None) -> np.ndarray:
    """torch ``grid_sample`` (bilinear, border) of ``src (C, X, Y, Z)`` at clamped coordinates ``p (3, ...)``:
    float64 ``(C, ...)``, corner order and weight products as torch's ``grid_sampler_3d`` computes them.

    torch skips a corner past the last voxel (its weight is exactly 0 there); adding ``v·0`` instead is the
    same for finite ``v``, so the skip is only spelled out when ``src`` is not known to be ``finite``.
    """
    n = src.shape[1:]
    C = src.shape[0]
    if finite is None:
        finite = bool(np.isfinite(_max_abs_raw(src)))
    i0 = [np.floor(p[d]) for d in range(3)]
    w = [((i0[d] + 1.0) - p[d], p[d] - i0[d]) for d in range(3)]
    i0 = [a.astype(np.intp) for a in i0]
    i1 = [np.minimum(i0[d] + 1, n[d] - 1) for d in range(3)]
    valid1 = None if finite else [i0[d] + 1 < n[d] for d in range(3)]
    acc = np.zeros((C, *p.shape[1:]), dtype=np.float64)
    for c0 in (0, 1):  # torch z: t, b
        j0 = i1[0] if c0 else i0[0]
        for c1 in (0, 1):  # torch y: n, s
            j1 = i1[1] if c1 else i0[1]
            w01 = w[1][c1]
            for c2 in (0, 1):  # torch x: w, e
                j2 = i1[2] if c2 else i0[2]
                wt = (w[2][c2] * w01) * w[0][c0]
                valid = None
                if valid1 is not None and (c0 or c1 or c2):
                    valid = np.ones(wt.shape, dtype=bool)
                    for d, cd in ((0, c0), (1, c1), (2, c2)):
                        if cd:
                            valid &= valid1[d]
                for ch in range(C):
                    term = src[ch][j0, j1, j2] * wt  # promotes to float64
                    if valid is None:
                        acc[ch] += term
                    else:
                        acc[ch] = np.where(valid, acc[ch] + term, acc[ch])
    return acc


def _exact_values_rows(lo: np.ndarray, hi: np.ndarray, r, y, z, wx, wy, wz) -> np.ndarray:
    """:func:`_exact_values` for an exactly diagonal θ and finite values, from the slab's two gathered source
    rows ``lo``/``hi`` ``(C, rows, Y, Z)``: points ``(r, y, z)`` (``r`` slab-local), ``wx`` the slab's axis-0
    weights ``(w0, w1)``, ``wy``/``wz`` the axis tables. Same corners, weights and order as torch."""
    C = lo.shape[0]
    Y, Z = lo.shape[2:]
    rows = (lo.reshape(C, -1), hi.reshape(C, -1))
    w0 = (wx[0][r], wx[1][r])
    w1 = (wy[2][y], wy[3][y])
    w2 = (wz[2][z], wz[3][z])
    j1 = (wy[0][y], wy[1][y])
    j2 = (wz[0][z], wz[1][z])
    base = r * (Y * Z)
    acc = np.zeros((C, r.size), dtype=np.float64)
    for c0 in (0, 1):  # torch z (MONAI axis 0): t, b
        for c1 in (0, 1):  # torch y: n, s
            flat1 = base + j1[c1] * Z
            for c2 in (0, 1):  # torch x (MONAI axis 2): w, e
                flat = flat1 + j2[c2]
                wt = (w2[c2] * w1[c1]) * w0[c0]
                for ch in range(C):
                    acc[ch] += np.take(rows[c0][ch], flat) * wt
    return acc


def resample_linear_points(src: np.ndarray, M: np.ndarray, out_shape, points) -> np.ndarray:
    """MONAI's trilinear value (float64, before its float32 cast) at output voxels ``points = (o0, o1, o2)``.

    Torch's arithmetic throughout (coordinates, weights and summation order), so the values equal
    MONAI's bit for bit. ``src`` is ``(C, X, Y, Z)``; returns ``(C, *broadcast shape of points)``.
    """
    src, out_shape = _check_src(src, out_shape)
    grid = SourceGrid(M, src.shape[1:], out_shape)
    return _exact_values(src, grid.point_coords(*points))


def _interp_yz(rows: np.ndarray, wy, wz) -> np.ndarray:
    """Linear interpolation of ``rows (C, r, Y, Z)`` float64 along Y then Z."""
    iy0, iy1, wy0, wy1 = wy
    iz0, iz1, wz0, wz1 = wz
    t = rows[:, :, iy0, :] * wy0[None, None, :, None] + rows[:, :, iy1, :] * wy1[None, None, :, None]
    return t[:, :, :, iz0] * wz0 + t[:, :, :, iz1] * wz1


def _rows_linear(src_lo: np.ndarray, src_hi: np.ndarray, w0: np.ndarray, w1: np.ndarray, wy, wz) -> np.ndarray:
    """Output rows from their two source rows ``(C, r, Y, Z)`` and axis-0 weights ``(r,)``: float64."""
    rows = (src_lo.astype(np.float64) * w0[None, :, None, None]
            + src_hi.astype(np.float64) * w1[None, :, None, None])
    return _interp_yz(rows, wy, wz)


def _slab_rows(n_out0: int, plane: int, channels: int) -> int:
    return max(1, min(n_out0, _CHUNK_POINTS // max(1, plane * max(channels, 1))))


def _check_src(src: np.ndarray, out_shape) -> tuple[np.ndarray, tuple[int, int, int]]:
    src = np.asarray(src)
    if src.ndim != 4:
        raise SpecError(f"expected a channel-first (C, X, Y, Z) array, received shape {tuple(src.shape)}")
    if min(src.shape) < 1:
        raise SpecError(f"source array must not be empty, received shape {tuple(src.shape)}")
    return src, _check_shape("out_shape", out_shape)


def _max_abs_raw(src: np.ndarray) -> float:
    """max(|max|, |min|) of ``src``: inf or NaN when ``src`` holds a non-finite value."""
    if src.dtype.kind in "biu":
        return float(max(abs(int(np.max(src))), abs(int(np.min(src)))))
    return max(abs(float(np.max(src))), abs(float(np.min(src))))


def _max_abs(src: np.ndarray) -> tuple[float, bool]:
    """``(max |src| over the finite values (0 for none), whether all values are finite)``."""
    m = _max_abs_raw(src)
    if np.isfinite(m):
        return m, True
    fin = src[np.isfinite(src)]
    return (float(np.max(np.abs(fin))) if fin.size else 0.0), False


def _separable_tables(grid: SourceGrid):
    return [_tables(grid.axis_coords(d), grid.src_shape[d]) for d in range(3)]


def resample_linear(src: np.ndarray, M: np.ndarray, out_shape, out: np.ndarray | None = None,
                    exact_zeros: bool = True) -> np.ndarray:
    """Trilinear resampling with border clamp: ``out[c, o] = interp(src[c], p(o))``, float32 result.

    ``src`` is ``(C, X, Y, Z)`` (any real dtype); compute is float64. ``out`` (float32, ``(C, *out_shape)``)
    may be given to write into. With ``exact_zeros`` (default) the separable path recomputes, with torch's
    exact arithmetic, every voxel whose value is within rounding noise of 0, so that exactly the voxels MONAI
    leaves at exactly 0 are 0 here (what a ``nonzero`` normalisation sees). Elsewhere values agree with
    MONAI's to float64 rounding (bit for bit after the float32 cast except at float32 rounding ties).
    """
    src, out_shape = _check_src(src, out_shape)
    M = _check_M(M)
    C = src.shape[0]
    full = (C, *out_shape)
    if out is None:
        out = np.empty(full, dtype=np.float32)
    elif out.shape != full or out.dtype != np.float32:
        raise SpecError(f"out must be float32 of shape {full}, received {out.dtype} {tuple(out.shape)}")
    n = src.shape[1:]
    grid = SourceGrid(M, n, out_shape)
    if is_diagonal(M):
        wx, wy, wz = _separable_tables(grid)
        tol = None
        if exact_zeros:
            max_abs, finite = _max_abs(src)
            tol = max_abs * (_ZERO_TOL + 2.0 * float(grid.coord_bound.sum()))
        step = _slab_rows(out_shape[0], max(n[1] * n[2], out_shape[1] * out_shape[2]), C)
        for a in range(0, out_shape[0], step):
            b = min(a + step, out_shape[0])
            lo, hi = src[:, wx[0][a:b]], src[:, wx[1][a:b]]
            vals = _rows_linear(lo, hi, wx[2][a:b], wx[3][a:b], wy, wz)
            if tol is not None:
                near = np.abs(vals[0]) <= tol
                for c in range(1, C):
                    near |= np.abs(vals[c]) <= tol
                if grid.theta_diagonal and near.any():
                    # same corners and per-axis weights as torch: where every corner of non-zero weight holds
                    # 0, torch's sum is exactly 0 as well (0·w and v·0 terms), so only the rest is redone
                    x0, x1 = (wx[2][a:b] != 0)[:, None, None], (wx[3][a:b] != 0)[:, None, None]
                    nz = (((lo != 0) & x0) | ((hi != 0) & x1)).any(axis=0)
                    nz = (nz[:, wy[0], :] & (wy[2] != 0)[:, None]) | (nz[:, wy[1], :] & (wy[3] != 0)[:, None])
                    near &= (nz[:, :, wz[0]] & (wz[2] != 0)) | (nz[:, :, wz[1]] & (wz[3] != 0))
                if not finite:  # inf/NaN sources: redo every non-finite result with torch's corner rules
                    near |= ~np.isfinite(vals).all(axis=0)
                r, y, z = np.nonzero(near)
                if r.size and grid.theta_diagonal and finite:
                    lo_c, hi_c = np.ascontiguousarray(lo), np.ascontiguousarray(hi)
                    vals[:, r, y, z] = _exact_values_rows(lo_c, hi_c, r, y, z, (wx[2][a:b], wx[3][a:b]), wy, wz)
                elif r.size:
                    vals[:, r, y, z] = _exact_values(src, grid.point_coords(r + a, y, z), finite)
            out[:, a:b] = vals
        return out
    finite = bool(np.isfinite(_max_abs_raw(src)))
    step = _slab_rows(out_shape[0], out_shape[1] * out_shape[2], 8 + C)
    oy = np.arange(out_shape[1])[None, :, None]
    oz = np.arange(out_shape[2])[None, None, :]
    for a in range(0, out_shape[0], step):
        b = min(a + step, out_shape[0])
        out[:, a:b] = _exact_values(src, grid.point_coords(np.arange(a, b)[:, None, None], oy, oz), finite)
    return out


def resample_nearest(src: np.ndarray, M: np.ndarray, out_shape) -> np.ndarray:
    """Nearest-neighbour resampling of ``src (C, X, Y, Z)``, dtype kept (torch's coordinate, clamp, rint)."""
    src, out_shape = _check_src(src, out_shape)
    M = _check_M(M)
    n = src.shape[1:]
    grid = SourceGrid(M, n, out_shape)
    if is_diagonal(M):
        p = [grid.axis_coords(d) for d in range(3)]
        ix, iy, iz = (np.rint(p[d]).astype(np.intp) for d in range(3))
        out = src[:, ix[:, None, None], iy[None, :, None], iz[None, None, :]]
        if not grid.theta_diagonal:
            _fix_nearest_ties(src, grid, p, out)
        return out
    out = np.empty((src.shape[0], *out_shape), dtype=src.dtype)
    step = _slab_rows(out_shape[0], out_shape[1] * out_shape[2], 3)
    oy = np.arange(out_shape[1])[None, :, None]
    oz = np.arange(out_shape[2])[None, None, :]
    for a in range(0, out_shape[0], step):
        b = min(a + step, out_shape[0])
        q = np.rint(grid.point_coords(np.arange(a, b)[:, None, None], oy, oz)).astype(np.intp)
        out[:, a:b] = src[:, q[0], q[1], q[2]]
    return out


def _fix_nearest_ties(src: np.ndarray, grid: SourceGrid, p, out: np.ndarray) -> None:
    """Near-diagonal θ: redo, per voxel and exactly, the planes whose separable coordinate is within the
    coordinate bound of a .5 tie (elsewhere the exact coordinate rounds the same way)."""
    shape = grid.out_shape
    for d in range(3):
        frac = p[d] - np.floor(p[d])
        for o in np.nonzero(np.abs(frac - 0.5) <= grid.coord_bound[d])[0]:
            idx = [np.arange(s) for s in shape]
            idx[d] = np.array([o])
            o0, o1, o2 = idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]
            q = np.rint(grid.point_coords(o0, o1, o2)).astype(np.intp)
            sl = [slice(None)] * 3
            sl[d] = slice(int(o), int(o) + 1)
            out[(slice(None), *sl)] = src[:, q[0], q[1], q[2]]


def resample_nearest_labels(labels: np.ndarray, M: np.ndarray, out_shape) -> np.ndarray:
    """Nearest-neighbour resampling of a label map ``(X, Y, Z)`` (MONAI Invertd nearest; dtype kept)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise SpecError(f"labels must be (X, Y, Z), received shape {tuple(labels.shape)}")
    return resample_nearest(labels[None], M, out_shape)[0]


def _argmax0(x: np.ndarray, dtype) -> np.ndarray:
    """argmax over axis 0 of float32 values, first maximum wins, NaN counts as the maximum (torch)."""
    lab = np.argmax(x, axis=0)  # NumPy: first max; NaN propagates as max like torch
    return lab.astype(dtype, copy=False)


def invert_probabilities_argmax(probs: np.ndarray, M: np.ndarray, out_shape, dtype=np.uint8) -> np.ndarray:
    """Reference (non-streaming): bilinear resampling of probabilities to float32, then argmax.

    Exact zeros are irrelevant to an argmax, so the separable values are used as they are (no recomputation
    near 0): this is what :class:`ProbabilityInverter` reproduces bit for bit.
    """
    return _argmax0(resample_linear(probs, M, out_shape, exact_zeros=False), dtype)


class ProbabilityInverter:
    """Streaming bilinear inverse of class probabilities followed by argmax (``invert_then_argmax``).

    ``M`` maps an index of the output (oriented, pre-Spacing) grid to an index of the source
    (resampled) grid; ``src_shape`` is the resampled grid, ``out_shape`` the oriented grid. Feed the
    source probabilities ``(C, rows, Y, Z)`` float32 with :meth:`push` in increasing, contiguous
    axis-0 order; each call returns ``(start, labels_rows)`` for the output rows it could finish
    (``None`` when none), and they are also stored. :meth:`finish` returns the full label map.

    Only source rows still needed are kept: O(C × (slab + ~2 rows) × Y × Z) memory for a diagonal
    ``M`` with positive axis-0 scale. Values are exactly those of :func:`invert_probabilities_argmax`
    (same coordinates and float64 arithmetic per output row, cast to float32, first max wins). A
    non-diagonal ``M`` (sheared input) or a non-positive axis-0 scale falls back to collecting all slabs
    and inverting at :meth:`finish`.
    """

    def __init__(self, M: np.ndarray, src_shape, out_shape, num_classes: int, dtype=np.uint8):
        self.M = _check_M(M)
        self.src_shape = tuple(int(s) for s in src_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if len(self.src_shape) != 3 or len(self.out_shape) != 3 or min(self.src_shape + self.out_shape) < 1:
            raise SpecError(f"src_shape and out_shape must be 3 positive integers, received "
                            f"{self.src_shape} and {self.out_shape}")
        self.num_classes = int(num_classes)
        self.dtype = np.dtype(dtype)
        self.labels = np.zeros(self.out_shape, dtype=self.dtype)
        self._streaming = is_diagonal(self.M) and self.M[0, 0] > 0
        # identity M on equal grids (no Spacingd, or a no-op one: MONAI's Invertd changes nothing, e.g. the
        # whole-brain bundle): each source row is its own output row, interpolation weights are exactly 1 and 0,
        # so argmax of the slab itself is bit-identical and skips the C x slab float64 temporaries
        self._identity = bool(np.array_equal(self.M, np.eye(4))) and self.src_shape == self.out_shape
        self._next_src = 0  # next expected source row
        self._next_out = 0  # next output row to emit
        self._buf: np.ndarray | None = None  # kept source rows [self._buf_start, self._next_src)
        self._buf_start = 0
        self._collected: list[np.ndarray] = []
        if self._streaming:
            self._wx, self._wy, self._wz = _separable_tables(SourceGrid(self.M, self.src_shape, self.out_shape))

    def push(self, x0: int, probs: np.ndarray):
        probs = np.asarray(probs)
        C, n = self.num_classes, self.src_shape
        if probs.ndim != 4 or probs.shape[0] != C or probs.shape[2:] != n[1:]:
            raise SpecError(f"probability slab must be ({C}, rows, {n[1]}, {n[2]}), received "
                            f"{tuple(probs.shape)}")
        if int(x0) != self._next_src:
            raise SpecError(f"slabs must arrive in order: expected start row {self._next_src}, received {x0}")
        if self._next_src + probs.shape[1] > n[0]:
            raise SpecError(f"slab rows {x0}:{x0 + probs.shape[1]} exceed the source grid of {n[0]} rows")
        self._next_src += probs.shape[1]
        if self._identity:
            start = int(x0)
            self.labels[start:self._next_src] = _argmax0(probs, self.dtype)
            self._next_out = self._next_src
            return start, self.labels[start:self._next_src]
        if not self._streaming:
            self._collected.append(np.array(probs, dtype=np.float32, copy=True))
            return None
        self._buf = probs if self._buf is None else np.concatenate([self._buf, probs], axis=1)
        return self._emit()

    def _emit(self):
        i0, i1, w0, w1 = self._wx
        start = self._next_out
        end = start
        avail = self._next_src
        while end < self.out_shape[0] and i1[end] < avail:
            end += 1
        if end > start:
            b0 = self._buf_start
            lo = self._buf[:, i0[start:end] - b0]
            hi = self._buf[:, i1[start:end] - b0]
            vals = _rows_linear(lo, hi, w0[start:end], w1[start:end], self._wy, self._wz).astype(np.float32)
            self.labels[start:end] = _argmax0(vals, self.dtype)
            self._next_out = end
        # drop rows no later output row needs
        keep_from = min(int(i0[end]) if end < self.out_shape[0] else self._next_src, self._next_src)
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[:, drop:]
            self._buf_start = keep_from
            if self._buf.shape[1] == 0:
                self._buf = None
            else:
                self._buf = np.ascontiguousarray(self._buf)
        return (start, self.labels[start:end]) if end > start else None

    def finish(self) -> np.ndarray:
        if self._next_src != self.src_shape[0]:
            raise SpecError(f"finish() called after {self._next_src} of {self.src_shape[0]} source rows")
        if not self._streaming:
            full = np.concatenate(self._collected, axis=1)
            self._collected = []
            self.labels = invert_probabilities_argmax(full, self.M, self.out_shape, self.dtype)
        elif self._next_out != self.out_shape[0]:  # cannot happen: the last rows need row n-1 at most
            raise SpecError("internal error: output rows left unfinished")
        self._buf = None
        return self.labels
