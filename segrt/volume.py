"""A 3-D image with its geometry, and the NIfTI reader/writers that reproduce MONAI's loading.

:class:`Volume` always holds a channel-first ``(C, X, Y, Z)`` float32 array and the 4x4 float64
voxel-to-world (RAS, millimetre) affine, in nibabel's index order (no transpose, no reorientation).

:func:`load_nifti` reproduces MONAI 1.6.1 ``LoadImaged`` (NibabelReader) followed by
``EnsureChannelFirstd`` for NIfTI files, including MONAI's header correction
(``correct_nifti_header_if_necessary`` / ``rectify_header_sform_qform``), see MONAI_NOTES §1:

* ``d = dim[0]``; when the header zooms ``pixdim[1:d+1]`` do not match the column norms of
  ``affine[:d, :d]`` (``np.allclose`` defaults), the sform is replaced by the qform (or vice
  versa) or, failing that, the zooms are rewritten. For a 4-D ``(X, Y, Z, 1)`` file the 4th
  "norm" is ``sqrt(|t|^2 + 1)``, which is why such files usually lose their sform (as in MONAI).
* the array is ``np.asanyarray(img.dataobj).astype(float32)`` (nibabel scaling applied);
* a 3-D file becomes ``(1, X, Y, Z)``; a 4-D file ``(X, Y, Z, T)`` becomes ``(T, X, Y, Z)``
  (MONAI moves the last axis first). The channel count is checked by the engine, not here.

Writers (:func:`save_labels`, :func:`save_volume`) write to a temporary name in the target
directory and ``os.replace`` it into place, so a failure never leaves a partial file.

gzip: ``.nii.gz`` files are (de)compressed with ISA-L (``isal``) or zlib-ng (``zlib-ng``) when one of
them is importable (ISA-L first), else with the standard library's ``gzip`` as nibabel does. Only the
codec changes: a single-file NIfTI-1 is read by nibabel from the fast codec's stream (same header,
extensions, scaling and header correction), and written by nibabel into the fast codec's stream (the
same uncompressed bytes as ``nibabel.save``; a standard gzip file, no file name, mtime 0). Anything
else (NIfTI-2, plain ``.nii``), and any failure while reading through the fast codec, goes through the
standard path, so its errors are exactly those of nibabel. ``benchmarks/bench_io.py`` measures the codecs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segrt.errors import VolumeError

__all__ = ["Volume", "load_nifti", "save_labels", "save_volume", "correct_nifti_header"]

_NIFTI_EXTS = (".nii.gz", ".nii")


def _column_norms(affine: np.ndarray, r: int) -> np.ndarray:
    """MONAI ``affine_to_spacing(affine, r)``: column norms of ``affine[:r, :r]``, zeros → 1."""
    a = np.asarray(affine, dtype=np.float64)[:r, :r]
    sp = np.sqrt(np.sum(a * a, axis=0))
    sp[sp == 0] = 1.0
    return sp


@dataclass
class Volume:
    """A channel-first image ``(C, X, Y, Z)`` float32 with its 4x4 voxel-to-world affine."""

    array: np.ndarray
    affine: np.ndarray
    header: object | None = None  # nibabel.Nifti1Header (kept loosely typed: nibabel imported lazily)
    path: str | None = None

    def __post_init__(self):
        aff = np.asarray(self.affine)
        if aff.shape != (4, 4):
            raise VolumeError(f"Affine shape must be (4, 4), not {tuple(aff.shape)}")
        if not np.all(np.isfinite(aff)):
            raise VolumeError(f"Affine must hold finite numbers, received {aff.tolist()}")
        self.affine = aff.astype(np.float64, copy=False)
        arr = self.array
        if not isinstance(arr, np.ndarray):
            raise VolumeError(f"Volume array must be a numpy.ndarray, received {type(arr).__name__}")
        if arr.ndim != 4:
            raise VolumeError(
                f"Volume array must be 4-D channel-first (C, X, Y, Z), received shape {tuple(arr.shape)} "
                f"({arr.ndim}-D); use Volume.from_array for a 3-D (X, Y, Z) array")
        if min(arr.shape) < 1:
            raise VolumeError(f"Volume array must not be empty, received shape {tuple(arr.shape)}")
        if arr.dtype != np.float32:
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
                raise VolumeError(f"Volume array must be numeric, received dtype {arr.dtype}")
            self.array = arr.astype(np.float32)

    @classmethod
    def from_array(cls, array: np.ndarray, affine: np.ndarray | None = None,
                   spacing: tuple[float, float, float] | None = None, **kw) -> "Volume":
        """Wrap a 3-D ``(X, Y, Z)`` (or already channel-first 4-D) array.

        ``affine`` defaults to ``diag(spacing) `` (``spacing`` defaults to 1 mm); give one or the other.
        """
        array = np.asarray(array)
        if affine is not None and spacing is not None:
            raise VolumeError("give either affine or spacing, not both")
        if affine is None:
            sp = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
            if len(sp) != 3 or any(not np.isfinite(s) or s <= 0 for s in sp):
                raise VolumeError(f"spacing must be 3 positive numbers, received {spacing!r}")
            affine = np.diag([*sp, 1.0])
        if array.ndim == 3:
            array = array[None]
        elif array.ndim != 4:
            raise VolumeError(f"expected a 3-D (X, Y, Z) or 4-D (C, X, Y, Z) array, received shape "
                              f"{tuple(array.shape)}")
        return cls(array, np.asarray(affine, dtype=np.float64), **kw)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0)))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))

    def __repr__(self) -> str:
        return (f"Volume(shape={tuple(self.array.shape)}, spacing="
                f"({', '.join(f'{s:.4g}' for s in self.spacing)}), axcodes={''.join(self.axcodes)}, "
                f"path={self.path!r})")


# ---- gzip codec ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GzipCodec:
    """A gzip implementation: ``module`` has the standard ``gzip`` module's API (``GzipFile``, ``open``,
    ``compress``, ``decompress``); ``level`` is the compression level segrt writes with."""

    name: str  # "isal", "zlib-ng" or "stdlib"
    version: str
    module: object
    level: int

    @property
    def fast(self) -> bool:
        return self.name != "stdlib"


def _load_codec(name: str) -> _GzipCodec | None:
    """The codec ``name`` when its package is importable, else None."""
    import importlib

    try:
        if name == "isal":
            # python-isal (https://python-isal.readthedocs.io): ``isal.igzip`` is a drop-in ``gzip``
            # (IGzipFile subclasses gzip.GzipFile). ISA-L has levels 0-3 only (and its level 0 still
            # compresses, unlike zlib's; xopen's v1.9.0 notes use ISA-L at levels 1-2 only). Level 1
            # is about the size of zlib level 1, nibabel's default: see benchmarks/bench_io.py.
            igzip = importlib.import_module("isal.igzip")
            return _GzipCodec("isal", importlib.import_module("isal").__version__, igzip, 1)
        if name == "zlib-ng":
            # python-zlib-ng (https://github.com/pycompression/python-zlib-ng): ``zlib_ng.gzip_ng`` is a
            # drop-in ``gzip`` (GzipNGFile subclasses gzip.GzipFile) with zlib's 0-9 level scale.
            gzip_ng = importlib.import_module("zlib_ng.gzip_ng")
            return _GzipCodec("zlib-ng", importlib.import_module("zlib_ng").__version__, gzip_ng, 1)
        if name == "stdlib":
            import gzip
            import zlib

            # nibabel.save's own level (nibabel.openers.Opener.default_compresslevel)
            return _GzipCodec("stdlib", zlib.ZLIB_RUNTIME_VERSION, gzip, 1)
    except ImportError:
        return None
    raise ValueError(f"unknown gzip codec {name!r}: expected 'isal', 'zlib-ng' or 'stdlib'")


_CODEC: list = []  # the selected codec, chosen once (tests reset it)


def _gzip_codec() -> _GzipCodec:
    """The fastest importable gzip codec: ISA-L, then zlib-ng, then the standard library."""
    if not _CODEC:
        for name in ("isal", "zlib-ng", "stdlib"):
            codec = _load_codec(name)
            if codec is not None:
                _CODEC.append(codec)
                break
    return _CODEC[0]


def _read_gz_fast(p: Path, codec: _GzipCodec):
    """``(img, data)`` of a single-file NIfTI-1 ``.nii.gz`` read through ``codec``, or None.

    None means "use the standard path": the file is not a NIfTI-1 ``.nii.gz`` (nibabel's own sniff
    decides), or reading it through the fast codec failed in any way, in which case the standard path
    reads it again and raises nibabel's own error for it (so errors never depend on the codec).
    """
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    if not (codec.fast and p.name.lower().endswith(".nii.gz")):
        return None
    try:
        f = codec.module.open(str(p), "rb")
    except OSError:
        return None
    try:
        # nib.load's choice for a '.nii.gz': Nifti1Image when its header class accepts the first bytes
        if not nib.Nifti1Image.header_class.may_contain_header(f.read(nib.Nifti1Header.sizeof_hdr)):
            return None
        fh = FileHolder(fileobj=f)  # pos 0: nibabel seeks back to the start
        img = nib.Nifti1Image.from_file_map({"image": fh}, mmap=False)  # single file: "image" only
        if not hasattr(img, "dataobj") or not hasattr(img, "affine"):
            return None
        correct_nifti_header(img)
        data = np.asanyarray(img.dataobj)
    except Exception:  # noqa: BLE001 - corrupt/truncated/unexpected: the standard path decides
        return None
    finally:
        f.close()
    return img, data


# ---- reading -------------------------------------------------------------------------------------
def correct_nifti_header(img) -> None:
    """MONAI's ``correct_nifti_header_if_necessary`` applied in place to a nibabel image."""
    hdr = img.header
    if hdr.get("dim") is None:
        return
    d = int(hdr["dim"][0])
    if d >= 5:
        return
    pixdim = np.asarray(hdr.get_zooms())[:d]
    if np.allclose(pixdim, _column_norms(img.affine, d)):
        return
    if not hasattr(img, "get_sform"):
        return
    # rectify_header_sform_qform
    sform, qform = img.get_sform(), img.get_qform()
    sform_mismatch = not np.allclose(_column_norms(sform, d), pixdim)
    qform_mismatch = not np.allclose(_column_norms(qform, d), pixdim)
    if hdr["sform_code"] != 0:
        if not sform_mismatch:
            return
        if not qform_mismatch:
            img.set_sform(img.get_qform())
            return
    if hdr["qform_code"] != 0:
        if not qform_mismatch:
            return
        if not sform_mismatch:
            img.set_qform(img.get_sform())
            return
    hdr.set_zooms(_column_norms(img.affine, d))


