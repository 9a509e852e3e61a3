"""The runtime: ``Engine.load(artifact) → engine.segment(volume) → Segmentation``.

Data flow (one direction, nothing but the artifact is read)::

    Volume (C,X,Y,Z) float32 + affine
      → preprocess: orientation, resampling, intensity            (segrt.engine.preprocess)
      → windows in MONAI's order, batches of sw_batch_size        (segrt.engine.tiling)
      → backend.infer(batch)                                       (segrt.engine.backends)
      → streaming stitcher: finished slabs along the first axis    (segrt.engine.stitch)
      → per slab: softmax, then either argmax (argmax_then_invert) or the streaming
        probability inverter (invert_then_argmax)                  (segrt.engine.resample)
      → nearest inversion of labels, un-orientation → labels on the input grid

The engine never holds a (classes × volume) array: the stitcher holds (classes × slab) and the probability
inverter a few source rows; the only full-size arrays are the input, the preprocessed image and the labels.

Size: over 400 lines because the Engine class alone: options checked at load, backend choice, one plan per call, the
CPU pipeline's stages in order and the hand-off to the device pipeline; its helpers live in plan.py,
segmentation.py, stitch.py and budget.py.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from segrt.artifact import Artifact
from segrt.engine import orchestrator
from segrt.engine.backends import select_backend
from segrt.engine.budget import measure_workspace, parse_size, plan_memory
from segrt.engine.orchestrator import NumpyOps
from segrt.engine.plan import Calibration, SegmentationPlan, make_plan
from segrt.engine.segmentation import STAGES, Segmentation, check_run_output, source_format
from segrt.errors import UsageError, VolumeError
from segrt.niftiheader import correct_nifti_header, inspect_nifti
from segrt.volume import RawImage, Volume, exact_in_float32, read_nifti

__all__ = ["Engine", "Segmentation", "STAGES", "check_run_output"]

log = logging.getLogger("segrt")

def _fmt_overlap(ov) -> str:
    ov = [float(o) for o in ov]
    return f"{ov[0]:g}" if len(set(ov)) == 1 else ",".join(f"{o:g}" for o in ov)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _check_threads(threads) -> int | None:
    """``threads`` as a positive int not above the usable CPUs (reduced with a warning), or None (the default)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    usable = _usable_cpus()
    if threads > usable:
        log.warning("segrt: warning: %d threads asked for, %d CPUs usable: using %d", threads, usable, usable)
        return usable
    return int(threads)


def host_image(raw: RawImage) -> Volume | RawImage:
    """The CPU engine's input from a NIfTI file's voxels: kept as stored when float32 holds every stored value
    exactly (an int16 CT: half the bytes of MONAI's float32 copy; resampling casts a few rows at a time and
    gives the same values), else :meth:`RawImage.to_volume` (which checks for non-finite values)."""
    return raw if raw.exact_in_float32 else raw.to_volume()


def read_input(source, affine, in_channels: int, on_device: bool = False, series: str | None = None):
    """``(volume, dicom)``: the input as a :class:`Volume` (a NIfTI file's :class:`RawImage` as stored on a device, or
    on the CPU where float32 holds its values exactly: :func:`host_image`), checked to have ``in_channels``
    channels and (on the CPU) finite values, and the :class:`segrt.dicomio.DicomImage` it came from (None unless
    the input is DICOM); it holds nothing of an engine (``Segmentation`` keeps it to read a released input
    again). Paths: NIfTI by the fast readers (:func:`read_nifti`), NRRD and DICOM (a folder, .dcm files) by
    :func:`segrt.imageio.load_image`; ``series`` picks a DICOM series."""
    checked = False  # RawImage.to_volume (load_nifti) has checked for non-finite voxels already
    dicom = None
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    if series is not None and not (isinstance(source, (str, os.PathLike, list, tuple))
                                   and source_format(source) == "dicom"):
        raise UsageError(f"series={series!r} selects a DICOM series, but the input is not DICOM")
    if isinstance(source, Volume):
        vol = source
    elif isinstance(source, RawImage):  # read_nifti's result: uploaded as stored, or MONAI's float32 here
        vol, checked = (source, False) if on_device else (host_image(source), True)
    elif hasattr(source, "datasets") and isinstance(getattr(source, "volume", None), Volume):  # a DicomImage
        vol, dicom = source.volume, source
    elif isinstance(source, (str, os.PathLike, list, tuple)):
        fmt = source_format(source)
        if fmt == "nifti":
            vol, checked = (read_nifti(source), False) if on_device else \
                (host_image(read_nifti(source)), True)
        elif fmt == "dicom":
            from segrt.dicomio import read_dicom_series

            dicom = read_dicom_series(source, series_uid=series)
            vol = dicom.volume
        else:
            from segrt.imageio import load_image

            vol = load_image(source)
    elif isinstance(source, np.ndarray):
        vol = Volume.from_array(source, affine=affine)
    else:
        raise VolumeError(f"segment() expects a file path (NIfTI, NRRD, DICOM), a segrt.Volume, a "
                          f"segrt.RawImage or a NumPy array, got {type(source).__name__}")
    if vol.num_channels != in_channels:
        raise VolumeError(f"the model takes {in_channels} channel(s), the input has "
                          f"{vol.num_channels} (array shape {vol.array.shape})")
    if not on_device and not checked and not np.isfinite(vol.array).all():
        bad = int(np.size(vol.array) - np.count_nonzero(np.isfinite(vol.array)))
        raise VolumeError(f"input holds {bad} NaN/Inf voxel(s); expected finite intensities")
    return vol, dicom


