"""One plan per segmentation, made before a voxel is read.

:class:`SegmentationPlan` holds everything decided from the artifact, the engine's options and the input's header
(its affine and shape): the preprocessing geometry (orientation and spacing records, output grid), the window grid,
the skip rule, the memory plan (batch size, accumulator, stitching threads, predicted peak), and how the result is
finished (label argmax or streamed probability inversion). :meth:`segrt.engine.engine.Engine.plan` makes it;
:meth:`~segrt.engine.engine.Engine.segment` makes exactly one per call and the stages downstream consume it instead
of planning again. ``segrt run --plan`` prints it (with a predicted time from a one-batch calibration of the
backend) without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

from segrt.engine.budget import MemoryPlan, format_size
from segrt.engine import preprocess as pp
from segrt.engine.preprocess import PreprocessRecord
from segrt.engine.cells import CellGrid
from segrt.engine.tiling import WindowPlan, plan_windows
from segrt.errors import VolumeError
from segrt.spec import InferenceSpec, SkipRule, Spec

__all__ = ["SegmentationPlan", "Calibration", "make_plan"]


@dataclass(frozen=True)
class Calibration:
    """Seconds of one network call of ``batch`` windows on ``backend`` (zeros in, the second of two calls)."""

    backend: str
    batch: int
    seconds_per_call: float

    @property
    def seconds_per_window(self) -> float:
        return self.seconds_per_call / max(self.batch, 1)


@dataclass(frozen=True)
class SegmentationPlan:
    """What one segmentation will do; see the module docstring."""

    in_channels: int
    num_classes: int
    label_dtype: str
    geometry: PreprocessRecord
    inference: InferenceSpec  # effective: the overlap override and the memory plan's batch size applied
    windows: WindowPlan
    cells: CellGrid  # the stitcher's cell grid of these windows (also used for the skip rule's window maxima)
    skip_rule: SkipRule | None
    use_inverter: bool  # invert_then_argmax with bilinear inversion: probabilities streamed through the inverter
    memory: MemoryPlan | None  # the CPU stitcher's plan; None on the device pipeline
    backend: str
    device: str

    @property
    def n_windows(self) -> int:
        return self.windows.n_windows

    @property
    def accum_dtype(self) -> str | None:
        return None if self.memory is None else self.memory.accum_dtype

    @property
    def stitch_threads(self) -> bool:
        return bool(self.memory is not None and self.memory.threads)

    def predicted_seconds(self, calibration: Calibration | None) -> float | None:
        """Network time for every window (an upper bound: skipped windows are decided from the voxels)."""
        if calibration is None:
            return None
        return self.n_windows * calibration.seconds_per_window

    def to_dict(self, calibration: Calibration | None = None) -> dict:
        g = self.geometry
        d = {
            "input_shape": list(g.input_shape), "oriented_shape": list(g.oriented_shape),
            "preprocessed_shape": list(g.output_shape),
            "resampled": g.spacing is not None and not g.spacing.noop,
            "windows": self.n_windows, "roi_size": list(self.inference.roi_size),
            "overlap": list(self.inference.overlap), "sw_batch_size": self.inference.sw_batch_size,
            "skip_rule": None if self.skip_rule is None else self.skip_rule.to_dict(),
            "finish": "probability inversion (bilinear) then argmax" if self.use_inverter else
            "argmax then nearest label inversion",
            "backend": self.backend, "device": self.device,
            "memory_plan": None if self.memory is None else self.memory.to_dict(),
        }
        if calibration is not None:
            d["calibration"] = {"backend": calibration.backend, "batch": calibration.batch,
                                "seconds_per_call": calibration.seconds_per_call}
            d["predicted_network_seconds"] = self.predicted_seconds(calibration)
        return d

    def describe(self, calibration: Calibration | None = None) -> str:
        """A table for people (``segrt run --plan``)."""
        g = self.geometry
        inf = self.inference
        rows = [
            ("input", f"{'×'.join(map(str, g.input_shape))} voxels, {self.in_channels} channel(s)"),
            ("preprocessed", f"{'×'.join(map(str, g.output_shape))} voxels"
             + ("" if g.spacing is None else f" at {' × '.join(f'{v:g}' for v in g.spacing.out_spacing)} mm")),
            ("windows", f"{self.n_windows} of {'×'.join(map(str, inf.roi_size))} "
                        f"({' × '.join(str(len(s)) for s in self.windows.starts)} per axis), overlap "
                        f"{', '.join(f'{o:g}' for o in inf.overlap)}, {inf.sw_batch_size} per network call"),
            ("skip rule", "none" if self.skip_rule is None else
             f"windows whose input is below {self.skip_rule.threshold:g} everywhere are not run "
             f"(decided from the voxels)"),
            ("finish", "probabilities → bilinear inversion → argmax" if self.use_inverter
             else "argmax → nearest inversion of labels"),
            ("backend", f"{self.backend} on {self.device}"),
        ]
        if self.memory is not None:
            m = self.memory
            rows.append(("memory", f"predicted peak {format_size(m.peak)} ({max(m.phases, key=m.phases.get)} "
                                   f"phase), {m.accum_dtype} accumulator, stitching threads "
                                   f"{'on' if m.threads else 'off'}"
                                   + ("" if m.budget is None else f", budget {format_size(m.budget)}")))
        if calibration is not None:
            t = self.predicted_seconds(calibration)
            rows.append(("time", f"≈ {t:.1f} s of network for all windows (calibrated: "
                                 f"{calibration.seconds_per_call:.3f} s per call of {calibration.batch} on "
                                 f"{calibration.backend}; skipped windows only make it faster)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)



def make_plan(spec: Spec, affine, spatial_shape, channels: int, *, skip_empty: bool = True,
              memory_plan: Callable | None = None, backend: str = "", device: str = "cpu") -> SegmentationPlan:
    """The plan of one input of ``spatial_shape`` with ``affine`` (both pipelines' only planning path).

    ``memory_plan(geometry, cells, use_inverter, skip) -> MemoryPlan | None``: the CPU engine's budget planner
    (:func:`segrt.engine.budget.plan_memory`); its batch size becomes the plan's."""
    if channels != spec.in_channels:
        raise VolumeError(f"the model takes {spec.in_channels} channel(s), the input has {channels}")
    post = spec.postprocessing
    # Invertd(bilinear) on probabilities, argmax afterwards: streamed slab by slab. (Nearest inversion of
    # probabilities followed by argmax picks the same source voxel as argmax followed by nearest inversion of
    # labels, so that case takes the cheaper label path.)
    use_inverter = post.order == "invert_then_argmax" and post.invert_interp == "bilinear"
    rule = spec.inference.skip_rule if skip_empty else None
    geometry = pp.plan_geometry(affine, spatial_shape, spec.preprocessing)
    windows = plan_windows(geometry.output_shape, spec.inference)  # the batch size does not move windows
    cells = CellGrid(windows)
    mplan = None if memory_plan is None else memory_plan(geometry, cells, use_inverter, rule is not None)
    inf = spec.inference if mplan is None else mplan.inference_spec(spec.inference)
    return SegmentationPlan(in_channels=spec.in_channels, num_classes=spec.num_classes, label_dtype=spec.label_dtype,
                            geometry=geometry, inference=inf, windows=windows, cells=cells, skip_rule=rule,
                            use_inverter=use_inverter, memory=mplan, backend=backend, device=device)
