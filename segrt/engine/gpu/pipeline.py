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

    def _preprocess(self, raw: torch.Tensor, plan: SegmentationPlan):
        """Device preprocessing on the plan's geometry: ``(image (C, X', Y', Z') float32 device tensor, skip)`` with
        ``skip`` the per-window flags of the plan's skip rule (decided before the intensity ops), or None."""
        pre = self.spec.preprocessing
        geo = plan.geometry
        img = gpp.oriented(raw, geo.ornt)
        sp = geo.spacing
        if sp is not None and not sp.noop:
            if pre.spacing.mode == "bilinear":
                x = gpp.resample_linear(img, sp.M, sp.out_shape, dtype=self.resample_dtype)
            elif pre.spacing.mode == "nearest":
                x = gpp.resample_nearest(img, sp.M, sp.out_shape).to(torch.float32)
            else:
                raise SpecError(f"spacing mode must be 'bilinear' or 'nearest', received {pre.spacing.mode!r}")
        else:
            x = img.materialize(copy=True)
        skip = None
        if plan.skip_rule is not None:  # on the resampled input, before the intensity transforms (as the CPU)
            skip = window_maxima(x, plan.windows) < plan.skip_rule.threshold
        x = gpp.apply_intensity(x, pre.intensity).contiguous()
        return x, skip

    def segment(self, volume: Volume | RawImage, return_probabilities: bool = False,
                plan: SegmentationPlan | None = None) -> PipelineResult:
        """Segment ``volume`` (a :class:`Volume`, or a :class:`RawImage` as stored in its file: uploaded in its own
        dtype and memory order); labels on its own grid, Fortran-ordered. ``return_probabilities`` also returns the stitched (softmax)
        probabilities on the preprocessed grid in ``metadata["probabilities"]`` (K × volume: tests only)."""
        vol = self._check(volume)
        spec, dev = self.spec, self.device
        if plan is None:  # standalone use: the same planning path as the engine's (segrt.engine.plan)
            plan = make_plan(spec, vol.affine, vol.spatial_shape, vol.num_channels,
                             skip_empty=self.skip_rule is not None, device=str(dev))
        rule = plan.skip_rule
        record = plan.geometry
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base_mem = torch.cuda.memory_allocated(dev)
        timer = StageTimer(dev)
        total = timer.start("total")
        with torch.inference_mode():
            with timer("upload"):
                raw = self.uploader.upload(vol.array)
            with timer("preprocess"):
                if vol.array.dtype.kind == "f" and not bool(torch.isfinite(raw).all()):
                    raise VolumeError("input holds NaN/Inf voxel(s); expected finite intensities")
                image, skip = self._preprocess(raw, plan)
            del raw  # the upload is not needed any more
            res_shape = record.output_shape
            K = spec.num_classes
            post = spec.postprocessing
            tok = timer.start("stitch")
            n_skip = 0 if skip is None else int(skip.sum())
            stitcher = TorchStitcher(image, plan.inference, self.infer_torch, K, self.accum_dtype,
                                     batch_size=self.batch_size, skip=skip, windows=plan.windows,
                                     **({} if rule is None else {"background_class": rule.background_class,
                                                                 "skip_margin": rule.margin}))
            infer_tok = [None]

            def on_infer(begin: bool):  # split the loop's time into network calls and the rest
                if begin:
                    timer.stop(tok_ref[0])
                    infer_tok[0] = timer.start("infer")
                else:
                    timer.stop(infer_tok[0])
                    tok_ref[0] = timer.start("stitch")

            tok_ref = [tok]
            stitcher.on_infer = on_infer
            probs_full = (torch.empty((K, *res_shape), dtype=torch.float32, device=dev)
                          if return_probabilities else None)
            inverter = labels_res = None
            if plan.use_inverter:
                sp = record.spacing
                M = np.eye(4) if sp is None or sp.inverse_noop else sp.M_inv
                inverter = TorchProbabilityInverter(M, res_shape, record.oriented_shape, K,
                                                    self._dev_label_dtype, dev, use_triton=self.use_triton)
            else:
                labels_res = torch.empty(res_shape, dtype=self._dev_label_dtype, device=dev)
            for x0, chunk in stitcher:
                rows = chunk.shape[1]
                probs = torch.softmax(chunk, dim=0) if post.softmax else chunk
                if probs_full is not None:
                    probs_full[:, x0:x0 + rows] = probs
                if inverter is not None:
                    timer.stop(tok_ref[0])
                    with timer("invert"):
                        inverter.push(x0, probs)
                    tok_ref[0] = timer.start("stitch")
                else:
                    labels_res[x0:x0 + rows] = torch.argmax(probs, dim=0).to(self._dev_label_dtype)
                del probs
            timer.stop(tok_ref[0])
            buffers = stitcher.buffer_bytes
            del stitcher, image
            with timer("invert"):
                if inverter is not None:
                    labels_dev = unorient(inverter.finish(), record.ornt, record.input_shape)
                else:
                    labels_dev = invert_labels(labels_res, record)
                    del labels_res
            with timer("download"):
                # Fortran order, the order NIfTI stores: writing the file is then a plain copy of the bytes
                # (a C-ordered label map costs the writer a full transposition on the host)
                labels = np.empty(record.input_shape[::-1], dtype=self.label_dtype).T
                host = torch.from_numpy(labels.T.view(np.int16) if self.label_dtype == np.uint16 else labels.T)
                host.copy_(labels_dev.permute(2, 1, 0).contiguous())
            timer.stop(total)
        timings = timer.results(STAGES + ("total",))
        n_win = plan.n_windows
        meta = {
            "device": str(dev),
            "windows": n_win,
            "windows_run": n_win - n_skip, "windows_skipped": n_skip, "skipped_fraction": n_skip / n_win,
            "skip_rule": None if rule is None else rule.to_dict(),
            "preprocessed_shape": list(res_shape),
            "accum_dtype": str(self.accum_dtype).replace("torch.", ""),
            "resample_dtype": str(self.resample_dtype).replace("torch.", ""),
            "stitch_buffer_bytes": buffers,
            "postprocessing": post.order,
            "triton_invert": bool(inverter is not None and inverter.uses_triton),
        }
        if inverter is not None:
            meta["inverter_peak_buffer_bytes"] = int(inverter.peak_buffer_bytes)
        if cuda:
            meta["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
            meta["gpu_memory_before_bytes"] = int(base_mem)
            meta["gpu_name"] = torch.cuda.get_device_name(dev)
        if probs_full is not None:
            meta["probabilities"] = probs_full.cpu().numpy()
        return PipelineResult(labels, timings, meta)
