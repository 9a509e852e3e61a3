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


def check_run_output(output, source, artifact_dir=None) -> Path:
    """Check a run's label output before any work (:func:`segrt.safety.check_output_file`): it may be neither the
    input image nor a file of the artifact, and needs a writable directory, a NIfTI name and room for the labels.
    When ``source`` is a path its header is checked too (:func:`segrt.niftiheader.inspect_nifti`), so a bad input also
    fails before the model is loaded."""
    inputs = [_source_path(source)]
    if artifact_dir is not None and os.path.isdir(artifact_dir):
        inputs += [os.path.join(artifact_dir, n) for n in os.listdir(artifact_dir)]
    n_vox = None
    if isinstance(source, (str, os.PathLike)):
        info = inspect_nifti(source)
        n_vox = None if info is None else int(np.prod(info.spatial_shape))
    elif hasattr(source, "spatial_shape"):
        n_vox = int(np.prod(source.spatial_shape))
    need = 0
    if n_vox is not None:  # a lower bound of the label file: uint8, and DEFLATE's best ratio for .nii.gz
        need = 352 + (n_vox if not str(output).lower().endswith(".gz") else n_vox // 1032)
    return check_output_file(output, inputs=inputs, what="output", min_free_bytes=need)


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
        """The input's first channel on the labels' grid (its stored dtype), or None."""
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

    def save(self, path: str | os.PathLike) -> Path:
        """Write the labels as NIfTI on the input grid (atomic: temporary name, then rename). The input image's own
        file is refused as the output."""
        t0 = time.perf_counter()
        check_output_file(path, inputs=[_source_path(self.source)], what="output")
        save_labels(self.labels, self.affine, path, like=self.source, descrip=self.metadata.get("descrip"))
        self.timings["write"] = time.perf_counter() - t0
        return Path(path)
