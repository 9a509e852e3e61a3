"""Stitching with another axis slowest: the cell stitcher's smallest footprint for long volumes.

The cell stitcher (:mod:`segrt.engine.stitch`) visits windows with axis 0 slowest, so the cells alive at once are
dominated by the axis-0 overlap band over the whole ``Y × Z`` plane (``Ox · Y · Z`` voxels, each ``K`` accumulator
values). On a whole-body CT resampled to 1.5 mm (287 × 287 × 397 voxels, 105 classes) that band is ``24 · 287 · 397``
voxels; with the long axis (397) slowest it is ``24 · 287 · 287``, a quarter less: 0.19 GiB of float16 cells.

:func:`stitch_permuted` runs the stitcher on a transposed *view* of the preprocessed image (no copy) with the
inference spec's per-axis settings permuted alike, hands the network each window in its own axis order (a
``(B, C, rx, ry, rz)`` copy of the window, as always), takes the network's output back as a transposed view
(weighted in place, no copy), and yields the finished blocks in the image's own coordinates. The windows are
the same (MONAI's scan grid is per axis), and so is every voxel's set of weighted contributions; only the
order of additions per voxel differs from MONAI's, which is why the memory planner offers it only with the
float16 accumulator (a reduced-precision path already) and one window per network call
(:func:`segrt.engine.budget.plan_memory`), and the importance map is the product of the same per-axis profiles
in another order (float32: at most 1 ulp apart).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Sequence

import numpy as np

from segrt.errors import SpecError
from segrt.spec import InferenceSpec

__all__ = ["IDENTITY", "check_axes", "permute_spec", "permute_shape", "permute_skip", "stitch_permuted",
           "candidate_axes"]

IDENTITY = (0, 1, 2)


def check_axes(axes) -> tuple[int, int, int]:
    """``axes`` as a permutation of (0, 1, 2), or SpecError."""
    t = tuple(int(a) for a in axes)
    if sorted(t) != [0, 1, 2]:
        raise SpecError(f"stream axes must be a permutation of (0, 1, 2), got {axes!r}")
    return t


def candidate_axes() -> list[tuple[int, int, int]]:
    """Every axis order, the identity first."""
    return list(itertools.permutations(IDENTITY))


def permute_shape(shape: Sequence[int], axes) -> tuple[int, int, int]:
    return tuple(int(shape[a]) for a in check_axes(axes))


def permute_spec(spec: InferenceSpec, axes) -> InferenceSpec:
    """The inference spec of the transposed image ``image.transpose(0, *(1 + a for a in axes))``."""
    axes = check_axes(axes)
    if axes == IDENTITY:
        return spec

    def p(v):
        return None if v is None else tuple(v[a] for a in axes)

    return dataclasses.replace(spec, roi_size=p(spec.roi_size), overlap=p(spec.overlap),
                               sigma_scale=p(spec.sigma_scale), importance_profiles=p(spec.importance_profiles))


def permute_skip(skip, counts: Sequence[int], axes):
    """Per-window flags in MONAI's window order (axis 0 slowest, ``counts`` windows per axis) → the same flags in
    the window order of the transposed image."""
    if skip is None:
        return None
    flags = np.asarray(skip, dtype=bool).reshape(tuple(int(c) for c in counts))
    return np.ascontiguousarray(flags.transpose(check_axes(axes))).reshape(-1)


def stitch_permuted(image: np.ndarray, spec: InferenceSpec, predict, num_classes: int, axes, *, skip=None,
                    counts=None, **kw) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
    """:func:`segrt.engine.stitch.sliding_window_blocks` with axis ``axes[0]`` of ``image`` ``(C, X, Y, Z)``
    slowest; yield ``((x0, y0, z0), block (K, dx, dy, dz))`` in ``image``'s coordinates (the block a transposed view
    of the stitcher's buffer: same rules, do not keep it). ``skip``: flags in MONAI's window order of ``image``,
    with ``counts`` windows per axis. ``kw`` goes to the stitcher (no ``grid``: the transposed image's is planned
    there)."""
    from segrt.engine.stitch import sliding_window_blocks

    axes = check_axes(axes)
    if axes == IDENTITY:
        yield from sliding_window_blocks(image, spec, predict, num_classes, skip=skip, **kw)
        return
    inv = tuple(int(i) for i in np.argsort(axes))
    view = image.transpose(0, *(1 + a for a in axes))

    def predict_t(batch):  # (B, C, *roi in the transposed order) → the network's order and back
        out = predict(np.ascontiguousarray(batch.transpose(0, 1, *(2 + i for i in inv))))
        return out.transpose(0, 1, *(2 + a for a in axes))

    flags = None if skip is None else permute_skip(skip, counts, axes)
    for origin, block in sliding_window_blocks(view, permute_spec(spec, axes), predict_t, num_classes, skip=flags,
                                               **kw):
        yield tuple(int(origin[i]) for i in inv), block.transpose(0, *(1 + i for i in inv))
