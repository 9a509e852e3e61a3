"""Network-input windows from the user's own scans (``segrt export --calibration DIR``): what the CPU variants' gate
compares on besides the synthetic patches, and what int8 quantization is calibrated on.

Each scan (NIfTI, NRRD or a DICOM series folder: :func:`segrt.imageio.load_image`) goes through the spec's own
preprocessing (orientation, spacing, intensity ops: :func:`segrt.engine.preprocess.preprocess`), exactly what the
network sees at run time; windows of the spec's roi are then cut at random centres inside the scan's foreground
(voxels above the image's 20th-percentile value after preprocessing, so mostly body, not air), padded like the
sliding window when the image is smaller than the roi. Windows are drawn round-robin over the scans, seeded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segrt.errors import ExportError

__all__ = ["MAX_SCANS", "calibration_scans", "calibration_patches"]

#: scans read from a calibration folder at most (the first ones by name)
MAX_SCANS = 8
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


def calibration_scans(source) -> list:
    """The scans of ``source``: a folder (its NIfTI/NRRD files and DICOM series sub-folders, sorted by name, at
    most :data:`MAX_SCANS`), one image path, or a list of paths."""
    if isinstance(source, (list, tuple)):
        items = [Path(p) for p in source]
    else:
        p = Path(source)
        if not p.exists():
            raise ExportError(f"calibration source {str(p)!r} does not exist (expected a folder of scans)")
        if p.is_file():
            items = [p]
        else:
            items = []
            for child in sorted(p.iterdir()):
                low = child.name.lower()
                if child.is_file() and low.endswith(_IMAGE_SUFFIXES):
                    items.append(child)
                elif child.is_dir() and any(c.is_file() for c in child.iterdir()):
                    items.append(child)  # a DICOM series folder
            if not items:
                raise ExportError(f"calibration folder {str(p)!r} holds no scans (expected .nii/.nii.gz/.nrrd "
                                  f"files or DICOM series folders)")
    return items[:MAX_SCANS]


def _load(path):
    try:
        from segrt.imageio import load_image
    except ImportError:  # pragma: no cover - imageio is part of segrt
        from segrt.volume import load_nifti as load_image
    return load_image(os.fspath(path) if not isinstance(path, (list, tuple)) else path)


def _foreground_centres(img: np.ndarray, roi, rng, count: int) -> list[tuple[int, int, int]]:
    first = img[0]
    thr = np.percentile(first[:: max(1, first.shape[0] // 64), :: max(1, first.shape[1] // 64)], 20)
    fg = np.argwhere(first > thr)
    if fg.size == 0:
        fg = np.argwhere(np.ones(first.shape, bool))
    picks = fg[rng.integers(0, len(fg), size=count)]
    return [tuple(int(v) for v in c) for c in picks]


def calibration_patches(spec, source, samples: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """``samples`` batches of ``batch`` windows ``(batch, C, *roi)`` float32 from the scans of ``source``."""
    from segrt.engine.preprocess import preprocess

    scans = calibration_scans(source)
    roi = tuple(int(r) for r in spec.inference.roi_size)
    rng = np.random.default_rng(seed)
    images = []
    for path in scans:
        vol = _load(path)
        if vol.num_channels != spec.in_channels:
            raise ExportError(f"calibration scan {os.fspath(path)!r} has {vol.num_channels} channel(s); the "
                              f"network takes {spec.in_channels}")
        img, _ = preprocess(vol, spec.preprocessing)
        pad = [(0, 0)] + [(0, max(0, r - s)) for r, s in zip(roi, img.shape[1:])]
        if any(p[1] for p in pad[1:]):
            mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(
                spec.inference.padding_mode, "constant")
            img = np.pad(img, pad, mode=mode, **({"constant_values": float(spec.inference.cval)}
                                                  if mode == "constant" else {}))
        images.append(img)
    need = samples * batch
    per_scan = [need // len(images) + (1 if i < need % len(images) else 0) for i in range(len(images))]
    windows = []
    for img, n in zip(images, per_scan):
        for c in _foreground_centres(img, roi, rng, n):
            o = [min(max(0, ci - r // 2), s - r) for ci, r, s in zip(c, roi, img.shape[1:])]
            windows.append(img[:, o[0]:o[0] + roi[0], o[1]:o[1] + roi[1], o[2]:o[2] + roi[2]])
    order = rng.permutation(len(windows))
    windows = [windows[i] for i in order]
    return [np.ascontiguousarray(np.stack(windows[i * batch:(i + 1) * batch]), dtype=np.float32)
            for i in range(samples)]