def load_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file exactly as MONAI's LoadImaged + EnsureChannelFirstd would (MONAI_NOTES §1)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    p = Path(path)
    if not p.exists():
        raise VolumeError(f"input image not found: expected an existing NIfTI file, received {str(p)!r}")
    if p.is_dir():
        raise VolumeError(f"input image must be a file, received a directory {str(p)!r}")
    fast = _read_gz_fast(p, _gzip_codec())
    if fast is not None:
        img, data = fast
    else:  # the standard path: nibabel with the standard library's gzip
        try:
            img = nib.load(str(p))
        except (ImageFileError, OSError, ValueError, EOFError) as exc:
            raise VolumeError(f"cannot read {str(p)!r} as an image (expected NIfTI .nii/.nii.gz): {exc}") from exc
        if not hasattr(img, "dataobj") or not hasattr(img, "affine"):
            raise VolumeError(f"{str(p)!r} is not a spatial image (received {type(img).__name__})")
        try:
            correct_nifti_header(img)
            data = np.asanyarray(img.dataobj)
        except (OSError, ValueError, EOFError, TypeError) as exc:  # truncated / corrupt payload
            raise VolumeError(f"cannot read the voxel data of {str(p)!r}: {exc}") from exc
    if data.ndim not in (3, 4):
        raise VolumeError(
            f"expected a 3-D (X, Y, Z) or 4-D (X, Y, Z, C) image, received {data.ndim}-D data of shape "
            f"{tuple(data.shape)} in {str(p)!r}")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise VolumeError(f"expected numeric voxels, received dtype {data.dtype} in {str(p)!r}")
    arr = data.astype(np.float32)
    del data
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise VolumeError(f"{str(p)!r} holds {bad} non-finite (NaN/Inf) voxel(s) of {arr.size}; "
                          "expected finite intensities")
    if arr.ndim == 3:
        arr = arr[None]
    else:  # MONAI EnsureChannelFirst: original_channel_dim = -1 → move last axis first
        arr = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    affine = np.array(img.affine, dtype=np.float64)
    return Volume(arr, affine, header=img.header, path=str(p))


