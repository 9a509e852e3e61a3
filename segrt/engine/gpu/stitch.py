"""Streaming sliding-window stitching on a torch device (the device twin of :mod:`segrt.engine.stitch`).

Same windows, batches, importance map and per-voxel float32 addition order as MONAI's
``sliding_window_inference`` (docs/semantics.md §5): the batch is weighted first (``pred * w`` rounded to the
prediction's dtype, as MONAI's in-place ``pred *= w``), then windows are added one after another in window
order into a ring of ``roi_x`` rows along axis 0 (``acc (K, roi_x, Yp, Zp)`` + ``count (roi_x, Yp, Zp)``).
When every window of an axis-0 start is in, the rows below the next start are final: they are divided by the
count map and handed out in chunks of at most ``chunk_rows`` rows, then cleared for reuse.

``accum_dtype`` float32 reproduces :func:`segrt.engine.stitch.sliding_window_stream` bit for bit (given the same
network outputs); float16 halves the ring (each addition rounded to float16; the division is done in float32).

``skip`` (one flag per window, from the artifact's skip rule): a skipped window is not run; it adds the constant
logits 0 (background) / ``-margin`` (others), weighted, at its place in the window order - exactly the NumPy
stitcher's rule ("Skipping" in :mod:`segrt.engine.stitch`); the windows that run are batched among themselves.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from segrt.engine.cells import slab_bounds

from segrt.engine.stitch import SKIP_MARGIN
from segrt.engine.tiling import WindowPlan, importance_map, plan_windows
from segrt.errors import InferenceError, SpecError
from segrt.spec import InferenceSpec

__all__ = ["TorchStitcher"]

_FINAL_CHUNK_BYTES = 256 << 20



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


class TorchStitcher:
    """Sliding-window inference of a device image ``(C, X, Y, Z)``, yielding finished float32 row chunks.

    ``infer(batch)`` gets a float32 ``(b, C, *roi)`` tensor (reused between calls) and returns
    ``(b, K, *roi)`` (float32 or float16) on the same device. ``on_infer(start)``/``on_infer(None)`` hooks let a
    timer bracket the network calls. :attr:`buffer_bytes` lists the stitcher's own buffers.
    """

    def __init__(self, image: torch.Tensor, spec: InferenceSpec, infer: Callable, num_classes: int,
                 accum_dtype: torch.dtype = torch.float32, chunk_bytes: int = _FINAL_CHUNK_BYTES,
                 batch_size: int | None = None, skip=None, background_class: int = 0,
                 skip_margin: float = SKIP_MARGIN, windows: WindowPlan | None = None):
        if not isinstance(spec, InferenceSpec):
            raise SpecError(f"spec must be an InferenceSpec, got {type(spec).__name__}")
        if image.dim() != 4 or image.dtype != torch.float32:
            raise InferenceError(f"image must be a float32 (C, X, Y, Z) tensor, got {image.dtype} "
                                 f"{tuple(image.shape)}")
        if accum_dtype not in (torch.float32, torch.float16):
            raise SpecError(f"accum_dtype must be torch.float32 or torch.float16, got {accum_dtype}")
        self.spec = spec
        self.infer = infer
        self.k = int(num_classes)
        self.accum_dtype = accum_dtype
        # the caller's planned windows (segrt.engine.plan), else planned here
        self.plan = plan_windows(tuple(image.shape[1:]), spec) if windows is None else windows
        if tuple(self.plan.spatial_shape) != tuple(image.shape[1:]) or tuple(self.plan.roi_size) != tuple(spec.roi_size):
            raise SpecError(f"the window plan is for {self.plan.spatial_shape} / roi {self.plan.roi_size}, the image "
                            f"is {tuple(image.shape[1:])} / roi {tuple(spec.roi_size)}")
        self.device = image.device
        pads = self.plan.pads
        if any(lo or hi for lo, hi in pads):
            fpad = (pads[2][0], pads[2][1], pads[1][0], pads[1][1], pads[0][0], pads[0][1])
            if spec.padding_mode == "constant":
                image = F.pad(image[None], fpad, mode="constant", value=float(np.float32(spec.cval)))[0]
            else:
                image = F.pad(image[None], fpad, mode="replicate")[0]
        self.image = image
        roi = self.plan.roi_size
        _, yp, zp = self.plan.padded_shape
        w = importance_map(roi, spec.blend_mode, spec.sigma_scale, spec.importance_profiles)
        self.weight = torch.as_tensor(w, device=self.device)
        self.acc = torch.zeros((self.k, roi[0], yp, zp), dtype=accum_dtype, device=self.device)
        self.count = torch.zeros((roi[0], yp, zp), dtype=torch.float32, device=self.device)
        # Windows per network call. MONAI batches by sw_batch_size; any batch size gives the same stitched result
        # (windows are independent and are still weighted and added one by one in MONAI's order), and on a GPU a
        # larger batch is far cheaper per window (batch 1 is latency-bound: see GPU_BATCH in
        # segrt.engine.backends.torch_cuda; reproduce with python benchmarks/bench_gpu.py --gpu-batch 1 4).
        bsz = int(batch_size or spec.sw_batch_size)
        if bsz < 1:
            raise SpecError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_in = torch.empty((bsz, image.shape[0], *roi), dtype=torch.float32, device=self.device)
        self._weighted: dict[torch.dtype, torch.Tensor] = {}
        y, z = self.plan.spatial_shape[1:]
        self.chunk_rows = max(1, int(chunk_bytes) // (4 * self.k * y * z))
        self.chunk_rows = min(self.chunk_rows, max(hi - lo for lo, hi in slab_bounds(self.plan)))
        self.out = torch.empty((self.k, self.chunk_rows, y, z), dtype=torch.float32, device=self.device)
        self.on_infer: Callable | None = None
        n_win = self.plan.n_windows
        if skip is None:
            self.skip = np.zeros(n_win, dtype=bool)
        else:
            self.skip = np.asarray(skip, dtype=bool).reshape(-1)
            if self.skip.shape != (n_win,):
                raise InferenceError(f"skip must hold one flag per window ({n_win}), got {self.skip.shape[0]}")
        self.background_class = int(background_class)
        if self.skip.any() and not 0 <= self.background_class < self.k:
            raise SpecError(f"background_class must be in [0, {self.k}), got {background_class}")
        # a skipped window's weighted logits: 0 for the background, -margin·w elsewhere (float32, as the NumPy
        # stitcher computes them)
        self.skip_weighted = (self.weight * float(np.float32(-float(skip_margin)))) if self.skip.any() else None

    @property
    def buffer_bytes(self) -> dict[str, int]:
        nb = lambda t: t.numel() * t.element_size()  # noqa: E731
        out = {"ring": nb(self.acc), "count": nb(self.count), "batch": nb(self.batch_in), "chunk": nb(self.out),
               "weight": nb(self.weight)}
        out["weighted"] = sum(nb(t) for t in self._weighted.values())
        if self.image.data_ptr() and self.plan.pads != ((0, 0), (0, 0), (0, 0)):
            out["padded_image"] = nb(self.image)
        return out

    def _weighted_buf(self, dtype) -> torch.Tensor:
        if dtype not in self._weighted:
            self._weighted[dtype] = torch.empty((self.batch_in.shape[0], self.k, *self.plan.roi_size),
                                                dtype=dtype, device=self.device)
        return self._weighted[dtype]

    def _accumulate(self, weighted: torch.Tensor | None, start) -> None:
        """Add one window (``weighted``: its weighted prediction, or None for a skipped window) into the ring."""
        ring = self.acc.shape[1]
        rx, ry, rz = self.plan.roi_size
        x0, y0, z0 = start
        ys, zs = slice(y0, y0 + ry), slice(z0, z0 + rz)
        bg = self.background_class
        for p, off, n in ring_segments(x0, rx, ring):
            if weighted is None:
                s = self.skip_weighted[off:off + n]
                self.acc[:bg, p:p + n, ys, zs] += s
                self.acc[bg + 1:, p:p + n, ys, zs] += s
            else:
                self.acc[:, p:p + n, ys, zs] += weighted[:, off:off + n]
            self.count[p:p + n, ys, zs] += self.weight[off:off + n]

    def _finished(self, lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Divide, crop and hand out padded rows ``[lo, hi)`` in chunks; then clear them in the ring."""
        plan = self.plan
        low = plan.pads[0][0]
        ulo, uhi = max(lo - low, 0), min(hi - low, plan.spatial_shape[0])
        cy, cz = plan.crop[1], plan.crop[2]
        ring = self.acc.shape[1]
        for a in range(ulo, uhi, self.chunk_rows):
            b = min(a + self.chunk_rows, uhi)
            out = self.out[:, :b - a]
            for p, off, n in ring_segments(a + low, b - a, ring):
                torch.div(self.acc[:, p:p + n, cy, cz], self.count[p:p + n, cy, cz], out=out[:, off:off + n])
            yield a, out
        for p, _, n in ring_segments(lo, hi - lo, ring):
            self.acc[:, p:p + n].zero_()
            self.count[p:p + n].zero_()

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(x0, probs)`` with ``probs`` float32 ``(K, rows, Y, Z)`` (a reused buffer: consume it before
        the next step) for the unpadded rows ``[x0, x0+rows)``, in increasing ``x0``, covering every row once."""
        plan = self.plan
        windows = plan.windows
        n_win = len(windows)
        bsz = self.batch_in.shape[0]
        per_x = len(plan.starts[1]) * len(plan.starts[2])
        bounds = slab_bounds(plan)
        rx, ry, rz = plan.roi_size
        expect = (self.k, *plan.roi_size)
        run = [i for i in range(n_win) if not self.skip[i]]
        nxt = 0  # the next window (in MONAI's order) to add

        def add(i, weighted):
            self._accumulate(weighted, windows[i])
            if (i + 1) % per_x == 0:  # the last window of this axis-0 start: rows below the next are final
                return self._finished(*bounds[i // per_x])
            return ()

        for b0 in range(0, len(run), bsz):
            idx = run[b0:b0 + bsz]
            nb = len(idx)
            for j, i in enumerate(idx):
                x, y, z = windows[i]
                self.batch_in[j].copy_(self.image[:, x:x + rx, y:y + ry, z:z + rz])
            if self.on_infer is not None:
                self.on_infer(True)
            pred = self.infer(self.batch_in[:nb])
            if self.on_infer is not None:
                self.on_infer(False)
            if not isinstance(pred, torch.Tensor):
                raise InferenceError(f"infer must return a torch.Tensor, got {type(pred).__name__}")
            if tuple(pred.shape) != (nb, *expect):
                raise InferenceError(f"infer returned shape {tuple(pred.shape)}; expected {(nb, *expect)} "
                                     f"(batch, num_classes, *roi_size)")
            if pred.dtype not in (torch.float32, torch.float16):
                pred = pred.float()
            wbuf = self._weighted_buf(pred.dtype)[:nb]
            torch.mul(pred, self.weight, out=wbuf)  # computed in float32, rounded to pred's dtype (MONAI §5.7)
            del pred
            for j, i in enumerate(idx):
                while nxt < i:  # skipped windows before this one, in order
                    yield from add(nxt, None)
                    nxt += 1
                yield from add(i, wbuf[j])
                nxt += 1
        while nxt < n_win:
            yield from add(nxt, None)
            nxt += 1