class Engine:
    """A loaded artifact and its backend. Create with :meth:`Engine.load`."""

    def __init__(self, artifact: Artifact, backend, reason: str, accum_dtype: str | None = None):
        self.artifact = artifact
        self.spec = artifact.spec
        self.backend = backend
        self.backend_reason = reason
        self.capabilities = backend.capabilities
        self.device = self.capabilities.device
        self.accum_dtype = accum_dtype
        self._gpu_pipeline = None
        self.load_seconds = 0.0
        self.overlap_overridden = False
        self.skip_empty = True
        self.max_memory: int | None = None
        self.stitch_threads = True

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", variant: str | None = None,
             threads: int | None = None, accum_dtype: str | None = None,
             overlap=None, skip_empty: bool = True, max_memory=None, stitch_threads: bool = True,
             gpu_batch: int | None = None, trust_torch_program: bool = False) -> "Engine":
        """Load an artifact and pick a backend (``device``: auto, cpu, cuda, tensorrt, ort-cuda, torch-cuda).

        ``variant``: None lets the backend choose (fp16 on a GPU when the artifact has it, fp32 on the CPU).
        ``accum_dtype``: stitching accumulator of the GPU pipeline, "float16" (default on CUDA: halves the
        K × roi_x × Y × Z ring, as MONAI's AMP weights fp16 outputs in fp16) or "float32".
        ``overlap``: replaces the artifact's sliding-window overlap (a number in [0, 1), or one per axis) —
        fewer windows, different numbers; never silent: logged as a warning and recorded in every
        segmentation's metadata (``overlap``, ``overlap_overridden``, ``artifact_overlap``) and in the
        written NIfTI header's ``descrip``.

        CPU path: ``accum_dtype`` None/"float32" is exact (bit-identical stitching), "float16" halves the
        stitcher's cells (reduced precision). ``skip_empty``: windows that the artifact's ``skip_rule`` declares
        empty (CT: all air) are not run (``segrt run --no-skip`` turns it off); the fraction skipped is in
        ``metadata["skipped_fraction"]``. ``max_memory`` (bytes or "1.5G"): plan batch size, threads and the
        accumulator for that RAM budget (``segrt.engine.budget``), raising ``BudgetError`` before anything runs
        when it cannot be met. ``stitch_threads``: gather and infer in background threads, overlapped with
        stitching (bit-identical results). ``gpu_batch``: windows per network call on a GPU backend (default:
        torch-CUDA max(sw_batch_size, 4) - one window per call leaves a large GPU latency-bound; the stitched
        result does not depend on it). ``threads``: a positive integer; more than the CPUs this process may use is
        reduced to that number, with a warning (oversubscription only slows inference down, and thousands of
        threads exhaust the process). ``trust_torch_program``: let the torch-CUDA backend load the artifact's
        torch program, which unpickles (see :func:`segrt.engine.backends.select_backend`).
        """
        t0 = time.perf_counter()
        threads = _check_threads(threads)
        if accum_dtype is not None and accum_dtype not in ("float32", "float16"):
            raise UsageError(f"accum_dtype must be 'float32' or 'float16', got {accum_dtype!r}")
        artifact = Artifact.load(path)
        if artifact.random_weights:
            log.warning("segrt: warning: artifact %s holds RANDOM weights (exported with --random-init): "
                        "its labels are meaningless", path)
        backend, reason = select_backend(artifact, device=device, variant=variant, threads=threads,
                                         gpu_batch=gpu_batch, trust_torch_program=trust_torch_program)
        eng = cls(artifact, backend, reason, accum_dtype=accum_dtype)
        eng.skip_empty = bool(skip_empty)
        eng.max_memory = None if max_memory is None else parse_size(max_memory)
        if eng.max_memory is not None and eng._on_device():
            log.warning("segrt: warning: --max-memory plans the CPU engine's RAM; the device pipeline on %s does not "
                        "plan its memory yet, so the budget is not applied", backend.name)
        eng.stitch_threads = bool(stitch_threads)
        if overlap is not None:
            eng._override_overlap(overlap)
        eng.load_seconds = time.perf_counter() - t0
        return eng

    def _override_overlap(self, overlap) -> None:
        import dataclasses

        from segrt.errors import SpecError
        from segrt.spec import _triple

        if isinstance(overlap, bool):
            raise SpecError(f"overlap must be a number in [0, 1) or three of them, got {overlap!r}")
        new = _triple(overlap, "overlap")
        inf = self.spec.inference
        self.spec = dataclasses.replace(self.spec, inference=dataclasses.replace(inf, overlap=new))
        self.overlap_overridden = new != tuple(inf.overlap)
        if self.overlap_overridden:
            log.warning("segrt: warning: sliding-window overlap %s replaces the artifact's %s: other windows "
                        "than the exported (MONAI) pipeline, so results differ from it", _fmt_overlap(new),
                        _fmt_overlap(inf.overlap))

    def _overlap_metadata(self) -> dict:
        cur = tuple(self.spec.inference.overlap)
        art = tuple(self.artifact.spec.inference.overlap)
        meta = {"overlap": list(cur), "overlap_overridden": bool(self.overlap_overridden),
                "artifact_overlap": list(art)}
        if meta["overlap_overridden"]:
            meta["descrip"] = f"segrt overlap={_fmt_overlap(cur)} (artifact {_fmt_overlap(art)})"
        return meta

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------------------------------
    def _as_volume(self, source, affine, on_device: bool = False, series: str | None = None) -> Volume | RawImage:
        """The input as a :class:`Volume`; ``on_device``: a NIfTI file stays a :class:`RawImage` (stored dtype and
        order, uploaded as it is) and non-finite values are left to the device pipeline's own check."""
        return self._read_source(source, affine, on_device, series)[0]

    def _read_source(self, source, affine, on_device: bool = False, series: str | None = None):
        """:func:`read_input` with this engine's channel count."""
        return read_input(source, affine, self.spec.in_channels, on_device, series)

    def _releases_input(self, source, keep_input: bool | None) -> bool:
        """Whether ``segment`` drops its own copy of the input once resampled (see its ``keep_input``)."""
        if keep_input is None:
            keep_input = self.max_memory is None
        return (not keep_input and not self._on_device()
                and isinstance(source, (str, os.PathLike, list, tuple)))

    def segment(self, source, affine=None, *, output: str | os.PathLike | None = None,
                progress: bool | None = None, return_probabilities: bool = False, series: str | None = None,
                fmt: str | None = None, keep_input: bool | None = None) -> Segmentation:
        """Segment an image file (NIfTI, NRRD), DICOM (a folder, a .dcm file, a list of a series' files, or a
        :class:`segrt.dicomio.DicomImage`), a :class:`Volume`, a :class:`RawImage` (:func:`segrt.read_nifti`) or an
        array (with ``affine``). ``series``: the SeriesInstanceUID to read from a DICOM folder holding several.
        ``output``: also write the labels there (NIfTI, NRRD, or DICOM-SEG for a DICOM input; ``fmt`` overrides the
        extension, see :meth:`Segmentation.save`).

        ``return_probabilities`` additionally keeps the stitched softmax probabilities on the preprocessed
        grid (C × volume: for tests and debugging only — it defeats the streaming memory bound).

        ``keep_input``: whether the input image read from a file stays in memory for the whole run. None (default):
        kept, except under a memory budget (``max_memory``), where the CPU engine drops its copy once resampled
        (the stitcher's phase, the largest, then runs without it; ``segrt run --stats/--preview`` read it again).
        :meth:`Segmentation.statistics` and :meth:`Segmentation.write_preview` read a dropped input again from its
        file. Arrays, Volumes and RawImages passed in are never dropped (the caller holds them).
        """
        spec = self.spec
        if output is not None:  # before any work: never the input, never after minutes of inference
            check_run_output(output, source, self.artifact.root, fmt=fmt)
        timings = {k: 0.0 for k in STAGES}
        on_device = self._on_device()
        t0 = time.perf_counter()
        vol, dicom = self._read_source(source, affine, on_device=on_device, series=series)
        timings["load"] = time.perf_counter() - t0
        src_meta = {"source_format": "dicom" if dicom is not None else (
            source_format(source) if isinstance(source, (str, os.PathLike, list, tuple)) else None)}
        if dicom is not None:
            src_meta["series_uid"] = dicom.series_uid

        release = self._releases_input(source, keep_input)
        channels = self.spec.in_channels
        plan = self._plan_for(vol, release)  # the one plan of this call: nothing below plans again
        if on_device:
            seg = self._segment_on_device(vol, plan, timings, None, return_probabilities)
            seg.dicom = dicom
            seg.metadata.update(src_meta)
            if output is not None:
                seg.save(output, fmt)
            return seg

        bar = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=plan.n_windows, unit="win", desc="segrt", file=sys.stderr, delay=2.0, leave=False)
        ops = NumpyOps(spec, inplace_weighting=self.capabilities.fresh_outputs)
        try:
            res = orchestrator.run(plan, vol, ops, self.backend.infer, softmax=spec.postprocessing.softmax,
                                   progress=bar.update if bar else None,
                                   return_probabilities=return_probabilities, release_input=release)
        finally:
            if bar is not None:
                bar.close()
        t = res.timings
        timings.update(preprocess=t["upload"] + t["preprocess"], infer=t["infer"], stitch=t["stitch"],
                       invert=t["invert"] + t["download"])
        mplan, rule, n_skip = plan.memory, plan.skip_rule, res.n_skipped
        seg = Segmentation(
            labels=res.labels, affine=vol.affine.copy(), class_names=dict(spec.class_names), timings=timings,
            source=vol, probabilities=res.probabilities,
            metadata={"backend": self.backend.name, "backend_reason": self.backend_reason, "device": self.device,
                      "windows": plan.n_windows, "preprocessed_shape": list(plan.geometry.output_shape),
                      "windows_run": plan.n_windows - n_skip, "windows_skipped": n_skip,
                      "skipped_fraction": n_skip / plan.n_windows,
                      "skip_rule": None if rule is None else rule.to_dict(),
                      "accum_dtype": mplan.accum_dtype, "sw_batch_size": plan.inference.sw_batch_size,
                      "stitch_threads": mplan.threads, "memory_plan": mplan.to_dict(),
                      "random_weights": self.artifact.random_weights, **self._overlap_metadata(), **src_meta},
            dicom=dicom, reread_source=(lambda: read_input(source, affine, channels, series=series)[0])
            if release else None,
        )
        if output is not None:
            seg.save(output, fmt)
        return seg

    def plan(self, source, affine=None, series: str | None = None) -> SegmentationPlan:
        """The :class:`~segrt.engine.plan.SegmentationPlan` of ``source`` (a NIfTI path — only its header is read —,
        an NRRD file or DICOM input — read whole —, a :class:`Volume`, a :class:`RawImage` or an array with
        ``affine``), without running anything."""
        if isinstance(source, (list, tuple)) and len(source) == 1:
            source = source[0]
        if isinstance(source, (str, os.PathLike)) and series is None and source_format(source) == "nifti":
            import nibabel as nib

            inspect_nifti(source)  # the header's own checks first
            try:
                img = nib.load(os.fspath(source))
                correct_nifti_header(img)
            except Exception as exc:  # noqa: BLE001 - the boundary: nibabel's errors on a bad header
                raise VolumeError(f"cannot read the header of {os.fspath(source)!r}: {exc}") from exc
            shape = tuple(int(v) for v in img.shape)
            channels = 1 if len(shape) == 3 else int(shape[3])
            n_vox = int(np.prod(shape[:3]))
            proxy, stored = img.dataobj, np.dtype(img.get_data_dtype())
            raw = getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0
            itemsize = stored.itemsize if raw and exact_in_float32(stored) else 4  # as host_image keeps it
            return self._make_plan(np.asarray(img.affine, np.float64), shape[:3], channels,
                                   itemsize * channels * n_vox, self._releases_input(source, None))
        vol = self._as_volume(source, affine, on_device=False, series=series)
        return self._plan_for(vol, self._releases_input(source, None))

    def _plan_for(self, vol, release_input: bool = False) -> SegmentationPlan:
        return self._make_plan(vol.affine, vol.spatial_shape, vol.num_channels, int(vol.array.nbytes), release_input)

    def _make_plan(self, affine, spatial_shape, channels: int, input_bytes: int,
                   release_input: bool = False) -> SegmentationPlan:
        """Geometry, windows, skip rule and the memory plan (``segrt.engine.budget``) for one input; BudgetError if
        the declared budget cannot be met — raised before anything runs."""
        spec = self.spec

        def memory_plan(geometry, cells, use_inverter: bool, skip: bool):
            if self._on_device():
                return None  # the device pipeline's buffers are not planned by the CPU budget
            acc = self.accum_dtype
            base = None
            if self.max_memory is None:
                workspace = 0
                acc = acc or "float32"
            else:
                from segrt.engine.budget import rss_bytes

                now = rss_bytes()  # the process as it is (interpreter, libraries, backend session, the input)
                base = max(now - int(input_bytes), 0) if now else None

                def workspace(b):
                    return measure_workspace(self.backend, b)
            return plan_memory(spec.inference, spec.num_classes, spec.in_channels, tuple(spatial_shape),
                               geometry.output_shape, self.max_memory, input_bytes=int(input_bytes),
                               label_bytes=np.dtype(spec.label_dtype).itemsize, workspace=workspace, skip=skip,
                               slabs=use_inverter, inplace_weighting=self.capabilities.fresh_outputs,
                               threads=self.stitch_threads, accum_dtype=acc, grid=cells,
                               release_input=release_input, **({} if base is None else {"base": base}))

        return make_plan(spec, affine, spatial_shape, channels, skip_empty=self.skip_empty,
                         memory_plan=memory_plan, backend=self.backend.name, device=self.device)

    def _on_device(self) -> bool:
        return self.device == "cuda" and self.capabilities.device_arrays

    def calibrate(self, batch: int | None = None) -> Calibration:
        """Time one network call of ``batch`` windows of zeros (default: the spec's sw_batch_size) on the backend:
        the second of two calls (the first pays one-time set-up)."""
        b = int(batch or self.spec.inference.sw_batch_size)
        x = np.zeros((b, self.spec.in_channels, *self.spec.inference.roi_size), np.float32)
        self.backend.infer(x)
        t0 = time.perf_counter()
        self.backend.infer(x)
        return Calibration(self.backend.name, b, time.perf_counter() - t0)

    def _segment_on_device(self, vol: Volume | RawImage, plan: SegmentationPlan, timings: dict, output,
                           return_probabilities: bool) -> Segmentation:
        """The whole pipeline on the GPU (segrt.engine.gpu.TorchPipeline); only labels come back to the host."""
        import torch

        from segrt.engine.gpu import TorchPipeline

        if self._gpu_pipeline is None:
            accum = getattr(torch, self.accum_dtype or "float16")
            where = self.capabilities.torch_device or "cuda"
            self._gpu_pipeline = TorchPipeline(self.spec, self.backend.infer_torch, where, accum_dtype=accum,
                                               batch_size=self.backend.max_batch, skip_empty=self.skip_empty)
        res = self._gpu_pipeline.segment(vol, plan=plan, return_probabilities=return_probabilities)
        t = res.timings
        timings["preprocess"] = t.get("upload", 0.0) + t.get("preprocess", 0.0)
        timings["infer"] = t.get("infer", 0.0)
        timings["stitch"] = t.get("stitch", 0.0)
        timings["invert"] = t.get("invert", 0.0) + t.get("download", 0.0)
        meta = {k: v for k, v in res.metadata.items() if k != "probabilities"}
        meta.update({"backend": self.backend.name, "backend_reason": self.backend_reason, "device": self.device,
                     "random_weights": self.artifact.random_weights, **self._overlap_metadata()})
        seg = Segmentation(labels=res.labels, affine=vol.affine.copy(), class_names=dict(self.spec.class_names),
                           timings=timings, source=vol, metadata=meta,
                           probabilities=res.metadata.get("probabilities"))
        if output is not None:
            seg.save(output)
        return seg
