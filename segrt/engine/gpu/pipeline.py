"""``TorchPipeline``: volume in memory → labels in memory, every step on one torch device.

Stages (names of the ``timings`` keys)::

    upload      host float32 array → device, once, through pinned staging buffers
    preprocess  orientation (a view; flips folded into the resampling gathers), Spacingd trilinear resampling,
                intensity ops — same results as segrt.engine.preprocess (resampling bit-identical in float64)
    infer       the network calls (``infer_torch``), bracketed by CUDA events
    stitch      window gathering, weighting, ring accumulation, count division, softmax, argmax (or feeding the
                probability inverter) — everything in the sliding-window loop that is not the network
    invert      Invertd: nearest label gather + un-orientation in one gather, or the streaming fused
                trilinear-resample + argmax (Triton on CUDA) for ``invert_then_argmax`` with bilinear inversion
    download    labels (uint8 / uint16) → host; the only device → host copy of volume data

On CUDA every interval is timed with CUDA events and the device is synchronised once at the end; on other
devices with ``time.perf_counter``. The only full-size device tensors are the input, the resampled image and the
label maps; the stitcher holds ``K × roi_x`` rows (see :class:`segrt.engine.gpu.stitch.TorchStitcher`).

The pipeline is device-generic: on ``torch.device("cpu")`` it runs the same code, which is how the tests check it
against the NumPy engine.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

import segrt.engine.gpu.preprocess as gpp
from segrt.engine.gpu.invert import TorchProbabilityInverter, invert_labels, unorient
from segrt.engine.gpu.stitch import TorchStitcher
from segrt.engine.gpu.timing import StageTimer
from segrt.engine import orchestrator
from segrt.engine.plan import SegmentationPlan, make_plan
from segrt.errors import SpecError, VolumeError
from segrt.spec import Spec
from segrt.volume import RawImage, Volume

__all__ = ["TorchPipeline", "PipelineResult", "STAGES"]

STAGES = ("upload", "preprocess", "infer", "stitch", "invert", "download")


def window_maxima(image: torch.Tensor, plan) -> np.ndarray:
    """Per-window maximum of ``image (C, X, Y, Z)`` over channels and the window's unpadded voxels (float64 on the
    host; :func:`segrt.engine.cells.window_maxima`'s result). One small reduction per window, one transfer."""
    lows = [lo for lo, _ in plan.pads]
    shape = plan.spatial_shape
    rois = plan.roi_size
    vals = []
    for start in plan.windows:
        sl = tuple(slice(max(s - lo, 0), min(s - lo + r, n)) for s, lo, r, n in zip(start, lows, rois, shape))
        vals.append(image[(slice(None), *sl)].amax())
    return torch.stack(vals).to(torch.float64).cpu().numpy()


class PipelineResult(NamedTuple):
    labels: np.ndarray  # on the input grid, uint8 (≤ 256 classes) or uint16
    timings: dict  # seconds per stage (STAGES) and "total"
    metadata: dict  # shapes, windows, peak memory, buffer sizes, (probabilities when asked)


