"""One orchestrator: the stages of a segmentation written once, over two array engines.

    upload → resample → skip flags → intensity → stitch ⇄ infer → softmax → argmax | inverter → invert → download

:func:`run` drives a :class:`~segrt.engine.plan.SegmentationPlan` through those stages; the array work is done by
an *ops* object: :class:`NumpyOps` (the CPU engine, torch-free: ``segrt.engine.preprocess``, ``resample``,
``cells``, ``stitch``) or ``segrt.engine.gpu.pipeline.TorchOps`` (the device pipeline). An ops object provides:

    timer() · upload(volume) · resample(raw, plan) · window_maxima(x, plan) · intensity(x) · empty(shape, dtype)
    stitch(image, plan, predict, skip, rows, progress) → ((x0, y0, z0), block (K, dx, dy, dz)) in any order
    softmax(block) · consume(block, box, softmax, labels, probs) · inverter(plan)
    invert_labels(labels, geometry) · unorient(labels, geometry) · download(labels)

``rows=True`` asks the stitcher for whole-row slabs in row order (what the streaming probability inverter needs).
Timings: ``infer`` is the time inside the network calls, ``stitch`` the rest of the sliding-window loop (with the
CPU's gather/infer threads the two overlap: ``stitch`` is then the loop time not hidden by inference), ``invert``
includes the probability inverter's pushes.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from segrt.engine import preprocess as pp
from segrt.engine.axes import stitch_permuted
from segrt.engine.cells import window_maxima
from segrt.engine.plan import SegmentationPlan
from segrt.engine.stitch import sliding_window_blocks, sliding_window_stream

__all__ = ["run", "RunResult", "NumpyOps", "Timer", "STAGES"]

STAGES = ("upload", "preprocess", "infer", "stitch", "invert", "download")

#: Voxels per chunk of the block consumer (softmax temporaries are 1/K of a chunk, argmax's int64 8 B/voxel).
CONSUME_CHUNK_VOXELS = 1 << 15


class Timer:
    """Accumulated seconds of named stages (``perf_counter``); ``start``/``stop`` may come from several threads."""

    def __init__(self):
        self._spans: list[tuple[str, float]] = []
        self._open: dict[int, tuple[str, float]] = {}
        self._tokens = itertools.count(1)  # next() on a count is atomic: tokens stay unique across threads

    def start(self, name: str) -> int:
        tok = next(self._tokens)
        self._open[tok] = (name, time.perf_counter())
        return tok

    def stop(self, token: int) -> None:
        name, t0 = self._open.pop(token)
        self._spans.append((name, time.perf_counter() - t0))

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.tok = timer.start(name)

            def __exit__(self, *exc):
                timer.stop(self.tok)
                return False

        return _Span()

    def results(self, names=()) -> dict[str, float]:
        out = {n: 0.0 for n in names}
        for name, dt in self._spans:
            out[name] = out.get(name, 0.0) + dt
        return out


@dataclass
class RunResult:
    labels: object  # on the input grid (host array from download)
    timings: dict  # STAGES + "total"
    n_skipped: int
    probabilities: object | None  # (K, preprocessed grid) when asked for


def run(plan: SegmentationPlan, volume, ops, infer, *, softmax: bool, progress=None,
        return_probabilities: bool = False, release_input: bool = False) -> RunResult:
    """Segment ``volume`` on ``plan`` with the array engine ``ops`` and the network ``infer(batch) -> logits``.

    ``release_input``: ``volume.release()`` once resampled (the caller's own copy of a file's image, under a memory
    budget: the stitcher's phase then runs without it)."""
    timer = ops.timer()
    total = timer.start("total")
    with timer("upload"):
        raw = ops.upload(volume)
    with timer("preprocess"):
        x = ops.resample(raw, plan)
        del raw
        if release_input:
            volume.release()
        rule = plan.skip_rule
        # the skip rule is decided on the resampled image before the intensity ops (CT: Hounsfield units)
        skip = None if rule is None else np.asarray(ops.window_maxima(x, plan)) < rule.threshold
        image = ops.intensity(x)
        del x
    shape = tuple(plan.geometry.output_shape)
    k = plan.num_classes
    probs = ops.empty((k, *shape), np.float32) if return_probabilities else None
    inverter = ops.inverter(plan) if plan.use_inverter else None
    labels_res = None if inverter is not None else ops.empty(shape, np.dtype(plan.label_dtype))

    def predict(batch):
        tok = timer.start("infer")
        try:
            return infer(batch)
        finally:
            timer.stop(tok)

    loop = timer.start("loop")
    for (x0, y0, z0), block in ops.stitch(image, plan, predict, skip, rows=inverter is not None,
                                          progress=progress):
        if inverter is not None:
            if softmax:
                block = ops.softmax(block)
            if probs is not None:
                probs[:, x0:x0 + block.shape[1]] = block
            tok = timer.start("push")
            inverter.push(x0, block)
            timer.stop(tok)
        else:
            dx, dy, dz = block.shape[1:]
            box = (slice(x0, x0 + dx), slice(y0, y0 + dy), slice(z0, z0 + dz))
            ops.consume(block, box, softmax, labels_res, probs)
        del block
    timer.stop(loop)
    del image
    with timer("invert"):
        if inverter is not None:
            labels = ops.unorient(inverter.finish(), plan.geometry)
        else:
            labels = ops.invert_labels(labels_res, plan.geometry)
            del labels_res
    with timer("download"):
        labels = ops.download(labels)
    timer.stop(total)
    t = timer.results(STAGES + ("total", "loop", "push"))
    timings = {"upload": t["upload"], "preprocess": t["preprocess"], "infer": t["infer"],
               "stitch": max(t["loop"] - t["infer"] - t["push"], 0.0), "invert": t["invert"] + t["push"],
               "download": t["download"], "total": t["total"]}
    return RunResult(labels, timings, 0 if skip is None else int(skip.sum()), probs)


# ---- the CPU engine's array operations (NumPy; torch-free) -----------------------------------------------------
def _softmax_inplace(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 in float32, as monai's Activations(softmax=True) (torch.softmax, dim=0)."""
    m = x.max(axis=0, keepdims=True)
    np.subtract(x, m, out=x)
    np.exp(x, out=x)
    s = x.sum(axis=0, keepdims=True)
    np.divide(x, s, out=x)
    return x


def consume_block(block: np.ndarray, softmax: bool, labels_out: np.ndarray | None,
                  probs_out: np.ndarray | None = None) -> None:
    """Softmax (in place) and argmax of a stitched block ``(K, dx, dy, dz)``, a few rows at a time, so that no
    temporary larger than ``CONSUME_CHUNK_VOXELS`` voxels is made. Per voxel the values are exactly those of
    softmax / argmax over the whole block."""
    dx, dy, dz = block.shape[1:]
    step = max(1, CONSUME_CHUNK_VOXELS // max(dy * dz, 1))
    for r in range(0, dx, step):
        part = block[:, r:r + step]
        if softmax:
            _softmax_inplace(part)
        if probs_out is not None:
            probs_out[:, r:r + step] = part
        if labels_out is not None:
            labels_out[r:r + step] = np.argmax(part, axis=0)


class NumpyOps:
    """The CPU engine: NumPy arrays, the cell stitcher with its memory plan (``plan.memory``), ``preprocess`` /
    ``resample`` for the geometry. ``inplace_weighting``: the backend returns fresh arrays (its capabilities)."""

    def __init__(self, spec, inplace_weighting: bool = False):
        self.spec = spec
        self.inplace_weighting = bool(inplace_weighting)

    def timer(self) -> Timer:
        return Timer()

    def upload(self, volume):
        return volume  # a host Volume already

    def resample(self, volume, plan: SegmentationPlan) -> np.ndarray:
        return pp.resample(volume, self.spec.preprocessing, plan.geometry)

    def window_maxima(self, x: np.ndarray, plan: SegmentationPlan) -> np.ndarray:
        return window_maxima(x, plan.windows, plan.cells)

    def intensity(self, x: np.ndarray) -> np.ndarray:
        return pp.intensity(x, self.spec.preprocessing)

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def stitch(self, image, plan: SegmentationPlan, predict, skip, rows: bool, progress=None):
        m = plan.memory
        kw = dict(progress=progress, accum_dtype=m.accum_dtype, skip=skip, threads=m.threads,
                  inplace_weighting=self.inplace_weighting, grid=plan.cells)
        rule = plan.skip_rule
        if rule is not None:
            kw.update(background_class=rule.background_class, skip_margin=rule.margin)
        k = plan.num_classes
        if rows:
            for x0, slab in sliding_window_stream(image, plan.inference, predict, k, **kw):
                yield (x0, 0, 0), slab
        elif m.stream_axes is not None:  # another axis slowest: the planner's smallest footprint (float16 cells)
            del kw["grid"], kw["skip"]  # the transposed image's grid is planned there; the flags are reordered
            yield from stitch_permuted(image, plan.inference, predict, k, m.stream_axes, skip=skip,
                                       counts=plan.cells.counts, **kw)
        else:
            yield from sliding_window_blocks(image, plan.inference, predict, k, **kw)

    def softmax(self, block: np.ndarray) -> np.ndarray:
        consume_block(block, True, None)
        return block

    def consume(self, block, box, softmax: bool, labels, probs) -> None:
        consume_block(block, softmax, labels[box], None if probs is None else probs[(slice(None), *box)])

    def inverter(self, plan: SegmentationPlan):
        return plan.geometry.probability_inverter(plan.num_classes, np.dtype(plan.label_dtype))

    def invert_labels(self, labels, geometry):
        return geometry.invert_labels(labels)

    def unorient(self, labels, geometry):
        return geometry.unorient(labels)

    def download(self, labels):
        return labels