# ---- writing -------------------------------------------------------------------------------------
def _nifti_ext(path: Path) -> str:
    name = path.name.lower()
    for ext in _NIFTI_EXTS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise VolumeError(f"output path must end with .nii or .nii.gz, received {str(path)!r}")


def _write_image(img, filename: str) -> None:
    """Serialise ``img`` to ``filename`` like ``nibabel.save``, gzip through the fast codec if any."""
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    codec = _gzip_codec()
    if not (codec.fast and filename.lower().endswith(".nii.gz") and type(img) is nib.Nifti1Image):
        nib.save(img, filename)
        return
    with open(filename, "wb") as raw:
        # like nibabel's DeterministicGzipFile: no file name in the gzip header, mtime 0
        with codec.module.GzipFile(filename="", mode="wb", compresslevel=codec.level, fileobj=raw,
                                   mtime=0) as gz:
            img.to_file_map({"image": FileHolder(fileobj=gz)})


def _atomic_save(img, path: str | os.PathLike) -> Path:
    out = Path(path)
    ext = _nifti_ext(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise VolumeError(f"output directory does not exist: {str(folder)!r}")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{ext}", dir=str(folder))
    os.close(fd)
    try:
        _write_image(img, tmp)
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, (OSError, ValueError, TypeError)):
            raise VolumeError(f"cannot write {str(out)!r}: {exc}") from exc
        raise
    return out


