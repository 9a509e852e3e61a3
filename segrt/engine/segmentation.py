"""What one segmentation returns (:class:`Segmentation`: labels on the input grid, timings, metadata, volumes) and the
check every run's label output passes before any work (:func:`check_run_output`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segrt.niftiheader import inspect_nifti
from segrt.safety import check_output_file
from segrt.volume import RawImage, Volume, save_labels

__all__ = ["Segmentation", "check_run_output", "STAGES"]

STAGES = ("load", "preprocess", "infer", "stitch", "invert", "write")


def _source_path(source) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "path", None)


def _source_paths(source) -> list:
    """The files (and folder) a run reads from ``source``: the output may be none of them."""
    if isinstance(source, (list, tuple)):
        return [os.fspath(s) for s in source]
    files = getattr(source, "files", None)  # a DicomImage
    if files:
        return [os.fspath(f) for f in files]
    p = _source_path(source)
    if p is not None and os.path.isdir(p):
        return [p] + [os.path.join(root, n) for root, _, names in os.walk(p) for n in names]
    return [p]


#: what a run's label output may end with (segrt.imageio's output formats)
OUTPUT_EXTS = (".nii.gz", ".nii", ".nrrd", ".dcm")


def source_format(source) -> str | None:
    """``"nifti"``, ``"nrrd"`` or ``"dicom"`` for a path input (:func:`segrt.imageio.input_format`), ``"dicom"`` for
    a :class:`segrt.dicomio.DicomImage`, None for in-memory images."""
    if isinstance(source, (str, os.PathLike, list, tuple)):
        from segrt.imageio import input_format

        return input_format(source)
    if hasattr(source, "datasets") and hasattr(source, "volume"):
        return "dicom"
    return None


def check_run_output(output, source, artifact_dir=None, fmt: str | None = None) -> Path:
    """Check a run's label output before any work (:func:`segrt.safety.check_output_file`): it may be neither the
    input image nor a file of the artifact, and needs a writable directory, a known label format (NIfTI, NRRD,
    DICOM-SEG - the last only for a DICOM input; ``fmt`` overrides the extension) and room for the labels.
    When ``source`` is a path it must exist and have a known format; a NIfTI header is checked too
    (:func:`segrt.niftiheader.inspect_nifti`), so a bad input also fails before the model is loaded."""
    from segrt.errors import OutputError
    from segrt.imageio import output_format

    if output is None or str(output) == "":
        check_output_file(output, what="output")  # the "path is empty" error
    kind = output_format(output, fmt)
    src_fmt = check_run_input(source)
    if kind == "dicom-seg" and src_fmt != "dicom":
        raise OutputError(f"DICOM-SEG output {str(output)!r} references the source DICOM series, and the input is "
                          f"{src_fmt or 'an in-memory image'}: give a DICOM input, or write .nii.gz / .nrrd")
    inputs = _source_paths(source)
    if artifact_dir is not None and os.path.isdir(artifact_dir):
        inputs += [os.path.join(artifact_dir, n) for n in os.listdir(artifact_dir)]
    n_vox = None
    if src_fmt == "nifti" and isinstance(source, (str, os.PathLike, list, tuple)):
        path = source[0] if isinstance(source, (list, tuple)) else source
        info = inspect_nifti(path)
        n_vox = None if info is None else int(np.prod(info.spatial_shape))
    elif hasattr(source, "spatial_shape"):
        n_vox = int(np.prod(source.spatial_shape))
    need = 0
    if n_vox is not None:  # a lower bound of the label file: uint8, and DEFLATE's best ratio for .nii.gz
        need = 352 + (n_vox if not str(output).lower().endswith(".gz") else n_vox // 1032)
    exts = OUTPUT_EXTS if fmt is None else OUTPUT_EXTS + ("",)  # an explicit format: any name (imageio checked it)
    return check_output_file(output, inputs=inputs, exts=exts, what="output", min_free_bytes=need)


def check_run_input(source) -> str | None:
    """The format of a path input (:func:`source_format`), after checking that every path exists."""
    from segrt.errors import VolumeError

    if isinstance(source, (str, os.PathLike, list, tuple)):
        for p in (source if isinstance(source, (list, tuple)) else [source]):
            if not os.path.exists(p):
                raise VolumeError(f"input {os.fspath(p)!r} not found")
    return source_format(source)


@dataclass
class Segmentation:
    """Labels on the input's own grid, with everything needed to write and report them."""

    labels: np.ndarray
    affine: np.ndarray
    class_names: dict[int, str]
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    source: Volume | RawImage | None = None  # the input (its header is copied into the written labels)
    probabilities: np.ndarray | None = None  # only with segment(..., return_probabilities=True)
    dicom: object | None = None  # the source segrt.dicomio.DicomImage (its datasets), for DICOM-SEG output
    reread_source: object | None = None  # reads the input again when the engine released it (Volume.release)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def volumes_ml(self, include_background: bool = False) -> dict[str, float]:
        """Volume of each label present (and each named class), in millilitres."""
        counts = np.bincount(self.labels.ravel(order="K"), minlength=len(self.class_names) or 1)
        vv = self.voxel_volume_ml
        out = {}
        for label, n in enumerate(counts):
            if label == 0 and not include_background:
                continue
            if n == 0 and label not in self.class_names:
                continue
            out[self.class_names.get(label, f"class_{label}")] = float(n) * vv
        return out

    def _image(self) -> np.ndarray | None:
        """The input's first channel on the labels' grid (its stored dtype), or None. An input the engine released
        under a memory budget is read again from its file (once)."""
        if getattr(self.source, "released", False):
            if self.reread_source is None:
                return None
            self.source, self.reread_source = self.reread_source(), None
        arr = getattr(self.source, "array", None)
        if isinstance(arr, np.ndarray) and arr.ndim == 4 and arr.shape[1:] == self.labels.shape:
            return arr[0]
        return None

    def statistics(self, include_background: bool = False) -> list[dict]:
        """Per-structure statistics (:func:`segrt.stats.label_statistics`) with the input's first channel as the
        intensities when the input image is at hand."""
        from segrt.stats import label_statistics

        return label_statistics(self.labels, self.affine, self._image(), self.class_names, include_background)

    def select(self, keep) -> "Segmentation":
        """A new Segmentation with only the classes ``keep`` (names or label numbers,
        :func:`segrt.stats.select_labels`); the other voxels become 0. Probabilities, if any, are kept as they are."""
        import dataclasses

        from segrt.stats import select_labels

        labels, names = select_labels(self.labels, self.class_names, keep)
        return dataclasses.replace(self, labels=labels, class_names=names, timings=dict(self.timings),
                                   metadata=dict(self.metadata))

    def write_statistics(self, path: str | os.PathLike, include_background: bool = False) -> Path:
        """Write :meth:`statistics` as .json or .csv (:func:`segrt.stats.write_statistics`); the path is checked
        first (never the input, a known extension, a writable directory)."""
        from segrt.stats import write_statistics

        check_output_file(path, inputs=[_source_path(self.source)], exts=(".json", ".csv"), what="statistics file")
        return write_statistics(self.statistics(include_background), path)

    def write_preview(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG of three orthogonal slices with the labels over the input (:func:`segrt.preview.write_preview`,
        needs matplotlib)."""
        from segrt.preview import write_preview

        check_output_file(path, inputs=[_source_path(self.source)], exts=(".png",), what="preview")
        return write_preview(self.labels, self.affine, self._image(), path, self.class_names, title=title)

    def save(self, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write the labels on the input grid (atomic: temporary name, then rename) as NIfTI, NRRD or DICOM-SEG, by
        ``fmt`` or the extension (:func:`segrt.imageio.output_format`). DICOM-SEG needs a DICOM input (it references
        the source series). The input image's own file is refused as the output."""
        from segrt.errors import OutputError
        from segrt.imageio import output_format, save_label_image

        t0 = time.perf_counter()
        kind = output_format(path, fmt)
        exts = OUTPUT_EXTS if fmt is None else OUTPUT_EXTS + ("",)
        check_output_file(path, inputs=_source_paths(self.dicom or self.source), exts=exts, what="output")
        if kind == "nifti":
            like = self.source if getattr(self.source, "header", None) is not None else None
            save_labels(self.labels, self.affine, path, like=like, descrip=self.metadata.get("descrip"))
        elif kind == "dicom-seg":
            if self.dicom is None:
                raise OutputError(f"DICOM-SEG output {str(path)!r} references the source DICOM series, and the "
                                  "input was not DICOM: write .nii.gz or .nrrd instead")
            save_label_image(self.labels, self.affine, path, fmt=kind, class_names=self.class_names,
                             source_datasets=self.dicom.datasets)
        else:
            save_label_image(self.labels, self.affine, path, fmt=kind, class_names=self.class_names,
                             descrip=self.metadata.get("descrip"))
        self.timings["write"] = self.timings.get("write", 0.0) + time.perf_counter() - t0
        return Path(path)

    def save_split(self, folder: str | os.PathLike, fmt: str = "nifti") -> list[Path]:
        """One binary mask file (0/1, uint8) per class present (background excepted) in ``folder`` (created if
        missing): ``<classname>.nii.gz`` (``fmt="nrrd"``: ``.nrrd``), names made safe for any file system; each
        written atomically. Returns the files in class order."""
        from segrt.errors import OutputError
        from segrt.imageio import output_format, save_label_image
        from segrt.safety import check_output_dir

        kind = output_format("x.nrrd" if str(fmt).lower() == "nrrd" else "x.nii.gz", None)
        if str(fmt).lower() not in ("nifti", "nrrd"):
            raise OutputError(f"--split writes nifti or nrrd files, not {fmt!r}")
        ext = ".nrrd" if kind == "nrrd" else ".nii.gz"
        out = check_output_dir(folder, sources=_source_paths(self.dicom or self.source), what="split directory")
        out.mkdir(exist_ok=True)
        present = np.flatnonzero(np.bincount(self.labels.ravel(order="K")))
        written, used = [], set()
        for k in (int(v) for v in present if v != 0):
            name = split_file_name(self.class_names.get(k, f"class_{k}"), k)
            while name.lower() in used:
                name = f"{name}_{k}"
            used.add(name.lower())
            mask = (self.labels == k).astype(np.uint8)
            p = out / f"{name}{ext}"
            check_output_file(p, inputs=_source_paths(self.dicom or self.source), exts=(ext,), what="split file")
            if kind == "nifti":
                like = self.source if getattr(self.source, "header", None) is not None else None
                save_labels(mask, self.affine, p, like=like)
            else:
                save_label_image(mask, self.affine, p, fmt="nrrd", class_names={1: self.class_names.get(k, name)})
            written.append(p)
        return written


def split_file_name(name: str, label: int) -> str:
    """``name`` made safe as a file name on any file system (letters, digits, ``-``, ``_``, ``.``; at most 100
    characters; never empty, hidden or a Windows device name)."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")[:100]
    if not safe or safe.upper().split(".")[0] in {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
                                                   *(f"LPT{i}" for i in range(10))}:
        safe = f"class_{int(label)}" if not safe else f"{safe}_{int(label)}"
    return safe
