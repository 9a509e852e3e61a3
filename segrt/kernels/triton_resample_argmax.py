"""Fused trilinear resampling + argmax over classes (Triton): probability-space Invertd(bilinear) then AsDiscrete.

For each output voxel the kernel interpolates every class's probability from the 8 source neighbours and keeps
the running maximum, so the resampled (K × full-resolution) probability volume is never written. The reference is
:func:`segrt.engine.resample.invert_probabilities_argmax` (and the streaming
:class:`~segrt.engine.resample.ProbabilityInverter`): per axis the tables ``(i0, i1, w0, w1)`` of
:func:`~segrt.engine.resample.axis_weights`; the value is ``lerp_z(lerp_y(lerp_x))`` in float64 in the
reference's order, rounded to float32, then argmax with the first maximum winning and NaN counting as the
maximum (torch's and NumPy's rule). On a GPU the compiler may contract a multiply and an add into an FMA, which
can move a float64 value by one ulp: labels then differ from the reference only where two classes' float32
probabilities are within an ulp of each other.

:func:`resample_argmax_rows` runs the compiled kernel on CUDA tensors, or, with ``TRITON_INTERPRET=1``, Triton's
interpreter on CPU tensors
(the tests use that path; the environment variable must be set before triton is first imported). Import needs ``triton`` and ``torch``; check :func:`available` first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["available", "interpreted", "resample_argmax_rows"]

BLOCK = 256


def _kernel(src_ptr, lab_ptr,
            xi0_ptr, xi1_ptr, xw0_ptr, xw1_ptr,
            yi0_ptr, yi1_ptr, yw0_ptr, yw1_ptr,
            zi0_ptr, zi1_ptr, zw0_ptr, zw1_ptr,
            K, s_k, s_x, s_y, s_z,
            out_y, out_z, l_x, l_y, l_z,
            BLOCK: tl.constexpr):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < out_y * out_z
    oy = offs // out_z
    oz = offs % out_z
    x0 = tl.load(xi0_ptr + row).to(tl.int64)
    x1 = tl.load(xi1_ptr + row).to(tl.int64)
    wx0 = tl.load(xw0_ptr + row)
    wx1 = tl.load(xw1_ptr + row)
    y0 = tl.load(yi0_ptr + oy, mask=m, other=0).to(tl.int64)
    y1 = tl.load(yi1_ptr + oy, mask=m, other=0).to(tl.int64)
    wy0 = tl.load(yw0_ptr + oy, mask=m, other=0.0)
    wy1 = tl.load(yw1_ptr + oy, mask=m, other=0.0)
    z0 = tl.load(zi0_ptr + oz, mask=m, other=0).to(tl.int64)
    z1 = tl.load(zi1_ptr + oz, mask=m, other=0).to(tl.int64)
    wz0 = tl.load(zw0_ptr + oz, mask=m, other=0.0)
    wz1 = tl.load(zw1_ptr + oz, mask=m, other=0.0)
    o00 = x0 * s_x + y0 * s_y
    o01 = x0 * s_x + y1 * s_y
    o10 = x1 * s_x + y0 * s_y
    o11 = x1 * s_x + y1 * s_y
    z0s = z0 * s_z
    z1s = z1 * s_z
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    for k in range(0, K):
        p = src_ptr + k * s_k
        v000 = tl.load(p + o00 + z0s, mask=m, other=0.0).to(tl.float64)
        v001 = tl.load(p + o00 + z1s, mask=m, other=0.0).to(tl.float64)
        v010 = tl.load(p + o01 + z0s, mask=m, other=0.0).to(tl.float64)
        v011 = tl.load(p + o01 + z1s, mask=m, other=0.0).to(tl.float64)
        v100 = tl.load(p + o10 + z0s, mask=m, other=0.0).to(tl.float64)
        v101 = tl.load(p + o10 + z1s, mask=m, other=0.0).to(tl.float64)
        v110 = tl.load(p + o11 + z0s, mask=m, other=0.0).to(tl.float64)
        v111 = tl.load(p + o11 + z1s, mask=m, other=0.0).to(tl.float64)
        # axis 0 (x) first, then y, then z: the reference's order
        a00 = v000 * wx0 + v100 * wx1
        a01 = v001 * wx0 + v101 * wx1
        a10 = v010 * wx0 + v110 * wx1
        a11 = v011 * wx0 + v111 * wx1
        b0 = a00 * wy0 + a10 * wy1
        b1 = a01 * wy0 + a11 * wy1
        val = (b0 * wz0 + b1 * wz1).to(tl.float32)
        upd = (val > best) | ((val != val) & (best == best))
        best = tl.where(upd, val, best)
        arg = tl.where(upd, k, arg)
    tl.store(lab_ptr + row * l_x + oy * l_y + oz * l_z, arg.to(lab_ptr.dtype.element_ty), mask=m)


_resample_argmax = triton.jit(_kernel)


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before importing triton)."""
    return bool(triton.knobs.runtime.interpret)


def available(device) -> bool:
    """True when the kernel can run on ``device``: CUDA tensors compiled, CPU tensors under the interpreter."""
    dev = torch.device(device)
    if interpreted():
        return dev.type == "cpu"
    return dev.type == "cuda" and torch.cuda.is_available()


def resample_argmax_rows(src: torch.Tensor, xt, yt, zt, out: torch.Tensor) -> torch.Tensor:
    """Labels of ``r`` output rows: ``out (r, Y', Z')`` ← argmax_k trilinear(``src (K, n, Y, Z)`` float32).

    ``xt = (i0, i1, w0, w1)`` holds one entry per output row (``i0/i1`` index ``src``'s rows, int64; weights
    float64); ``yt``/``zt`` hold one entry per output index along Y'/Z'. ``out`` is an integer tensor
    (uint8/int16/int32) on ``src``'s device; any strides.
    """
    if src.dtype != torch.float32 or src.dim() != 4:
        raise TypeError(f"src must be a float32 (K, n, Y, Z) tensor, got {src.dtype} {tuple(src.shape)}")
    r = int(xt[0].numel())
    oy, oz = int(yt[0].numel()), int(zt[0].numel())
    if tuple(out.shape) != (r, oy, oz):
        raise ValueError(f"out must have shape {(r, oy, oz)}, got {tuple(out.shape)}")
    if r == 0 or oy * oz == 0:
        return out
    tabs = [t.contiguous() for t in (*xt, *yt, *zt)]
    for t in tabs[2::4] + tabs[3::4]:
        if t.dtype != torch.float64:
            raise TypeError(f"interpolation weights must be float64, got {t.dtype}")
    grid = (triton.cdiv(oy * oz, BLOCK), r)
    _resample_argmax[grid](src, out, *tabs, src.shape[0], *src.stride(), oy, oz, *out.stride(), BLOCK=BLOCK)
    return out