class TorchPipeline:
    """Run ``spec``'s whole inference on ``device`` with the network callable ``infer_torch``.

    ``infer_torch(batch)``: float32 ``(B, C, *roi)`` device tensor (a reused buffer) → ``(B, K, *roi)`` float32 or
    float16 tensor on the same device. ``accum_dtype``: the stitching ring's dtype (float32 reproduces the NumPy
    engine bit for bit given identical network outputs; float16 halves the ring). ``resample_dtype``: compute type
    of the trilinear resampling (float64 = bit-identical to the NumPy reference). ``use_triton``: the fused
    resample+argmax kernel for probability-space inversion (default: on CUDA when Triton imports).
    ``batch_size``: windows per network call (default: the spec's sw_batch_size; the result does not depend on
    it). ``skip_empty``: apply the spec's skip rule (windows whose resampled input is all below its threshold are
    not run; see :class:`segrt.spec.SkipRule`), as the NumPy engine does by default.
    """

    def __init__(self, spec: Spec, infer_torch: Callable[[torch.Tensor], torch.Tensor], device,
                 accum_dtype: torch.dtype = torch.float32, resample_dtype: torch.dtype = torch.float64,
                 use_triton: bool | None = None, upload_chunk_bytes: int = 64 << 20,
                 batch_size: int | None = None, skip_empty: bool = False):
        if not isinstance(spec, Spec):
            raise SpecError(f"expected a segrt.spec.Spec, received {type(spec).__name__}")
        if not callable(infer_torch):
            raise SpecError(f"infer_torch must be callable, received {type(infer_torch).__name__}")
        if resample_dtype not in (torch.float32, torch.float64):
            raise SpecError(f"resample_dtype must be torch.float32 or torch.float64, got {resample_dtype}")
        self.spec = spec
        self.infer_torch = infer_torch
        self.device = torch.device(device)
        self.accum_dtype = accum_dtype
        self.resample_dtype = resample_dtype
        self.use_triton = use_triton
        self.batch_size = batch_size  # windows per network call (default: the spec's sw_batch_size)
        # the artifact's skip rule (CT: all-air windows are not run), as the NumPy engine applies it
        self.skip_rule = spec.inference.skip_rule if skip_empty else None
        self.uploader = gpp.Uploader(self.device, upload_chunk_bytes)
        self.label_dtype = np.dtype(spec.label_dtype)
        # int16 on the device for > 256 classes (torch's uint16 lacks kernels); read back as uint16
        self._dev_label_dtype = torch.uint8 if self.label_dtype == np.uint8 else torch.int16

    # ------------------------------------------------------------------------------------------
    def _check(self, volume) -> Volume | RawImage:
        if not isinstance(volume, (Volume, RawImage)):
            raise VolumeError(f"segment() expects a segrt.Volume or segrt.volume.RawImage, got "
                              f"{type(volume).__name__}")
        if volume.num_channels != self.spec.in_channels:
            raise VolumeError(f"the model takes {self.spec.in_channels} channel(s), the input has "
                              f"{volume.num_channels} (array shape {volume.array.shape})")
        return volume

    def segment(self, volume: Volume | RawImage, return_probabilities: bool = False,
                plan: SegmentationPlan | None = None) -> PipelineResult:
        """Segment ``volume`` (a :class:`Volume`, or a :class:`RawImage` as stored in its file: uploaded in its own
        dtype and memory order); labels on its own grid, Fortran-ordered. ``return_probabilities`` also returns the
        stitched (softmax) probabilities on the preprocessed grid in ``metadata["probabilities"]`` (K × volume:
        tests only). The stages are :func:`segrt.engine.orchestrator.run`'s, over :class:`TorchOps`."""
        vol = self._check(volume)
        spec, dev = self.spec, self.device
        if plan is None:  # standalone use: the same planning path as the engine's (segrt.engine.plan)
            plan = make_plan(spec, vol.affine, vol.spatial_shape, vol.num_channels,
                             skip_empty=self.skip_rule is not None, device=str(dev))
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base_mem = torch.cuda.memory_allocated(dev)
        ops = TorchOps(self, plan)
        with torch.inference_mode():
            res = orchestrator.run(plan, vol, ops, self.infer_torch, softmax=spec.postprocessing.softmax,
                                   return_probabilities=return_probabilities)
        rule = plan.skip_rule
        n_win, n_skip = plan.n_windows, res.n_skipped
        meta = {
            "device": str(dev),
            "windows": n_win,
            "windows_run": n_win - n_skip, "windows_skipped": n_skip, "skipped_fraction": n_skip / n_win,
            "skip_rule": None if rule is None else rule.to_dict(),
            "preprocessed_shape": list(plan.geometry.output_shape),
            "accum_dtype": str(self.accum_dtype).replace("torch.", ""),
            "resample_dtype": str(self.resample_dtype).replace("torch.", ""),
            "stitch_buffer_bytes": ops.buffer_bytes,
            "postprocessing": spec.postprocessing.order,
            "triton_invert": bool(ops.inverter_used is not None and ops.inverter_used.uses_triton),
        }
        if ops.inverter_used is not None:
            meta["inverter_peak_buffer_bytes"] = int(ops.inverter_used.peak_buffer_bytes)
        if cuda:
            meta["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
            meta["gpu_memory_before_bytes"] = int(base_mem)
            meta["gpu_name"] = torch.cuda.get_device_name(dev)
        if res.probabilities is not None:
            meta["probabilities"] = res.probabilities.cpu().numpy()
        return PipelineResult(res.labels, res.timings, meta)


class TorchOps:
    """The device pipeline's array operations for :func:`segrt.engine.orchestrator.run`: torch tensors on the
    pipeline's device, :class:`TorchStitcher` (a ring of ``roi_x`` rows, yielding whole-row chunks in row order),
    :class:`TorchProbabilityInverter`, CUDA-event timing on CUDA."""

    def __init__(self, pipe: "TorchPipeline", plan: SegmentationPlan):
        self.pipe = pipe
        self.spec = pipe.spec
        self.device = pipe.device
        self.buffer_bytes: dict = {}
        self.inverter_used = None

    def timer(self) -> StageTimer:
        return StageTimer(self.device)

    def upload(self, volume) -> torch.Tensor:
        raw = self.pipe.uploader.upload(volume.array)
        if volume.array.dtype.kind == "f" and not bool(torch.isfinite(raw).all()):
            raise VolumeError("input holds NaN/Inf voxel(s); expected finite intensities")
        return raw

    def resample(self, raw: torch.Tensor, plan: SegmentationPlan) -> torch.Tensor:
        pre = self.spec.preprocessing
        geo = plan.geometry
        img = gpp.oriented(raw, geo.ornt)
        sp = geo.spacing
        if sp is not None and not sp.noop:
            if pre.spacing.mode == "bilinear":
                return gpp.resample_linear(img, sp.M, sp.out_shape, dtype=self.pipe.resample_dtype)
            if pre.spacing.mode == "nearest":
                return gpp.resample_nearest(img, sp.M, sp.out_shape).to(torch.float32)
            raise SpecError(f"spacing mode must be 'bilinear' or 'nearest', received {pre.spacing.mode!r}")
        return img.materialize(copy=True)

    def window_maxima(self, x: torch.Tensor, plan: SegmentationPlan) -> np.ndarray:
        return window_maxima(x, plan.windows)

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        return gpp.apply_intensity(x, self.spec.preprocessing.intensity).contiguous()

    def empty(self, shape, dtype) -> torch.Tensor:
        if np.dtype(dtype) == np.float32:
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        return torch.empty(shape, dtype=self.pipe._dev_label_dtype, device=self.device)

    def stitch(self, image, plan: SegmentationPlan, predict, skip, rows: bool, progress=None):
        rule = plan.skip_rule
        stitcher = TorchStitcher(image, plan.inference, predict, plan.num_classes, self.pipe.accum_dtype,
                                 batch_size=self.pipe.batch_size, skip=skip, windows=plan.windows,
                                 **({} if rule is None else {"background_class": rule.background_class,
                                                             "skip_margin": rule.margin}))
        for x0, chunk in stitcher:  # whole rows, in row order: also what the inverter needs
            yield (x0, 0, 0), chunk
        self.buffer_bytes = stitcher.buffer_bytes

    def softmax(self, block: torch.Tensor) -> torch.Tensor:
        return torch.softmax(block, dim=0)

    def consume(self, block, box, softmax: bool, labels, probs) -> None:
        p = torch.softmax(block, dim=0) if softmax else block
        if probs is not None:
            probs[(slice(None), *box)] = p
        labels[box] = torch.argmax(p, dim=0).to(self.pipe._dev_label_dtype)

    def inverter(self, plan: SegmentationPlan):
        sp = plan.geometry.spacing
        M = np.eye(4) if sp is None or sp.inverse_noop else sp.M_inv
        self.inverter_used = TorchProbabilityInverter(M, plan.geometry.output_shape, plan.geometry.oriented_shape,
                                                      plan.num_classes, self.pipe._dev_label_dtype, self.device,
                                                      use_triton=self.pipe.use_triton)
        return self.inverter_used

    def invert_labels(self, labels, geometry):
        return invert_labels(labels, geometry)

    def unorient(self, labels, geometry):
        return unorient(labels, geometry.ornt, geometry.input_shape)

    def download(self, labels_dev: torch.Tensor) -> np.ndarray:
        # Fortran order, the order NIfTI stores: writing the file is then a plain copy of the bytes (a C-ordered
        # label map costs the writer a full transposition on the host)
        dt = self.pipe.label_dtype
        labels = np.empty(tuple(labels_dev.shape)[::-1], dtype=dt).T
        host = torch.from_numpy(labels.T.view(np.int16) if dt == np.uint16 else labels.T)
        host.copy_(labels_dev.permute(2, 1, 0).contiguous())
        return labels
