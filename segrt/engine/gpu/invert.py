"""Back to the input grid on a torch device: Invertd(nearest) of labels, streaming Invertd(bilinear)+argmax of
probabilities, and un-orientation (docs/semantics.md §6). Same results as :class:`segrt.engine.preprocess.PreprocessRecord`
and :class:`segrt.engine.resample.ProbabilityInverter`.
"""

from __future__ import annotations

import numpy as np
import torch

from segrt.engine.gpu.preprocess import DeviceGrid, OrientedImage, fix_nearest_ties, nearest_tables, resample_nearest
from segrt.errors import SpecError
from segrt.engine import resample as K

__all__ = ["invert_labels", "unorient", "TorchProbabilityInverter", "torch_resample_argmax_rows"]


def unorient(labels: torch.Tensor, ornt, input_shape) -> torch.Tensor:
    """Oriented-grid map ``(X', Y', Z')`` → input voxel order (``unorient_labels``), contiguous."""
    if ornt is None:
        return labels
    ornt = np.asarray(ornt)
    perm = np.argsort(ornt[:, 0])
    out = labels.permute(*(int(p) for p in np.argsort(perm)))
    flips = [i for i in range(3) if ornt[i, 1] == -1]
    if flips:
        out = torch.flip(out, flips)
    if tuple(out.shape) != tuple(int(s) for s in input_shape):
        raise SpecError(f"un-orienting gave shape {tuple(out.shape)}, expected {tuple(input_shape)}")
    return out.contiguous()


