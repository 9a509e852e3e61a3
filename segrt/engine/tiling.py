"""Sliding-window geometry: padding, scan intervals, window starts and the importance map.

Pure functions (NumPy only) that reproduce ``monai.inferers.sliding_window_inference`` (MONAI 1.6.1,
``docs/semantics.md`` §5) exactly:

* **padding** (§5.2): per spatial axis ``diff = max(roi - size, 0)``, ``low = diff // 2``,
  ``high = diff - low`` (the odd voxel goes to the high end); ``constant`` pads with ``cval``,
  ``replicate`` repeats the edge voxel. The padded size is ``max(size, roi)``.
* **scan interval** (§5.3): ``roi`` where ``roi == padded size``, else ``max(int(roi * (1 - overlap)), 1)``
  (Python float, truncation), per axis.
* **window starts** (§5.4): ``count = 1 + first d >= 0 with d*interval + roi >= size``; start ``k`` is
  ``min(k*interval, size - roi)`` so the last window is flush with the end. Windows are the Cartesian
  product in C order (axis 0 slowest).
* **importance map** (§5.6): ones (``constant``) or the outer product ``((g0 ⊗ g1) ⊗ g2)`` of 1-D Gaussians
  ``g = exp(x² / (-2σ²))``, ``x = -(n-1)/2 … (n-1)/2``, ``σ = sigma_scale · n``, then clamped from below
  at ``max(min(map), 1e-3)``; float32.

Bit-exactness of the Gaussian: torch's float32 ``exp`` is not correctly rounded, so a NumPy profile differs
from MONAI's by up to 1 ulp in about 1 % of the entries. The exporter therefore stores the torch-computed
1-D profiles (:func:`torch_gaussian_profiles`) in ``InferenceSpec.importance_profiles``; given those,
:func:`importance_map` is bit-identical to ``monai.data.utils.compute_importance_map``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from segrt.errors import SpecError, VolumeError
from segrt.spec import InferenceSpec

__all__ = [
    "WindowPlan",
    "plan_windows",
    "pad_widths",
    "scan_interval",
    "window_starts",
    "importance_map",
    "gaussian_profile",
    "torch_gaussian_profiles",
]

_MIN_WEIGHT = 1e-3


def _as_triple(values, name: str, cast=int) -> tuple:
    try:
        out = tuple(cast(v) for v in values)
    except TypeError:
        raise SpecError(f"{name}: expected a sequence of 3 values, got {values!r}") from None
    if len(out) != 3:
        raise SpecError(f"{name}: expected 3 values (one per spatial axis), got {len(out)}: {values!r}")
    return out


def _check_shape(spatial_shape) -> tuple[int, int, int]:
    shape = _as_triple(spatial_shape, "spatial_shape")
    if any(s < 1 for s in shape):
        raise VolumeError(f"spatial shape must be positive on every axis, got {shape}")
    return shape


def pad_widths(spatial_shape: Sequence[int], roi_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Per-axis ``(low, high)`` padding MONAI applies when the image is smaller than the ROI."""
    shape = _check_shape(spatial_shape)
    roi = _as_triple(roi_size, "roi_size")
    pads = []
    for s, r in zip(shape, roi):
        diff = max(r - s, 0)
        low = diff // 2
        pads.append((low, diff - low))
    return tuple(pads)


def scan_interval(padded_shape: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float]) -> tuple[int, int, int]:
    """MONAI's ``_get_scan_interval``: ``roi`` if ``roi == size`` else ``max(int(roi*(1-overlap)), 1)``."""
    shape = _as_triple(padded_shape, "padded_shape")
    roi = _as_triple(roi_size, "roi_size")
    ov = _as_triple(overlap, "overlap", float)
    out = []
    for s, r, o in zip(shape, roi, ov):
        if r == s:
            out.append(int(r))
        else:
            iv = int(r * (1 - o))
            out.append(iv if iv > 0 else 1)
    return tuple(out)


