"""Which reader or writer an image path needs, and the dispatch to it.

Inputs (:func:`input_format`, :func:`load_image`), case-insensitive:

* ``"nifti"``: a ``.nii`` or ``.nii.gz`` file, read by :func:`segrt.volume.load_nifti` (MONAI's loading);
* ``"nrrd"``: a ``.nrrd`` file or a detached ``.nhdr`` header, read by :func:`segrt.nrrdio.read_nrrd`;
* ``"dicom"``: a directory, a ``.dcm``/``.dicom`` file, any file with the ``DICM`` magic at byte 128, or a
  list/tuple of paths (the files of one series), read by ``segrt.dicomio.read_dicom_series`` (imported only
  then). ``series`` picks one series (its SeriesInstanceUID) where the input holds several.

A list/tuple of one NIfTI or NRRD path is that file; a list holding several non-DICOM images is refused (one image
per run). Anything else is a :class:`VolumeError` naming the accepted forms. The extension decides before the
content: a ``.nii.gz`` that is not NIfTI fails in the NIfTI reader with its own message.

Outputs (:func:`output_format`, :func:`save_label_image`): ``"nifti"`` (``.nii``/``.nii.gz``, written by
:func:`segrt.volume.save_labels`), ``"nrrd"`` (``.nrrd``, also ``.seg.nrrd``, written by
:func:`segrt.nrrdio.save_nrrd_labels` with the class names as 3D Slicer segment fields) and ``"dicom-seg"``
(``.dcm``, written by :func:`segrt.dicomseg.write_dicom_seg`; needs the source series' datasets). An explicit ``fmt`` wins over the extension but may not
contradict a known one; unknown formats and extensions are an :class:`OutputError` listing the accepted ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from segrt.errors import OutputError, UsageError, VolumeError

__all__ = ["input_format", "load_image", "output_format", "save_label_image", "INPUT_FORMATS", "OUTPUT_FORMATS"]

INPUT_FORMATS = ("nifti", "nrrd", "dicom")
OUTPUT_FORMATS = ("nifti", "nrrd", "dicom-seg")

_INPUT_EXTS = ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".nhdr", "nrrd"),
               (".dcm", "dicom"), (".dicom", "dicom"))
_OUTPUT_EXTS = ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".dcm", "dicom-seg"))
_FMT_ALIASES = {"nifti": "nifti", "nii": "nifti", "nii.gz": "nifti", "nrrd": "nrrd", "dicom-seg": "dicom-seg",
                "dicom_seg": "dicom-seg", "dicomseg": "dicom-seg", "seg": "dicom-seg"}
_ACCEPTED_INPUTS = ("a NIfTI file (.nii, .nii.gz), an NRRD file (.nrrd, .nhdr), or DICOM (a directory, "
                    ".dcm/.dicom files, a file with the DICM preamble, or a list of the series' files)")
_ACCEPTED_OUTPUTS = "nifti (.nii, .nii.gz), nrrd (.nrrd) or dicom-seg (.dcm)"


def _by_extension(name: str, table) -> str | None:
    low = name.lower()
    for ext, fmt in table:
        if low.endswith(ext) and len(low) > len(ext):
            return fmt
    return None


def _has_dicm_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _single_format(src) -> str:
    if not isinstance(src, (str, os.PathLike)):
        raise VolumeError(f"expected an image path ({_ACCEPTED_INPUTS}), received {type(src).__name__}")
    p = Path(src)
    if p.is_dir():
        return "dicom"
    fmt = _by_extension(p.name, _INPUT_EXTS)
    if fmt is not None:
        return fmt
    if p.is_file() and _has_dicm_magic(p):
        return "dicom"
    state = "" if p.exists() else " (not found)"
    raise VolumeError(f"cannot tell the image format of {str(p)!r}{state}: expected {_ACCEPTED_INPUTS}")


def input_format(source) -> str:
    """``"nifti"``, ``"nrrd"`` or ``"dicom"`` for an input path, directory or list of paths (see the module)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise VolumeError(f"received an empty list of input files; expected {_ACCEPTED_INPUTS}")
        formats = [_single_format(s) for s in source]
        images = [(str(s), f) for s, f in zip(source, formats) if f != "dicom"]
        if len(source) == 1:
            return formats[0]
        if images:
            raise VolumeError(f"segmentation reads one image per run; received a list of {len(source)} paths "
                              f"including {images[0][0]!r} ({images[0][1]}); expected one NIfTI/NRRD file or "
                              "the DICOM files of one series")
        return "dicom"
    return _single_format(source)