def invert_labels(labels: torch.Tensor, record) -> torch.Tensor:
    """Resampled-grid labels → input grid (nearest spacing inverse, then un-orientation) in one gather when
    the spacing inverse is diagonal; ``record`` is the :class:`~segrt.engine.preprocess.PreprocessRecord`."""
    if tuple(labels.shape) != tuple(record.output_shape):
        raise SpecError(f"labels shape {tuple(labels.shape)} does not match the preprocessed grid "
                        f"{record.output_shape}")
    sp = record.spacing
    dev = labels.device
    oshape = record.oriented_shape
    if sp is None or sp.inverse_noop:
        return unorient(labels, record.ornt, record.input_shape)
    M = sp.M_inv
    if K.is_diagonal(M):
        grid, idx = nearest_tables(M, oshape, labels.shape, dev)  # per oriented axis
        if not grid.grid.theta_diagonal:  # rotated affine: fix the near-tie planes on the oriented grid
            out = labels[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
            fix_nearest_ties(labels[None], grid, out[None])
            return unorient(out, record.ornt, record.input_shape)
        if record.ornt is None:
            return labels[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
        ornt = np.asarray(record.ornt)
        # input axis i is oriented axis ornt[i,0], possibly reversed: gather straight into input order
        vec = []
        for i in range(3):
            v = idx[int(ornt[i, 0])]
            vec.append(torch.flip(v, [0]) if ornt[i, 1] == -1 else v)
        src = labels.permute(*(int(ornt[i, 0]) for i in range(3)))
        out = src[vec[0][:, None, None], vec[1][None, :, None], vec[2][None, None, :]]
        if tuple(out.shape) != tuple(record.input_shape):
            raise SpecError(f"inverting gave shape {tuple(out.shape)}, expected {tuple(record.input_shape)}")
        return out
    out = resample_nearest(OrientedImage(labels[None]), M, oshape)[0]
    return unorient(out, record.ornt, record.input_shape)


def torch_resample_argmax_rows(src: torch.Tensor, xt, yt, zt, out: torch.Tensor,
                               budget_bytes: int = 256 << 20) -> torch.Tensor:
    """Trilinear resampling of ``src (K, n, Y, Z)`` followed by argmax over K, in torch (any device).

    ``xt = (i0, i1, w0, w1)`` for the ``r`` output rows (indices into ``src``'s rows), ``yt``/``zt`` the tables
    of the two other axes; writes ``out (r, Y', Z')``. float64 arithmetic in the reference's order, cast to float32
    before the argmax (first maximum wins, NaN counts as the maximum); works a few output rows at a time.
    """
    i0, i1, w0, w1 = xt
    yi0, yi1, yw0, yw1 = yt
    zi0, zi1, zw0, zw1 = zt
    k, _, ny, nz = src.shape
    r = i0.numel()
    per_row = 8 * k * (ny * nz + 2 * yi0.numel() * nz + 2 * yi0.numel() * zi0.numel())
    step = max(1, budget_bytes // max(1, per_row))
    for a in range(0, r, step):
        b = min(a + step, r)
        rows = src.index_select(1, i0[a:b]).double().mul_(w0[a:b, None, None])
        rows.add_(src.index_select(1, i1[a:b]).double().mul_(w1[a:b, None, None]))
        t = rows.index_select(2, yi0).mul_(yw0[:, None]).add_(rows.index_select(2, yi1).mul_(yw1[:, None]))
        del rows
        v = t.index_select(3, zi0).mul_(zw0).add_(t.index_select(3, zi1).mul_(zw1)).float()
        del t
        out[a:b] = torch.argmax(v, dim=0).to(out.dtype)
    return out


class TorchProbabilityInverter:
    """Streaming bilinear inverse of class probabilities followed by argmax, on a torch device.

    The device twin of :class:`segrt.engine.resample.ProbabilityInverter` (same constructor meaning: ``M`` maps
    an index of the oriented grid ``out_shape`` to an index of the resampled grid ``src_shape``). Push float32
    probability row chunks ``(K, rows, Y, Z)`` in order; only the source rows still needed are kept, so no
    full-resolution probability volume exists. The per-row work is the fused Triton kernel
    (:mod:`segrt.kernels.triton_resample_argmax`) on CUDA when Triton is importable and ``use_triton`` is not
    False, else :func:`torch_resample_argmax_rows`. A non-diagonal ``M`` collects all rows and inverts at
    :meth:`finish` (sheared inputs only).
    """

    def __init__(self, M, src_shape, out_shape, num_classes: int, label_dtype: torch.dtype, device,
                 use_triton: bool | None = None):
        self.M = np.asarray(M, dtype=np.float64)
        self.src_shape = tuple(int(s) for s in src_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        self.k = int(num_classes)
        self.device = torch.device(device)
        self.labels = torch.zeros(self.out_shape, dtype=label_dtype, device=self.device)
        self._identity = (np.array_equal(self.M, np.eye(4)) and self.src_shape == self.out_shape)
        self._streaming = K.is_diagonal(self.M) and self.M[0, 0] > 0
        self._next_src = 0
        self._next_out = 0
        self._buf: torch.Tensor | None = None
        self._buf_start = 0
        self._collected: list[torch.Tensor] = []
        self.peak_buffer_bytes = 0
        if use_triton is None:
            use_triton = self.device.type == "cuda"
        self._kernel = None
        if use_triton:
            from segrt.kernels import triton_resample_argmax as tk

            if tk.available(self.device):
                self._kernel = tk.resample_argmax_rows
        self.uses_triton = self._kernel is not None
        if self._streaming and not self._identity:
            grid = DeviceGrid(self.M, self.src_shape, self.out_shape, self.device)
            self._x_np = K._separable_tables(grid.grid)[0]  # host copy of the axis-0 table
            self._xt, self._yt, self._zt = grid.separable_tables()

    def push(self, x0: int, probs: torch.Tensor) -> None:
        C, n = self.k, self.src_shape
        if probs.dim() != 4 or probs.shape[0] != C or tuple(probs.shape[2:]) != n[1:]:
            raise SpecError(f"probability slab must be ({C}, rows, {n[1]}, {n[2]}), received {tuple(probs.shape)}")
        if int(x0) != self._next_src:
            raise SpecError(f"slabs must arrive in order: expected start row {self._next_src}, received {x0}")
        rows = probs.shape[1]
        if self._next_src + rows > n[0]:
            raise SpecError(f"slab rows {x0}:{x0 + rows} exceed the source grid of {n[0]} rows")
        self._next_src += rows
        if self._identity:  # values are exactly p·1 + q·0 = p: only the argmax is left
            self.labels[x0:x0 + rows] = torch.argmax(probs, dim=0).to(self.labels.dtype)
            return
        if not self._streaming:
            self._collected.append(probs.clone())
            return
        self._buf = probs.clone() if self._buf is None else torch.cat([self._buf, probs], dim=1)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buf.numel() * 4)
        self._emit()

    def _emit(self) -> None:
        i0, i1, _, _ = self._x_np
        start = end = self._next_out
        while end < self.out_shape[0] and i1[end] < self._next_src:
            end += 1
        if end > start:
            b0 = self._buf_start
            xi0, xi1, xw0, xw1 = self._xt
            xt = (xi0[start:end] - b0, xi1[start:end] - b0, xw0[start:end], xw1[start:end])
            out = self.labels[start:end]
            if self._kernel is not None:
                self._kernel(self._buf, xt, self._yt, self._zt, out)
            else:
                torch_resample_argmax_rows(self._buf, xt, self._yt, self._zt, out)
            self._next_out = end
        keep_from = min(int(i0[end]) if end < self.out_shape[0] else self._next_src, self._next_src)
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[:, drop:] if drop < self._buf.shape[1] else None  # a strided view
            self._buf_start = keep_from

    def finish(self) -> torch.Tensor:
        if self._next_src != self.src_shape[0]:
            raise SpecError(f"finish() called after {self._next_src} of {self.src_shape[0]} source rows")
        if not self._identity and not self._streaming:
            from segrt.engine.gpu.preprocess import resample_linear

            full = torch.cat(self._collected, dim=1)
            self._collected = []
            probs = resample_linear(OrientedImage(full), self.M, self.out_shape, exact_zeros=False)
            self.labels = torch.argmax(probs, dim=0).to(self.labels.dtype)
        elif self._streaming and not self._identity and self._next_out != self.out_shape[0]:
            raise SpecError("internal error: output rows left unfinished")
        self._buf = None
        return self.labels
