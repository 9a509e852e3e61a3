"""NRRD images in and label maps out, with their geometry converted to segrt's RAS affine.

Reading (:func:`read_nrrd`) gives the same :class:`~segrt.volume.Volume` as the image written as NIfTI would:
a channel-first ``(C, X, Y, Z)`` float32 array in the file's index order (NRRD's first axis is the fastest, like
NIfTI's ``i``; no transposition, no reorientation) and a 4x4 voxel-to-world affine in RAS millimetres.

Geometry, converted to RAS once:

* ``space directions`` row ``j`` (pynrrd's layout) is the world vector of one step along axis ``j``: it is affine
  column ``j``; ``space origin`` is column 3. ``space`` names the world frame: ``right-anterior-superior``
  (``RAS``) is used as is, ``left-posterior-superior`` (``LPS``, what ITK, 3D Slicer and DICOM write) has rows 0
  and 1 negated, ``left-anterior-superior`` (``LAS``) row 0. Any other space (``scanner-xyz``,
  ``3D-right-handed``, the ``-time`` spaces) is refused: segrt cannot place it in patient coordinates. A file
  with ``space dimension: 3`` but no ``space`` is taken as LPS, as ITK does, with a warning.
* No ``space directions``: the per-axis ``spacings`` with identity orientation (RAS, the origin at 0; what
  nibabel does for a NIfTI without orientation). The returned volume's ``header['segrt geometry']`` records
  it. No spacing either: 1 mm, with a :func:`warnings.warn`.
* NaN in a spatial direction, a singular direction matrix, or a non-finite origin is a :class:`VolumeError`.

Dimensions: 3-D ``(X, Y, Z)`` becomes ``(1, X, Y, Z)``. 4-D needs exactly one non-spatial axis (``kinds``
other than ``domain``/``space``, e.g. ``list``/``vector``, or a ``none`` entry in ``space directions``), at any
position: it becomes the channel axis, first. 2-D, 5-D and anything else are refused. Voxels become float32;
non-finite voxels are refused (as for NIfTI). Detached headers (``.nhdr``) read their data file, relative to
the header's folder. A gzip payload must end with its trailer (pynrrd alone accepts a stream cut just before it,
as nibabel does; see :func:`_check_gzip_trailer`). pynrrd's errors and truncated or corrupt data are translated into a one-line
:class:`VolumeError` naming the file. The returned ``Volume.header`` is pynrrd's header dict.

Writing: :func:`save_nrrd_labels` writes an integer label map ``(X, Y, Z)`` (uint8 when the largest label is
below 256, else uint16) gzip-encoded in ``left-posterior-superior`` space (the form 3D Slicer and ITK write)
with ``kinds: domain domain domain``; :func:`save_nrrd_volume` writes a float32 image (several channels as a
first ``vector`` axis). Both write a single ``.nrrd`` file (a detached ``.nhdr`` pair cannot be replaced
atomically) to a temporary name in the target folder and ``os.replace`` it into place, so a failure never
leaves a partial file. With ``class_names`` the label map also carries 3D Slicer's segmentation fields
(``Segment{i}_ID/_Name/_LabelValue/_Layer/_Extent/_Color`` for each non-zero label present, all in layer 0, and
``Segmentation_MasterRepresentation`` etc.), so Slicer shows the class names when the file is loaded as a
segmentation (name it ``*.seg.nrrd``); other readers ignore these key/value pairs.

pynrrd is an optional dependency (``pip install 'segrt[nrrd]'``), imported only when an NRRD is read or written.

Size: over 400 lines because the reader's axis and geometry checks (each refusal with its own message) and the two
atomic writers with the Slicer segment fields share the one space conversion; the dispatch by format is in
imageio.py.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from segrt.errors import OutputError, VolumeError
from segrt.niftiheader import check_geometry
from segrt.safety import atomic_write
from segrt.volume import Volume

__all__ = ["read_nrrd", "save_nrrd_labels", "save_nrrd_volume", "NRRD_EXTS"]

NRRD_EXTS = (".nrrd", ".nhdr")

# world frame name -> the signs that take its coordinates to RAS
_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}
_LPS = np.array([-1.0, -1.0, 1.0])
_SPATIAL_KINDS = {"domain", "space"}
_UNKNOWN_KINDS = {"???", "none"}
# a few distinct colours for Slicer's segment display (RGB in 0..1), cycled
_PALETTE = ((0.5, 0.68, 0.5), (0.94, 0.84, 0.57), (0.69, 0.48, 0.39), (0.44, 0.72, 0.82), (0.85, 0.4, 0.4),
            (0.56, 0.51, 0.78), (0.87, 0.6, 0.3), (0.4, 0.6, 0.9), (0.9, 0.75, 0.85), (0.6, 0.8, 0.3))
_GZIP_LEVEL = 6


def _nrrd(writing: bool = False):
    try:
        import nrrd
    except ImportError:
        if writing:
            raise OutputError("writing NRRD needs pynrrd: pip install 'segrt[nrrd]'") from None
        raise VolumeError("reading NRRD needs pynrrd: pip install 'segrt[nrrd]'") from None
    return nrrd


# ---- reading -------------------------------------------------------------------------------------
def read_nrrd(path: str | os.PathLike) -> Volume:
    """Read a ``.nrrd`` (or a detached ``.nhdr`` and its data file) as a RAS :class:`Volume` (see the module)."""
    nrrd = _nrrd()
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"input image not found: expected an existing NRRD file, received {str(p)!r}")
    if p.is_dir():
        raise VolumeError(f"input image must be a file, received a directory {str(p)!r}")
    try:
        with open(p, "rb") as fh:
            header = nrrd.read_header(fh)
            ndim, spatial, channel_axis = _axes(header, p)
            affine, note = _affine(header, spatial, p)
            offset = fh.tell()
            data = nrrd.read_data(header, fh, str(p), index_order="F")
        _check_gzip_trailer(header, p, offset, data)
    except VolumeError:
        raise
    except MemoryError:
        raise VolumeError(f"not enough memory to read {str(p)!r}") from None
    except FileNotFoundError as exc:  # the data file of a detached header
        raise VolumeError(f"cannot read {str(p)!r}: its data file {exc.filename!r} is missing") from exc
    except Exception as exc:  # noqa: BLE001 - the boundary: pynrrd / zlib / numpy errors on bad input
        raise VolumeError(f"cannot read {str(p)!r} as an NRRD image (.nrrd/.nhdr): the file is truncated, "
                          f"corrupt or not NRRD ({type(exc).__name__}: {exc})") from exc
    if data.ndim != ndim:  # pynrrd reshapes by 'sizes'; cannot differ, but never trust a shape silently
        raise VolumeError(f"{str(p)!r}: data has {data.ndim} axes, the header declares {ndim}")
    if data.dtype.kind not in "iufb":
        raise VolumeError(f"expected numeric voxels, received dtype {data.dtype} in {str(p)!r}")
    arr = data.astype(np.float32)  # keeps the (Fortran) memory order
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise VolumeError(f"{str(p)!r} holds {bad} non-finite (NaN/Inf) voxel(s) of {arr.size}; "
                          "expected finite intensities")
    if channel_axis is None:
        arr = arr[None]
    else:
        arr = np.ascontiguousarray(np.moveaxis(arr, channel_axis, 0))
    hdr = dict(header)
    if note:
        hdr["segrt geometry"] = note
    return Volume(arr, affine, header=hdr, path=str(p))


def _check_gzip_trailer(header: dict, p: Path, offset: int, data: np.ndarray) -> None:
    """Check that a gzip-encoded payload ends with its trailer (CRC-32, length) and that they match the voxels.

    zlib checks a trailer that is there, but pynrrd's decoder never asks whether the stream ended: a file cut
    just before its 8 trailer bytes gives every voxel without a word. The voxels' CRC is compared with the last
    8 bytes of the data file (no copy); only when they differ (a cut stream, a byte skip, trailing bytes) is the
    stream decoded again by :mod:`gzip`, which gives the answer.
    """
    import gzip
    import zlib

    if str(header.get("encoding", "")).lower() not in ("gzip", "gz"):
        return
    detached = header.get("data file")
    if detached is not None:
        src = Path(detached) if os.path.isabs(str(detached)) else p.parent / str(detached)
        offset = 0
    else:
        src = p
    buf = np.ascontiguousarray(data.T)  # the decoded bytes in file order: a view of pynrrd's buffer
    with open(src, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() - offset >= 18:
            f.seek(-8, os.SEEK_END)
            tail = f.read(8)
            crc = zlib.crc32(buf.reshape(-1).view(np.uint8)) & 0xFFFFFFFF
            if tail == crc.to_bytes(4, "little") + (buf.nbytes & 0xFFFFFFFF).to_bytes(4, "little"):
                return
        f.seek(offset)
        for _ in range(int(header.get("line skip", 0) or 0)):
            f.readline()
        try:
            gzip.decompress(f.read())
        except (OSError, EOFError, zlib.error) as exc:
            raise VolumeError(f"cannot read the voxel data of {str(p)!r}: the file is truncated or corrupt "
                              f"(gzip data or checksum: {exc})") from exc


def _axes(header: dict, p: Path) -> tuple[int, list[int], int | None]:
    """``(ndim, spatial axes, channel axis or None)`` from ``dimension``, ``kinds`` and ``space directions``."""
    try:
        ndim = int(header["dimension"])
    except (KeyError, TypeError, ValueError):
        raise VolumeError(f"{str(p)!r} has no valid 'dimension' field; expected an NRRD header") from None
    if ndim not in (3, 4):
        raise VolumeError(f"expected a 3-D (X, Y, Z) or 4-D (channels + X, Y, Z) image, received {ndim}-D data "
                          f"in {str(p)!r}")
    by_kind = by_dir = None
    kinds = header.get("kinds")
    if kinds is not None:
        if len(kinds) != ndim:
            raise VolumeError(f"{str(p)!r}: 'kinds' has {len(kinds)} entries for {ndim} axes")
        low = [str(k).strip().lower() for k in kinds]
        by_kind = [i for i, k in enumerate(low) if k not in _SPATIAL_KINDS | _UNKNOWN_KINDS]
        if all(k in _UNKNOWN_KINDS for k in low):
            by_kind = None  # the kinds say nothing
    dirs = header.get("space directions")
    if dirs is not None:
        dirs = np.asarray(dirs, dtype=np.float64)
        if dirs.ndim != 2 or dirs.shape[0] != ndim:
            raise VolumeError(f"{str(p)!r}: 'space directions' has {dirs.shape[0] if dirs.ndim else 0} entries "
                              f"for {ndim} axes")
        by_dir = [i for i in range(ndim) if np.isnan(dirs[i]).all()]  # pynrrd turns 'none' into a NaN row
    if ndim == 3:
        nonspatial = by_dir or by_kind or []
        if nonspatial:
            why = (f"kind {kinds[nonspatial[0]]!r}" if kinds is not None and nonspatial[0] in (by_kind or [])
                   else "space direction 'none'")
            raise VolumeError(f"{str(p)!r}: a 3-D image needs 3 spatial axes, but axis {nonspatial[0]} has {why}; "
                              "expected 'domain' axes with finite space directions")
        return ndim, [0, 1, 2], None
    if by_dir is not None and by_kind is not None and by_dir != by_kind and by_dir:
        raise VolumeError(f"{str(p)!r}: 'kinds' {list(kinds)} and 'space directions' disagree on which axis is "
                          "not spatial")
    channel = by_dir if by_dir else by_kind
    if channel is None and header.get("spacings") is not None:
        sp = np.asarray(header["spacings"], dtype=np.float64)
        channel = [i for i in range(ndim) if np.isnan(sp[i])] if sp.shape == (ndim,) else None
    if not channel or len(channel) != 1:
        raise VolumeError(f"cannot tell the channel axis of 4-D {str(p)!r}: expected exactly one non-spatial "
                          f"axis (kind 'list'/'vector' or space direction 'none'), received kinds "
                          f"{list(kinds) if kinds is not None else None}")
    return ndim, [i for i in range(ndim) if i != channel[0]], channel[0]


def _affine(header: dict, spatial: list[int], p: Path) -> tuple[np.ndarray, str | None]:
    """The RAS voxel-to-world affine of the spatial axes, and a note when it was not given by the file."""
    where = f"of {str(p)!r}"
    dirs = header.get("space directions")
    if dirs is None:
        sp = header.get("spacings")
        sp = None if sp is None else np.asarray(sp, dtype=np.float64)
        if sp is not None and sp.shape == (int(header["dimension"]),):
            sp = sp[spatial]
            if np.all(np.isfinite(sp)) and np.all(sp != 0):
                return np.diag([*sp, 1.0]), "no space directions: 'spacings' with identity orientation (RAS)"
        warnings.warn(f"{str(p)!r} has no space directions and no spacings: assuming 1 mm voxels with identity "
                      "orientation", stacklevel=3)
        return np.eye(4), "no space directions or spacings: 1 mm, identity orientation (RAS)"
    space = header.get("space")
    if space is None:
        sdim = header.get("space dimension")
        if sdim is None or int(sdim) != 3:
            raise VolumeError(f"{str(p)!r} has space directions but no 3-D 'space'; expected space "
                              "'left-posterior-superior', 'right-anterior-superior' or 'left-anterior-superior'")
        warnings.warn(f"{str(p)!r} names no 'space': taking its coordinates as left-posterior-superior, as ITK "
                      "does", stacklevel=3)
        signs = _SPACES["lps"]
    else:
        signs = _SPACES.get(str(space).strip().lower())
        if signs is None:
            raise VolumeError(f"NRRD space {space!r} of {str(p)!r} is not supported: expected "
                              "'left-posterior-superior' (LPS), 'right-anterior-superior' (RAS) or "
                              "'left-anterior-superior' (LAS) patient coordinates")
    dirs = np.asarray(dirs, dtype=np.float64)
    if dirs.ndim != 2 or dirs.shape[1] != 3:
        raise VolumeError(f"{str(p)!r}: 'space directions' must hold 3-D vectors, received shape "
                          f"{tuple(dirs.shape)}")
    m = dirs[spatial].T  # column j = world vector of spatial axis j
    if not np.all(np.isfinite(m)):
        raise VolumeError(f"the space directions {where} hold NaN/Inf: {np.round(m.T, 6).tolist()}; expected "
                          "finite vectors for the 3 spatial axes")
    origin = header.get("space origin")
    origin = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64).reshape(-1)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise VolumeError(f"the space origin {where} must be 3 finite numbers, received {origin.tolist()}")
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = origin
    aff[:3] *= np.asarray(signs)[:, None]
    check_geometry(aff, where)  # singular direction matrix → VolumeError
    return aff, None


# ---- writing -------------------------------------------------------------------------------------
def _output(path) -> tuple[Path, Path]:
    out = Path(path)
    name = out.name.lower()
    if not (name.endswith(".nrrd") and len(name) > len(".nrrd")):
        raise OutputError(f"NRRD output path must end with .nrrd (a single file), received {str(out)!r}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output directory does not exist: {str(folder)!r}")
    return out, folder


def _lps_geometry(affine) -> tuple[np.ndarray, np.ndarray]:
    """``(space directions rows, space origin)`` in LPS of a RAS affine."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise VolumeError(f"Affine shape must be (4, 4), not {tuple(aff.shape)}")
    check_geometry(aff, "to write")
    return (_LPS[:, None] * aff[:3, :3]).T, _LPS * aff[:3, 3]


