"""NumPy reference kernels for resampling: the truth other kernels are tested against.

Semantics are MONAI 1.6.1 ``SpatialResample`` on the torch path (``grid_sample`` with
``padding_mode="border"``, ``align_corners=False``), see MONAI_NOTES §3.5-3.6 and §6.3:

* ``M`` (4x4) maps an *output* voxel index ``o`` to a *source* voxel index ``p = M·[o; 1]``
  (``M = solve(A_src, A_dst)``). With ``align_corners=False`` MONAI's normalise / unnormalise pair
  cancels, so this is all the geometry there is.
* border padding: every coordinate is clamped to ``[0, n-1]`` before interpolation.
* linear: trilinear interpolation, computed in float64, cast to float32 at the end. Results match
  MONAI bit for bit except at float32 rounding ties (≤ 1 ulp).
* nearest: clamp, then round half to even (``np.rint``) of the float64 coordinate ``M·o``.
  MONAI (``grid_sample`` nearest) also rounds half to even, but its coordinate carries float64
  noise from torch's normalised grid, so at *exact* ``.5`` ties MONAI's choice is noise-decided and
  may differ from ours; everywhere else the two agree exactly.

When ``M[:3, :3]`` is diagonal (always the case for Spacingd on non-sheared affines, rotated or not)
the separable fast path is used: along each axis two source indices and two weights per output
index. Otherwise the general path gathers the 8 corners per output voxel, chunked along axis 0.
Both paths process the output in slabs along axis 0 to bound memory.
"""

from __future__ import annotations

import numpy as np

from segrt.errors import SpecError

__all__ = [
    "is_diagonal",
    "axis_weights",
    "resample_linear",
    "resample_nearest",
    "resample_nearest_labels",
    "invert_probabilities_argmax",
    "ProbabilityInverter",
]

_DIAG_TOL = 1e-12
_CHUNK_POINTS = 1 << 21  # output voxels per slab in the general path (~2 M points)


def _check_M(M) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.shape != (4, 4):
        raise SpecError(f"resampling matrix must be 4x4, received shape {tuple(M.shape)}")
    if not np.all(np.isfinite(M)):
        raise SpecError("resampling matrix must be finite")
    return M


def is_diagonal(M: np.ndarray) -> bool:
    """True when the 3x3 part of ``M`` is diagonal up to float64 noise (relative 1e-12)."""
    M = np.asarray(M, dtype=np.float64)
    R = M[:3, :3]
    off = R - np.diag(np.diag(R))
    scale = max(float(np.max(np.abs(np.diag(R)))), 1.0)
    return bool(np.all(np.abs(off) <= _DIAG_TOL * scale))


def axis_weights(scale: float, offset: float, n_out: int, n_src: int):
    """Per output index along one axis: ``(i0, i1, w0, w1)`` of the clamped linear interpolation.

    ``p = scale·o + offset`` clamped to ``[0, n_src-1]``; ``i0 = floor(p)``, ``i1 = min(i0+1, n_src-1)``,
    ``w1 = p - i0``, ``w0 = 1 - w1`` (float64).
    """
    o = np.arange(n_out, dtype=np.float64)
    p = np.clip(o * scale + offset, 0.0, float(n_src - 1))
    i0 = np.floor(p)
    w1 = p - i0
    w0 = (i0 + 1.0) - p
    i0 = i0.astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, w0, w1


def _nearest_index(scale: float, offset: float, n_out: int, n_src: int) -> np.ndarray:
    o = np.arange(n_out, dtype=np.float64)
    p = np.clip(o * scale + offset, 0.0, float(n_src - 1))
    return np.rint(p).astype(np.intp)


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
    out_shape = tuple(int(s) for s in out_shape)
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise SpecError(f"out_shape must be 3 positive integers, received {out_shape}")
    return src, out_shape


def _general_coords(M: np.ndarray, x0: int, x1: int, out_shape, src_shape) -> np.ndarray:
    """Clamped float64 source coordinates ``(3, r, Y', Z')`` of output rows ``x0:x1``."""
    ox = np.arange(x0, x1, dtype=np.float64)[:, None, None]
    oy = np.arange(out_shape[1], dtype=np.float64)[None, :, None]
    oz = np.arange(out_shape[2], dtype=np.float64)[None, None, :]
    coords = []
    for d in range(3):
        p = M[d, 0] * ox + M[d, 1] * oy + M[d, 2] * oz + M[d, 3]
        coords.append(np.clip(p, 0.0, float(src_shape[d] - 1)))
    return np.stack(coords)


