"""DICOM image series in: find the series in a folder (:func:`find_series`) and read one into a :class:`Volume`
(:func:`read_dicom_series`). pydicom (>= 2.4, the ``[dicom]`` extra) is imported only when a DICOM is read.

Grouping: every file under the given folder(s) (walked recursively, in sorted order) or in the given list is
read headers-only (``stop_before_pixels=True``, ``force=False``); files that are not DICOM (a README, a file
without the ``DICM`` preamble) or a DICOMDIR (Media Storage Directory) are skipped without a word but counted
(:attr:`SeriesList.skipped`). Files are grouped by ``SeriesInstanceUID``. An *image series* holds pixel
attributes (``Rows``/``Columns``) and is not a SEG, RTSTRUCT, SR, ... object; when more than one image series is
found and none is named, the error lists them all (UID, description, modality, slice count).

Geometry, done once (the convention of nibabel's ``nicom``, ITK/SimpleITK's ImageSeriesReader and dcm2niix):

* ``r``, ``c`` = ImageOrientationPatient's row and column direction cosines (LPS); slice normal ``n = r x c``;
* slices sorted by ``dot(ImagePositionPatient, n)`` (ascending): voxel k = 0 is the lowest along ``n``;
* voxel ``(i, j, k)`` = (column index, row index, slice index): ``X = Columns``, ``Y = Rows``;
* LPS affine columns: ``r * PixelSpacing[1]`` (spacing between columns), ``c * PixelSpacing[0]`` (between rows),
  ``(IPP_last - IPP_first) / (N - 1)``, ``IPP_first``; then LPS -> RAS (rows 0 and 1 negated), once.

The slice spacing comes from the positions only, never from SliceThickness or SpacingBetweenSlices (real series
disagree with them). What the affine cannot represent is refused with a :class:`VolumeError`, never read with a
silently wrong geometry: differing orientations, sizes or pixel spacings across slices; gantry tilt (positions
not along the normal); two slices at one position; missing slices (non-uniform gaps); multi-frame objects;
a single slice; colour images. Voxels: ``pixel_array`` transposed to ``(Columns, Rows)``, times RescaleSlope
plus RescaleIntercept of each slice (defaults 1 and 0), float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segrt.errors import VolumeError
from segrt.volume import Volume

__all__ = ["SeriesInfo", "SeriesList", "DicomImage", "dicom_available", "find_series", "read_dicom_series"]

_NEEDS_PYDICOM = "reading DICOM needs pydicom: pip install 'segrt[dicom]'"
_DECODER_HINT = ("install a decoder for it: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
                 "(or python-gdcm)")
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "RWV",
                                   "DOC", "FID", "PLAN"})
# tolerances of the geometry checks
_IOP_ATOL = 1e-4          # direction cosines equal across slices / orthonormal
_SPACING_RTOL = 1e-4      # PixelSpacing equal across slices
_GAP_RTOL = 0.01          # slice gaps equal to 1% of the median gap ...
_GAP_ATOL_MM = 0.01       # ... or 0.01 mm, whichever is larger
_TILT_PIXEL_FRACTION = 0.05  # lateral drift of the positions tolerated: 5% of the smallest pixel spacing


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise VolumeError(_NEEDS_PYDICOM) from None
    try:
        major, minor = (int(x) for x in pydicom.__version__.split(".")[:2])
    except ValueError:  # an unusual version string: trust it
        return pydicom
    if (major, minor) < (2, 4):
        raise VolumeError(f"reading DICOM needs pydicom >= 2.4, found {pydicom.__version__}: "
                          f"pip install 'segrt[dicom]'")
    return pydicom


def dicom_available() -> bool:
    """True when pydicom (>= 2.4) is importable, i.e. DICOM series can be read."""
    try:
        _pydicom()
    except VolumeError:
        return False
    return True


@dataclass
class SeriesInfo:
    """One series found by :func:`find_series`: its files, headers read but not kept."""

    uid: str
    description: str
    modality: str
    num_files: int
    files: list[str]
    is_image: bool = True

    def describe(self) -> str:
        kind = "slices" if self.is_image else "files"
        return f"{self.uid} ({self.description or 'no description'!r}, {self.modality or '?'}, {self.num_files} {kind})"


class SeriesList(list):
    """The :class:`SeriesInfo` list of :func:`find_series`, with the files skipped as non-DICOM (``skipped``)."""

    skipped: list[str]

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)


@dataclass
class DicomImage:
    """A DICOM series read as a ``(1, X, Y, Z)`` float32 :class:`Volume` (RAS affine), with its slice headers.

    ``datasets`` are the pydicom datasets (headers only) and ``files`` their paths, both in slice order
    (voxel k = ``datasets[k]``), for a writer (DICOM-SEG) that must reference the source images."""

    volume: Volume
    series_uid: str
    description: str
    datasets: list = field(repr=False)
    files: list[str] = field(repr=False)
    skipped_files: int = 0


# ---- finding files and series --------------------------------------------------------------------------------------
def _list_files(paths) -> tuple[list[Path], str]:
    """The files named by ``paths`` (a folder walked recursively, a file, or a list of either), and a label."""
    if isinstance(paths, (str, os.PathLike)):
        items, label = [paths], str(paths)
    else:
        items = list(paths)
        if not items:
            raise VolumeError("no DICOM input given: expected a folder, a file or a list of files, received an "
                              "empty list")
        label = str(items[0]) if len(items) == 1 else f"{len(items)} paths"
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files.extend(q for q in (Path(root) / n for n in sorted(names)) if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise VolumeError(f"DICOM input not found: expected an existing folder or file, received {str(p)!r}")
    return files, label


def _text(ds, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v).strip()


def _scan(paths):
    """``(series: dict uid -> (SeriesInfo, [datasets]), skipped: [paths], label)``, headers only."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    files, label = _list_files(paths)
    series: dict[str, tuple[SeriesInfo, list]] = {}
    skipped: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=False)
        except InvalidDicomError:
            skipped.append(str(f))
            continue
        except OSError as e:
            raise VolumeError(f"cannot read DICOM file {str(f)!r}: {e}") from None
        except Exception:  # noqa: BLE001 - a DICOM preamble with an unparsable body: not a readable DICOM
            skipped.append(str(f))
            continue
        sop = _text(ds, "SOPClassUID") or _text(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID")
        uid = _text(ds, "SeriesInstanceUID")
        if sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds or not uid:
            skipped.append(str(f))
            continue
        if uid not in series:
            modality = _text(ds, "Modality")
            series[uid] = (SeriesInfo(uid, _text(ds, "SeriesDescription"), modality, 0, [],
                                      is_image=False), [])
        info, dss = series[uid]
        info.files.append(str(f))
        info.num_files += 1
        dss.append(ds)
        if "Rows" in ds and "Columns" in ds and info.modality.upper() not in _NON_IMAGE_MODALITIES:
            info.is_image = True
    return series, skipped, label


def find_series(paths) -> SeriesList:
    """The DICOM series under ``paths`` (a folder walked recursively, a file, or a list of files), grouped by
    SeriesInstanceUID, in order of first appearance; non-DICOM files are skipped and listed in ``.skipped``."""
    series, skipped, _ = _scan(paths)
    return SeriesList([info for info, _ in series.values()], skipped)


# ---- reading one series --------------------------------------------------------------------------------------------
def _choose(series: dict, skipped: list, label: str, series_uid: str | None):
    if not series:
        extra = f" ({len(skipped)} non-DICOM file(s) skipped)" if skipped else ""
        raise VolumeError(f"no DICOM series found in {label}{extra}; expected DICOM image files")
    if series_uid is not None:
        uid = str(series_uid).strip()
        if uid not in series:
            valid = "; ".join(info.describe() for info, _ in series.values())
            raise VolumeError(f"series {uid!r} not found in {label}; the series there are: {valid}")
        if not series[uid][0].is_image:
            raise VolumeError(f"series {series[uid][0].describe()} is not an image series; expected CT/MR/PT... "
                              f"image slices")
        return series[uid]
    images = [s for s in series.values() if s[0].is_image]
    if not images:
        found = "; ".join(info.describe() for info, _ in series.values())
        raise VolumeError(f"no image series in {label} (found {found}); expected CT/MR/PT... image slices")
    if len(images) > 1:
        found = "; ".join(info.describe() for info, _ in images)
        raise VolumeError(f"{len(images)} image series found in {label}, choose one with --series UID: {found}")
    return images[0]


def _floats(ds, keyword: str, n: int, f: str) -> np.ndarray:
    v = ds.get(keyword)
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.shape != (n,) or not np.all(np.isfinite(a)):
        raise VolumeError(f"DICOM file {f!r} has no valid {keyword} (received {v!r}); expected {n} numbers")
    return a


def _scalar(ds, keyword: str, default: float, f: str) -> float:
    v = ds.get(keyword)
    if v is None or v == "":
        return default
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if not math.isfinite(x):
        raise VolumeError(f"DICOM file {f!r} has an invalid {keyword} {v!r}; expected a finite number")
    return x


def _slice_geometry(dss: list, files: list[str]):
    """Validate the slices' headers; ``(order, r, c, n, spacing_rc, positions)`` with ``order`` the sort."""
    nframes = [int(ds.get("NumberOfFrames", 1) or 1) for ds in dss]
    if max(nframes) > 1:
        i = int(np.argmax(nframes))
        raise VolumeError(f"multi-frame DICOM ({nframes[i]} frames in {files[i]!r}) is not supported; expected "
                          f"one slice per file (e.g. convert with dcm2niix to NIfTI)")
    if len(dss) < 2:
        raise VolumeError(f"a single slice is not a 3-D volume ({files[0]!r}); expected a series of at least 2 "
                          f"slices")
    for ds, f in zip(dss, files):
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        if spp != 1:
            raise VolumeError(f"DICOM file {f!r} is a colour image ({spp} samples per pixel, "
                              f"{_text(ds, 'PhotometricInterpretation')}); expected a grey-scale image")
    size0 = (int(dss[0].get("Rows", 0) or 0), int(dss[0].get("Columns", 0) or 0))
    if min(size0) < 1:
        raise VolumeError(f"DICOM file {files[0]!r} has no Rows/Columns; expected an image")
    iops = np.stack([_floats(ds, "ImageOrientationPatient", 6, f) for ds, f in zip(dss, files)])
    ipps = np.stack([_floats(ds, "ImagePositionPatient", 3, f) for ds, f in zip(dss, files)])
    pss = np.stack([_floats(ds, "PixelSpacing", 2, f) for ds, f in zip(dss, files)])
    for k, (ds, f) in enumerate(zip(dss, files)):
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if size != size0:
            raise VolumeError(f"slices of different sizes in one series: {size[0]}x{size[1]} (rows x columns) in "
                              f"{f!r}, {size0[0]}x{size0[1]} in {files[0]!r}; expected one size")
        if not np.allclose(iops[k], iops[0], rtol=0, atol=_IOP_ATOL):
            raise VolumeError(f"slices with different ImageOrientationPatient in one series: "
                              f"{iops[k].tolist()} in {f!r}, {iops[0].tolist()} in {files[0]!r}; expected one "
                              f"orientation")
        if not np.allclose(pss[k], pss[0], rtol=_SPACING_RTOL, atol=0):
            raise VolumeError(f"slices with different PixelSpacing in one series: {pss[k].tolist()} in {f!r}, "
                              f"{pss[0].tolist()} in {files[0]!r}; expected one pixel spacing")
    if np.any(pss[0] <= 0):
        raise VolumeError(f"PixelSpacing {pss[0].tolist()} in {files[0]!r} is not positive; expected spacings > 0")
    r, c = iops[0, :3], iops[0, 3:]
    if (abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(float(r @ c)) > 1e-3):
        raise VolumeError(f"ImageOrientationPatient {iops[0].tolist()} in {files[0]!r} is not two orthogonal unit "
                          f"vectors; expected row and column direction cosines")
    n = np.cross(r, c)
    n /= np.linalg.norm(n)
    d = ipps @ n
    order = np.argsort(d, kind="stable")
    d, p = d[order], ipps[order]
    sf = [files[i] for i in order]
    gaps = np.diff(d)
    # two slices at one position
    scale = max(float(d[-1] - d[0]) / (len(d) - 1), 0.0)
    dup_tol = max(1e-3 * scale, 1e-4)
    dups = np.nonzero(gaps <= dup_tol)[0]
    if dups.size:
        k = int(dups[0])
        raise VolumeError(f"two slices at the same position {p[k].round(4).tolist()} (distance along the slice "
                          f"normal {gaps[k]:.4g} mm): {sf[k]!r} and {sf[k + 1]!r} ({dups.size} such pair(s)); "
                          f"expected one slice per position (several acquisitions/echoes in one series?)")
    # gantry tilt: positions off the line through the first one along the normal
    rel = p - p[0]
    lateral = rel - np.outer(rel @ n, n)
    drift = float(np.max(np.linalg.norm(lateral, axis=1)))
    if drift > _TILT_PIXEL_FRACTION * float(np.min(pss[0])):
        steps = np.diff(p, axis=0)
        along = np.abs(steps @ n)
        side = np.linalg.norm(steps - np.outer(steps @ n, n), axis=1)
        tot = rel[-1]
        angle = math.degrees(math.atan2(float(np.linalg.norm(lateral[-1])), abs(float(tot @ n))))
        worst = math.degrees(float(np.max(np.arctan2(side, along))))
        raise VolumeError(f"gantry tilt of {angle:.3g} degrees (steps up to {worst:.3g} degrees off the slice "
                          f"normal; positions drift {drift:.3g} mm across the slice plane): slice positions are "
                          f"not along the normal of ImageOrientationPatient; expected an untilted series "
                          f"(resample it first, e.g. dcm2niix corrects gantry tilt)")
    # missing slices / non-uniform spacing
    med = float(np.median(gaps))
    tol = max(_GAP_RTOL * med, _GAP_ATOL_MM)
    if float(gaps.max() - gaps.min()) > tol:
        kmax, kmin = int(np.argmax(gaps)), int(np.argmin(gaps))
        what = "missing slice(s)" if gaps[kmax] > 1.5 * med else "non-uniform slice spacing"
        raise VolumeError(f"{what}: slice gaps range from {gaps[kmin]:.4g} mm (between slices {kmin} and "
                          f"{kmin + 1}) to {gaps[kmax]:.4g} mm (between slices {kmax} and {kmax + 1}: {sf[kmax]!r} "
                          f"and {sf[kmax + 1]!r}), median {med:.4g} mm; expected evenly spaced slices")
    return order, r, c, pss[0], p


def _affine_ras(r, c, pixel_spacing, positions) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm. ``pixel_spacing`` = DICOM PixelSpacing (row spacing, col spacing)."""
    lps = np.eye(4)
    lps[:3, 0] = r * pixel_spacing[1]
    lps[:3, 1] = c * pixel_spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


_MISSING_DECODER_WORDS = ("missing dependencies", "missing required dependencies", "no pixel data handlers",
                          "no plugins", "requires", "req.", "not installed")


def _decode_error(f: str, ts, e: Exception) -> str:
    """One line for pydicom's failure to decode: a missing decoder gets the install hint, corrupt data says so."""
    tsname = getattr(ts, "name", None) or str(ts)
    detail = " ".join(str(e).split()) or type(e).__name__
    if len(detail) > 300:
        detail = detail[:297] + "..."
    compressed = ts is not None and bool(getattr(ts, "is_compressed", False))
    if compressed and any(w in detail for w in _MISSING_DECODER_WORDS):
        return (f"cannot decode the pixel data of {f!r}: no decoder for its transfer syntax {tsname} is installed "
                f"({detail}); {_DECODER_HINT}")
    return (f"cannot decode the pixel data of {f!r} (transfer syntax {tsname}): {detail}; expected readable "
            f"{'compressed ' if compressed else ''}pixel data (is the file corrupt?)")


def _pixels(pydicom, f: str, rows: int, cols: int) -> tuple[np.ndarray, object]:
    try:
        ds = pydicom.dcmread(f, force=False)
    except OSError as e:
        raise VolumeError(f"cannot read DICOM file {f!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - pydicom's parse errors, translated
        raise VolumeError(f"cannot read DICOM file {f!r}: {e}") from None
    if "PixelData" not in ds:
        raise VolumeError(f"DICOM file {f!r} holds no pixel data; expected an image slice")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        px = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing decoder (RuntimeError/NotImplementedError) or corrupt data
        raise VolumeError(_decode_error(f, ts, e)) from None
    if px.shape != (rows, cols):
        raise VolumeError(f"pixel data of {f!r} has shape {tuple(px.shape)}; expected (rows, columns) = "
                          f"({rows}, {cols})")
    return px, ds


def read_dicom_series(paths, series_uid: str | None = None) -> DicomImage:
    """Read one DICOM image series as a ``(1, X, Y, Z)`` float32 RAS :class:`Volume` (see the module docstring).

    ``paths``: a folder (walked recursively), a file, or a list of files. ``series_uid``: the
    SeriesInstanceUID to read; needed when several image series are present (the error lists them)."""
    pydicom = _pydicom()
    series, skipped, label = _scan(paths)
    info, dss = _choose(series, skipped, label, series_uid)
    order, r, c, ps, positions = _slice_geometry(dss, info.files)
    files = [info.files[i] for i in order]
    headers = [dss[i] for i in order]
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    out = np.empty((1, cols, rows, len(files)), dtype=np.float32)
    for k, f in enumerate(files):
        px, ds = _pixels(pydicom, f, rows, cols)
        slope = _scalar(ds, "RescaleSlope", 1.0, f)
        inter = _scalar(ds, "RescaleIntercept", 0.0, f)
        if slope == 1.0 and inter == 0.0:
            out[0, :, :, k] = px.T
        else:
            out[0, :, :, k] = px.T * slope + inter  # in float64, then stored as float32
    affine = _affine_ras(r, c, ps, positions)
    vol = Volume(out, affine, path=label)
    return DicomImage(vol, info.uid, info.description, headers, files, skipped_files=len(skipped))