def _atomic_write(data: np.ndarray, header: dict, path) -> Path:
    """Write ``data`` (file index order) with ``header`` to a temporary name beside ``path``, then rename it."""
    nrrd = _nrrd(writing=True)
    out, folder = _output(path)
    return atomic_write(out, lambda fh: nrrd.write(fh, data, header, compression_level=_GZIP_LEVEL,
                                                   index_order="F"),
                        ext=".nrrd", translate=(OSError, ValueError, TypeError, UnicodeError))


def _ascii_value(text, what: str) -> str:
    """A key/value string NRRD can hold: one ASCII line (control characters → space, others → '?')."""
    s = re.sub(r"[\x00-\x1f\x7f]", " ", str(text))
    return s.encode("ascii", "replace").decode("ascii").strip() or what


def _segment_fields(labels: np.ndarray, class_names) -> dict[str, str]:
    """3D Slicer's segmentation key/value pairs for each non-zero label present (one layer, full extent)."""
    if isinstance(class_names, Mapping):
        names = {int(k): v for k, v in class_names.items()}
    else:
        names = dict(enumerate(class_names))
    present = [int(v) for v in np.unique(labels) if v != 0]
    extent = " ".join(f"0 {n - 1}" for n in labels.shape)
    fields = {}
    for i, value in enumerate(present):
        name = _ascii_value(names.get(value, f"class_{value}"), f"class_{value}")
        r, g, b = _PALETTE[(value - 1) % len(_PALETTE)]
        fields.update({
            f"Segment{i}_ID": f"Segment_{value}",
            f"Segment{i}_Name": name,
            f"Segment{i}_NameAutoGenerated": "0",
            f"Segment{i}_LabelValue": str(value),
            f"Segment{i}_Layer": "0",
            f"Segment{i}_Extent": extent,
            f"Segment{i}_Color": f"{r} {g} {b}",
            f"Segment{i}_ColorAutoGenerated": "0",
        })
    fields.update({
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    })
    return fields