def resample_linear(src: np.ndarray, M: np.ndarray, out_shape, out: np.ndarray | None = None) -> np.ndarray:
    """Trilinear resampling with border clamp: ``out[c, o] = interp(src[c], M·o)``, float32 result.

    ``src`` is ``(C, X, Y, Z)`` (any real dtype); compute is float64. ``out`` (float32, ``(C, *out_shape)``)
    may be given to write into.
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
    if is_diagonal(M):
        wx = axis_weights(M[0, 0], M[0, 3], out_shape[0], n[0])
        wy = axis_weights(M[1, 1], M[1, 3], out_shape[1], n[1])
        wz = axis_weights(M[2, 2], M[2, 3], out_shape[2], n[2])
        step = _slab_rows(out_shape[0], max(n[1] * n[2], out_shape[1] * out_shape[2]), C)
        for a in range(0, out_shape[0], step):
            b = min(a + step, out_shape[0])
            out[:, a:b] = _rows_linear(src[:, wx[0][a:b]], src[:, wx[1][a:b]], wx[2][a:b], wx[3][a:b], wy, wz)
        return out
    step = _slab_rows(out_shape[0], out_shape[1] * out_shape[2], 8)
    for a in range(0, out_shape[0], step):
        b = min(a + step, out_shape[0])
        p = _general_coords(M, a, b, out_shape, n)
        i0 = np.floor(p)
        f = p - i0
        i0 = i0.astype(np.intp)
        i1 = [np.minimum(i0[d] + 1, n[d] - 1) for d in range(3)]
        g = [(1.0 - f[d], f[d]) for d in range(3)]
        idx = [(i0[d], i1[d]) for d in range(3)]
        for c in range(C):
            s = src[c]
            acc = np.zeros(p.shape[1:], dtype=np.float64)
            for cx in (0, 1):
                for cy in (0, 1):
                    for cz in (0, 1):
                        w = g[0][cx] * g[1][cy] * g[2][cz]
                        acc += w * s[idx[0][cx], idx[1][cy], idx[2][cz]]
            out[c, a:b] = acc
    return out


def resample_nearest(src: np.ndarray, M: np.ndarray, out_shape) -> np.ndarray:
    """Nearest-neighbour resampling of ``src (C, X, Y, Z)``, dtype kept (clamp, then round half even)."""
    src, out_shape = _check_src(src, out_shape)
    M = _check_M(M)
    n = src.shape[1:]
    if is_diagonal(M):
        ix, iy, iz = (_nearest_index(M[d, d], M[d, 3], out_shape[d], n[d]) for d in range(3))
        return src[:, ix[:, None, None], iy[None, :, None], iz[None, None, :]]
    out = np.empty((src.shape[0], *out_shape), dtype=src.dtype)
    step = _slab_rows(out_shape[0], out_shape[1] * out_shape[2], 3)
    for a in range(0, out_shape[0], step):
        b = min(a + step, out_shape[0])
        p = np.rint(_general_coords(M, a, b, out_shape, n)).astype(np.intp)
        out[:, a:b] = src[:, p[0], p[1], p[2]]
    return out


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
    """Reference (non-streaming): bilinear resampling of probabilities to float32, then argmax."""
    return _argmax0(resample_linear(probs, M, out_shape), dtype)


class ProbabilityInverter:
    """Streaming bilinear inverse of class probabilities followed by argmax (``invert_then_argmax``).

    ``M`` maps an index of the output (oriented, pre-Spacing) grid to an index of the source
    (resampled) grid; ``src_shape`` is the resampled grid, ``out_shape`` the oriented grid. Feed the
    source probabilities ``(C, rows, Y, Z)`` float32 with :meth:`push` in increasing, contiguous
    axis-0 order; each call returns ``(start, labels_rows)`` for the output rows it could finish
    (``None`` when none), and they are also stored. :meth:`finish` returns the full label map.

    Only source rows still needed are kept: O(C × (slab + ~2 rows) × Y × Z) memory for a diagonal
    ``M`` with positive axis-0 scale. Values are exactly those of :func:`invert_probabilities_argmax`
    (same float64 arithmetic per output row, cast to float32, first max wins). A non-diagonal ``M``
    (sheared input) or a non-positive axis-0 scale falls back to collecting all slabs and inverting
    at :meth:`finish`.
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
        self._next_src = 0  # next expected source row
        self._next_out = 0  # next output row to emit
        self._buf: np.ndarray | None = None  # kept source rows [self._buf_start, self._next_src)
        self._buf_start = 0
        self._collected: list[np.ndarray] = []
        if self._streaming:
            n = self.src_shape
            self._wx = axis_weights(self.M[0, 0], self.M[0, 3], self.out_shape[0], n[0])
            self._wy = axis_weights(self.M[1, 1], self.M[1, 3], self.out_shape[1], n[1])
            self._wz = axis_weights(self.M[2, 2], self.M[2, 3], self.out_shape[2], n[2])

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