def load_image(source, series: str | None = None):
    """Read ``source`` as a :class:`~segrt.volume.Volume` with the reader :func:`input_format` picks.

    ``series`` (a DICOM SeriesInstanceUID) is only meaningful for DICOM inputs.
    """
    fmt = input_format(source)
    if isinstance(source, (list, tuple)) and fmt != "dicom":
        source = source[0]
    if series is not None and fmt != "dicom":
        raise UsageError(f"series={series!r} selects a DICOM series, but the input {str(source)!r} is {fmt}")
    if fmt == "nifti":
        from segrt.volume import load_nifti

        return load_nifti(source)
    if fmt == "nrrd":
        from segrt.nrrdio import read_nrrd

        return read_nrrd(source)
    from segrt.dicomio import read_dicom_series

    return read_dicom_series(source, series_uid=series).volume


def output_format(path, fmt: str | None = None) -> str:
    """``"nifti"``, ``"nrrd"`` or ``"dicom-seg"`` for an output ``path``, from ``fmt`` or else its extension."""
    by_ext = _by_extension(Path(path).name, _OUTPUT_EXTS)
    if fmt is None:
        if by_ext is None:
            raise OutputError(f"cannot tell the output format of {str(path)!r} from its extension: expected "
                              f"{_ACCEPTED_OUTPUTS}")
        return by_ext
    chosen = _FMT_ALIASES.get(str(fmt).strip().lower()) if isinstance(fmt, str) else None
    if chosen is None:
        raise OutputError(f"unknown output format {fmt!r}: expected {_ACCEPTED_OUTPUTS}")
    if by_ext is not None and by_ext != chosen:
        raise OutputError(f"output format {chosen!r} contradicts the extension of {str(path)!r} ({by_ext}); "
                          "expected matching ones")
    return chosen


def save_label_image(labels: np.ndarray, affine: np.ndarray, path, fmt: str | None = None, like=None,
                     class_names: Mapping[int, str] | None = None, descrip: str | None = None,
                     source_datasets=None) -> Path:
    """Write an integer label map ``(X, Y, Z)`` in the format :func:`output_format` picks; returns the path.

    NIfTI uses ``like`` (a :class:`~segrt.volume.Volume` whose NIfTI header is copied) and ``descrip``; NRRD uses
    ``class_names`` (3D Slicer segment fields) and ``descrip`` (the ``content`` field). DICOM-SEG needs
    ``source_datasets`` (the source series' pydicom datasets in the labels' slice order, e.g.
    :attr:`segrt.dicomio.DicomImage.datasets`) and uses ``class_names`` as the segment labels.
    """
    kind = output_format(path, fmt)
    if kind == "nifti":
        from segrt.volume import save_labels

        return save_labels(labels, affine, path, like=like, descrip=descrip)
    if kind == "nrrd":
        from segrt.nrrdio import save_nrrd_labels

        return save_nrrd_labels(labels, affine, path, class_names=class_names, description=descrip)
    if source_datasets is None:
        raise OutputError(f"DICOM-SEG output {str(path)!r} references its source DICOM series, and the input was not "
                          "DICOM: expected nifti (.nii, .nii.gz) or nrrd (.nrrd) for this input")
    from segrt.dicomseg import write_dicom_seg

    return write_dicom_seg(labels, source_datasets, path, dict(class_names or {}))