def save_nrrd_labels(labels: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
                     class_names: Mapping[int, str] | None = None, description: str | None = None) -> Path:
    """Write an integer label map ``(X, Y, Z)`` with its RAS ``affine`` as a gzip ``.nrrd`` (LPS space), atomically.

    ``class_names`` (``{label value: name}``, or a sequence indexed by label value) adds 3D Slicer's segment
    fields for each non-zero label present; labels without a name are called ``class_{value}``.
    ``description`` goes to the standard ``content`` field. Returns the path written.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise VolumeError(f"labels must be a 3-D (X, Y, Z) array, received shape {tuple(labels.shape)}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise VolumeError(f"labels must have an integer dtype (uint8/uint16), received {labels.dtype}")
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise VolumeError(f"label values must lie in 0..65535 for NRRD output, received {lo}..{hi}")
    data = labels.astype(np.uint8 if hi < 256 else np.uint16, copy=False)
    dirs, origin = _lps_geometry(affine)
    header = {
        "type": "uint8" if data.dtype == np.uint8 else "uint16",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": dirs,
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "space origin": origin,
    }
    if description is not None:
        header["content"] = _ascii_value(description, "segrt")
    if class_names is not None:
        header.update(_segment_fields(data, class_names))
    return _atomic_write(data, header, path)


def save_nrrd_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a :class:`Volume` as a float32 gzip ``.nrrd`` (LPS space), atomically.

    One channel is written as ``(X, Y, Z)``; several as ``(C, X, Y, Z)`` with a first ``vector`` axis (space
    direction ``none``), which :func:`read_nrrd` reads back as the same ``(C, X, Y, Z)``.
    """
    if not isinstance(volume, Volume):
        raise VolumeError(f"expected a Volume, received {type(volume).__name__}")
    arr = volume.array.astype(np.float32, copy=False)
    dirs, origin = _lps_geometry(volume.affine)
    if arr.shape[0] == 1:
        data, kinds = arr[0], ["domain"] * 3
    else:
        data, kinds = arr, ["vector", "domain", "domain", "domain"]
        dirs = np.vstack([np.full((1, 3), np.nan), dirs])  # pynrrd writes a NaN row as 'none'
    header = {
        "type": "float",
        "dimension": data.ndim,
        "space": "left-posterior-superior",
        "space directions": dirs,
        "kinds": kinds,
        "encoding": "gzip",
        "space origin": origin,
    }
    return _atomic_write(data, header, path)