def _make_header(like_header, dtype, affine: np.ndarray, shape: tuple[int, ...]):
    """A Nifti1Header for ``dtype`` data holding ``affine`` (copying ``like_header`` when given)."""
    import nibabel as nib

    if isinstance(like_header, nib.Nifti1Header) and not isinstance(like_header, nib.Nifti2Header):
        hdr = like_header.copy()
        scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
        if scode == 0 and qcode == 0:
            scode = qcode = 1
    else:
        hdr = nib.Nifti1Header()
        hdr.set_xyzt_units("mm")
        scode = qcode = 1
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)  # stored raw
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr.set_sform(affine, code=scode)
    hdr.set_qform(affine, code=qcode)
    return hdr


def _nifti_image(data: np.ndarray, affine: np.ndarray, hdr):
    import nibabel as nib

    img = nib.Nifti1Image(data, affine, header=hdr)
    # the constructor may rewrite the forms (codes) when the affine differs; put ours back
    img.header.set_sform(affine, code=int(hdr["sform_code"]))
    img.header.set_qform(affine, code=int(hdr["qform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    img.set_data_dtype(data.dtype)
    return img


def _check_affine(affine) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise VolumeError(f"Affine shape must be (4, 4), not {tuple(aff.shape)}")
    if not np.all(np.isfinite(aff)):
        raise VolumeError("affine must hold finite numbers")
    return aff


def save_labels(labels: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
                like: Volume | None = None, descrip: str | None = None) -> Path:
    """Write an integer label map ``(X, Y, Z)`` as NIfTI, atomically.

    When ``like`` carries a NIfTI-1 header it is copied (sform/qform codes, xyzt units, descrip, time
    pixdim), with the label datatype, raw storage (slope 1, intercept 0) and ``affine`` in both forms.
    Otherwise a fresh header is written with sform = qform = ``affine`` (code 1, scanner), like MONAI.
    ``descrip`` (at most 80 ASCII characters) replaces the header's description.
    """
    if descrip is not None:
        if not isinstance(descrip, str) or len(descrip.encode("ascii", "replace")) > 80:
            raise VolumeError(f"descrip must be a str of at most 80 ASCII characters, received {descrip!r}")
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise VolumeError(f"labels must be a 3-D (X, Y, Z) array, received shape {tuple(labels.shape)}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise VolumeError(f"labels must have an integer dtype (uint8/uint16), received {labels.dtype}")
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if labels.dtype in (np.int64, np.uint64):
        raise VolumeError(f"labels dtype {labels.dtype} is not supported; cast to uint8/uint16/int32 first")
    aff = _check_affine(affine)
    hdr = _make_header(None if like is None else like.header, labels.dtype, aff, labels.shape)
    if descrip is not None:
        hdr["descrip"] = descrip.encode("ascii", "replace")
    return _atomic_save(_nifti_image(np.ascontiguousarray(labels), aff, hdr), path)


def save_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a :class:`Volume` as a float32 NIfTI, atomically.

    One channel is written as ``(X, Y, Z)``; several as ``(X, Y, Z, C)`` (which :func:`load_nifti`
    reads back as ``(C, X, Y, Z)``).
    """
    if not isinstance(volume, Volume):
        raise VolumeError(f"expected a Volume, received {type(volume).__name__}")
    arr = volume.array.astype(np.float32, copy=False)
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    hdr = _make_header(volume.header, np.float32, volume.affine, data.shape)
    return _atomic_save(_nifti_image(np.ascontiguousarray(data), volume.affine, hdr), path)