def window_starts(size: int, roi: int, interval: int) -> tuple[int, ...]:
    """Window starts along one (padded) axis, as ``monai.data.utils.dense_patch_slices`` computes them."""
    if roi > size:
        raise SpecError(f"window_starts expects a padded size >= roi, got size {size} < roi {roi}")
    if interval < 0:
        raise SpecError(f"scan interval must be >= 0, got {interval}")
    if interval == 0:
        n = 1
    else:
        num = int(math.ceil(float(size) / interval))
        n = next((d + 1 for d in range(num) if d * interval + roi >= size), 1)
    starts = []
    for k in range(n):
        s = k * interval
        s -= max(s + roi - size, 0)
        starts.append(s)
    return tuple(starts)


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one volume lie, in the coordinates of the padded volume.

    ``windows`` is the list of window starts ``(x, y, z)`` in MONAI's order (C order over
    ``starts``); window ``i`` covers ``[x, x+roi_x) × [y, y+roi_y) × [z, z+roi_z)``.
    """

    spatial_shape: tuple[int, int, int]
    roi_size: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    pads: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    interval: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    windows: tuple[tuple[int, int, int], ...]

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    @property
    def crop(self) -> tuple[slice, slice, slice]:
        """Slices of the padded volume that hold the unpadded one."""
        return tuple(slice(lo, lo + s) for (lo, _), s in zip(self.pads, self.spatial_shape))


def plan_windows(spatial_shape: Sequence[int], spec: InferenceSpec) -> WindowPlan:
    """The sliding-window plan of a volume of ``spatial_shape`` (X, Y, Z) under ``spec``."""
    if not isinstance(spec, InferenceSpec):
        raise SpecError(f"plan_windows expects an InferenceSpec, got {type(spec).__name__}")
    shape = _check_shape(spatial_shape)
    roi = tuple(int(r) for r in spec.roi_size)
    pads = pad_widths(shape, roi)
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(shape, pads))
    iv = scan_interval(padded, roi, spec.overlap)
    starts = tuple(window_starts(p, r, i) for p, r, i in zip(padded, roi, iv))
    windows = tuple((a, b, c) for a in starts[0] for b in starts[1] for c in starts[2])
    return WindowPlan(shape, roi, padded, pads, iv, starts, windows)


def gaussian_profile(n: int, sigma_scale: float) -> np.ndarray:
    """NumPy 1-D Gaussian profile of length ``n`` (float32), within 1 ulp of MONAI's torch profile.

    ``x`` and ``x² / (-2σ²)`` are computed in float32 exactly as torch does; the exponential is taken in
    float64 and rounded (torch's float32 ``exp`` differs from the correctly rounded value by ≤ 1 ulp).
    """
    n = int(n)
    if n < 1:
        raise SpecError(f"Gaussian profile length must be >= 1, got {n}")
    sigma = n * float(sigma_scale)
    if sigma == 0:
        raise SpecError(f"sigma_scale must be non-zero for a Gaussian importance map, got {sigma_scale}")
    x = np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0)
    t = (x * x) / np.float32(-2 * sigma ** 2)
    return np.exp(t.astype(np.float64)).astype(np.float32)


def torch_gaussian_profiles(roi_size: Sequence[int], sigma_scale: Sequence[float]) -> list[list[float]]:
    """The 1-D Gaussian profiles exactly as MONAI computes them (torch float32), as Python floats.

    For the exporter: store the result in ``InferenceSpec.importance_profiles``. Imports torch lazily.
    """
    import torch  # noqa: PLC0415  (export-time only)

    roi = _as_triple(roi_size, "roi_size")
    sig = _as_triple(sigma_scale, "sigma_scale", float)
    out = []
    for n, s in zip(roi, sig):
        sigma = n * s
        x = torch.arange(start=-(n - 1) / 2.0, end=(n - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x ** 2 / (-2 * sigma ** 2))
        out.append([float(v) for v in g.tolist()])
    return out


def importance_map(roi_size: Sequence[int], mode: str = "constant",
                   sigma_scale: Sequence[float] = (0.125, 0.125, 0.125),
                   profiles: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """The per-window weight map (float32, shape ``roi_size``), as ``compute_importance_map``.

    ``profiles``: the three float32 1-D Gaussian profiles computed by torch (bit-exact with MONAI);
    without them they are computed with NumPy (≤ 1 ulp per profile entry).
    """
    roi = _as_triple(roi_size, "roi_size")
    if any(r < 1 for r in roi):
        raise SpecError(f"roi_size must be positive, got {roi}")
    if mode == "constant":
        return np.ones(roi, dtype=np.float32)
    if mode != "gaussian":
        raise SpecError(f"blend mode must be 'constant' or 'gaussian', got {mode!r}")
    if profiles is not None:
        if len(profiles) != 3:
            raise SpecError(f"importance profiles: expected 3 (one per axis), got {len(profiles)}")
        g = [np.asarray(p, dtype=np.float32) for p in profiles]
        for axis, (p, r) in enumerate(zip(g, roi)):
            if p.shape != (r,):
                raise SpecError(f"importance profile of axis {axis}: expected length {r}, got shape {p.shape}")
    else:
        sig = _as_triple(sigma_scale, "sigma_scale", float)
        g = [gaussian_profile(r, s) for r, s in zip(roi, sig)]
    m = g[0][:, None] * g[1][None, :]
    m = m[:, :, None] * g[2][None, None, :]
    floor = np.float32(max(float(m.min()), _MIN_WEIGHT))
    np.maximum(m, floor, out=m)
    return m
