"""A 3-D image with its geometry, and the NIfTI reader/writers that reproduce MONAI's loading.

:class:`Volume` always holds a channel-first ``(C, X, Y, Z)`` float32 array and the 4x4 float64
voxel-to-world (RAS, millimetre) affine, in nibabel's index order (no transpose, no reorientation).

:func:`load_nifti` reproduces MONAI 1.6.1 ``LoadImaged`` (NibabelReader) followed by
``EnsureChannelFirstd`` for NIfTI files, including MONAI's header correction
(``correct_nifti_header_if_necessary`` / ``rectify_header_sform_qform``), see docs/semantics.md §1:

* ``d = dim[0]``; when the header zooms ``pixdim[1:d+1]`` do not match the column norms of
  ``affine[:d, :d]`` (``np.allclose`` defaults), the sform is replaced by the qform (or vice
  versa) or, failing that, the zooms are rewritten. For a 4-D ``(X, Y, Z, 1)`` file the 4th
  "norm" is ``sqrt(|t|^2 + 1)``, which is why such files usually lose their sform (as in MONAI).
* the array is ``np.asanyarray(img.dataobj).astype(float32)`` (nibabel scaling applied);
* a 3-D file becomes ``(1, X, Y, Z)``; a 4-D file ``(X, Y, Z, T)`` becomes ``(T, X, Y, Z)``
  (MONAI moves the last axis first). The channel count is checked by the engine, not here.

Writers (:func:`save_labels`, :func:`save_volume`) write to a temporary name in the target
directory and ``os.replace`` it into place, so a failure never leaves a partial file.

Reading (:func:`read_nifti`, which :func:`load_nifti` wraps): a single-file NIfTI-1 (``.nii.gz`` or ``.nii``)
has its header parsed by nibabel (same header, extensions, scaling and header correction) and its voxels read
straight from the stream into one buffer, in the stored dtype and the file's (Fortran) order: no copy, no
conversion, no transposition. :class:`RawImage` keeps them so (the GPU pipeline uploads an int16 CT as int16);
:meth:`RawImage.to_volume` makes MONAI's float32. The gzip trailer (CRC-32, length) is always checked —
nibabel alone stops before it and returns a corrupted file's voxels silently. Anything else (NIfTI-2, a header
nibabel's Nifti1 sniff rejects) goes through ``nib.load``, so its errors are exactly nibabel's.

gzip: large ``.nii.gz`` inputs are decoded on several cores by rapidgzip when it is installed (``[gpu]`` extra)
and at least 8 CPUs are usable (on 2 cores it is slower than ISA-L; see ``_PARALLEL_MIN_THREADS``); otherwise,
and for writing, ISA-L (``isal``) or zlib-ng (``zlib-ng``) when one of them is
importable (ISA-L first), else the standard library's ``gzip`` as nibabel does. Labels are written by nibabel
into the fast codec's stream (the same uncompressed bytes as ``nibabel.save``; a standard gzip file, no file
name, mtime 0); a Fortran-ordered label map (what the GPU pipeline returns) is written without a host
transposition. ``benchmarks/bench_io.py`` measures the codecs and the readers.

Size: over 400 lines because the two image types with their one reader (the direct stream reader and nibabel's
fallback) and the atomic writers, which share the header handling; gzip is in gzipio.py, header checks in
niftiheader.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segrt import gzipio
from segrt.errors import VolumeError
from segrt.niftiheader import _check_header_block, check_geometry, correct_nifti_header, input_path
from segrt.safety import atomic_write

__all__ = ["Volume", "RawImage", "exact_in_float32", "read_nifti", "load_nifti", "save_labels", "save_volume"]

_NIFTI_EXTS = (".nii.gz", ".nii")


class _ChannelFirst:
    """Shape accessors of a channel-first ``(C, X, Y, Z)`` ``array``."""

    array: np.ndarray

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    #: True once :meth:`release` has dropped the voxels.
    released = False

    def release(self) -> None:
        """Drop the voxels, keeping shape, dtype, affine, header and path: what the CPU engine does with its own
        copy of an image file once resampled, under a memory budget (``segrt.engine.Engine.segment``). ``array``
        becomes a read-only placeholder of the same shape that holds one value; :attr:`released` says so, and
        whoever needs the intensities again reads the file again (``Segmentation`` does)."""
        self.array = np.broadcast_to(np.zeros((), self.array.dtype), self.array.shape)
        self.released = True


@dataclass
class Volume(_ChannelFirst):
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
        check_geometry(self.affine, "of the volume")
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


def _read_direct(p: Path, allow_parallel: bool = True):
    """``(img, data)`` of a single-file NIfTI-1 (``.nii.gz`` or ``.nii``) with the voxels read straight from the
    stream into one buffer (no copy, no conversion: ``data`` is the stored dtype in the file's order), or None.

    The stream is rapidgzip's parallel decoder for a large ``.nii.gz`` when installed, else the fast gzip codec
    (or the standard library's), or the plain file. Scaled data (slope/intercept), byte-swapped data and
    anything unusual is read by nibabel from the same stream (``np.asanyarray(img.dataobj)``).

    None means "use the standard path": not a NIfTI-1 single file (nibabel's own sniff decides) or its header
    cannot be parsed — nibabel then reads it again and raises its own error. Once the header is read, a short
    or corrupt voxel stream is a :class:`VolumeError` with one message whatever the codec: the gzip trailer
    (CRC-32 and length) is always read and checked, which nibabel's own reader skips (it stops after the
    voxel bytes, so it returns a corrupted file's wrong voxels without a word). A parallel read that fails in
    any way, or whose gzip ISIZE does not match the bytes decoded (rapidgzip does not notice a missing
    trailer), is done again single-threaded, which gives the definitive answer.
    """
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    name = p.name.lower()
    gz = name.endswith(".nii.gz")
    parallel = False
    try:
        if gz:
            f = gzipio.open_parallel(p) if allow_parallel else None
            parallel = f is not None
            if f is None:
                f = gzipio.gzip_codec().module.open(str(p), "rb")
        elif name.endswith(".nii"):
            f = open(p, "rb")
        else:
            return None
    except OSError:
        return None
    try:
        try:  # the header: nib.load's choice for a '.nii(.gz)' is Nifti1Image when its header class accepts it
            block = f.read(nib.Nifti1Header.sizeof_hdr)
            if not nib.Nifti1Image.header_class.may_contain_header(block):
                return None
            _check_header_block(block, p, gz)  # refuses what must not be allocated or read
            f.seek(0)
            img = nib.Nifti1Image.from_file_map({"image": FileHolder(fileobj=f)}, mmap=False)  # lazy dataobj
            if not hasattr(img, "dataobj") or not hasattr(img, "affine"):
                return None
            correct_nifti_header(img)
            proxy = img.dataobj
            dtype = np.dtype(getattr(proxy, "dtype", np.uint8))
            direct = (getattr(proxy, "is_proxy", False) and getattr(proxy, "slope", None) == 1.0
                      and getattr(proxy, "inter", None) == 0.0 and dtype.kind in "iuf" and dtype.isnative
                      and getattr(proxy, "order", "F") in ("F", "C"))
            if direct:
                shape = tuple(int(s) for s in proxy.shape)
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                f.seek(int(proxy.offset))
        except VolumeError:
            raise
        except Exception:  # noqa: BLE001 - not a NIfTI-1 we can parse: the standard path decides
            if parallel:
                return _read_direct(p, allow_parallel=False)
            return None
        try:  # the voxels, then the gzip trailer
            if direct:
                buf = np.empty(nbytes, dtype=np.uint8)
                got = gzipio.readinto_full(f, memoryview(buf))
                if got != nbytes:
                    raise EOFError(f"{got} of {nbytes} voxel bytes")
                data = np.ndarray(shape, dtype=dtype, buffer=buf, order=proxy.order)
            else:
                data = np.asanyarray(proxy)
            if gz:
                while f.read(1 << 20):  # to the end of the stream: the codec checks CRC-32 and ISIZE there
                    pass
                if parallel and gzipio.gzip_isize(p) != f.tell() % (1 << 32):
                    raise EOFError("gzip length field does not match the data")
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the codec's own wording must not leak into the message
            if parallel:
                return _read_direct(p, allow_parallel=False)
            raise VolumeError(f"cannot read the voxel data of {str(p)!r}: the file is truncated or corrupt "
                              f"({'gzip data or checksum' if gz else 'fewer bytes than the header declares'})"
                              ) from exc
    finally:
        f.close()
    return img, data


def exact_in_float32(dtype) -> bool:
    """Whether float32 holds every value of ``dtype`` exactly: integers of 16 bits or fewer, booleans."""
    dtype = np.dtype(dtype)
    return dtype == np.bool_ or (dtype.kind in "iu" and dtype.itemsize <= 2)


@dataclass
class RawImage(_ChannelFirst):
    """A NIfTI image's voxels as stored: ``(C, X, Y, Z)`` in the file's dtype and memory order (a 3-D file's
    array is a Fortran-ordered view, like nibabel's), with its (header-corrected) affine and header.

    What :func:`read_nifti` returns: the GPU pipeline uploads it as it is (an int16 CT is half the bytes of its
    float32 form, and no host-side transposition or conversion is made); :meth:`to_volume` gives exactly
    :func:`load_nifti`'s :class:`Volume`. Non-finite values are *not* checked here (:meth:`to_volume` and the
    GPU pipeline check them).
    """

    array: np.ndarray
    affine: np.ndarray
    header: object | None = None
    path: str | None = None

    @property
    def exact_in_float32(self) -> bool:
        """:func:`exact_in_float32` of the stored dtype: the CPU engine then resamples from the stored array as it is
        (``float64`` arithmetic on these values equals MONAI's on its ``float32`` copy) and never holds that copy —
        half the input's bytes for an int16 CT."""
        return exact_in_float32(self.array.dtype)

    def to_volume(self) -> Volume:
        """The float32 :class:`Volume` MONAI's ``LoadImaged`` + ``EnsureChannelFirstd`` would give."""
        arr = self.array.astype(np.float32)  # keeps the memory order
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise VolumeError(f"{str(self.path)!r} holds {bad} non-finite (NaN/Inf) voxel(s) of {arr.size}; "
                              "expected finite intensities")
        if arr.shape[0] > 1:
            arr = np.ascontiguousarray(arr)
        return Volume(arr, self.affine.copy(), header=self.header, path=self.path)


def read_nifti(path: str | os.PathLike) -> RawImage:
    """Read a NIfTI file's voxels as stored (see :class:`RawImage`), with MONAI's header correction.

    Large ``.nii.gz`` files are decoded on several cores (rapidgzip) when it is installed, else through
    ISA-L / zlib-ng; the voxels are read straight into one buffer. Scaled data comes back scaled (nibabel's
    dtype). Errors are :class:`VolumeError` naming the file and what was expected.
    """
    p = input_path(path)
    try:
        with _quiet_nibabel():  # nibabel's "fixing" chatter: what matters is refused with a clear error
            img, data = _read_nifti_data(p)
    except VolumeError:
        raise
    except MemoryError:
        raise VolumeError(f"not enough memory to read {str(p)!r}") from None
    except Exception as exc:  # noqa: BLE001 - the boundary: any error of nibabel / numpy / the codecs on bad input
        raise VolumeError(f"cannot read {str(p)!r} as a NIfTI image (.nii/.nii.gz): "
                          f"{type(exc).__name__}: {exc}") from exc
    if data.ndim not in (3, 4):
        raise VolumeError(
            f"expected a 3-D (X, Y, Z) or 4-D (X, Y, Z, C) image, received {data.ndim}-D data of shape "
            f"{tuple(data.shape)} in {str(p)!r}")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise VolumeError(f"expected numeric voxels, received dtype {data.dtype} in {str(p)!r}")
    if data.dtype.kind == "c":
        raise VolumeError(f"complex voxels ({data.dtype}) are not supported in {str(p)!r}: expected real-valued "
                          f"intensities")
    affine = np.array(img.affine, dtype=np.float64)
    check_geometry(affine, f"of {str(p)!r}")
    # MONAI EnsureChannelFirst: a 3-D image gains a channel axis; original_channel_dim = -1 moves last → first
    arr = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return RawImage(arr, affine, header=img.header, path=str(p))


class _quiet_nibabel:
    """Silence nibabel's header-fixing log messages (they go to stderr and would break the CLI's one-line errors)."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("nibabel")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL + 1)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False


def _read_nifti_data(p: Path):
    """``(img, data)``: the fast direct reader, else nibabel's standard path (errors are translated by the caller)."""
    import nibabel as nib

    fast = _read_direct(p)
    if fast is not None:
        return fast
    img = nib.load(str(p))  # the standard path: nibabel with the standard library's gzip
    if not hasattr(img, "dataobj") or not hasattr(img, "affine"):
        raise VolumeError(f"{str(p)!r} is not a spatial image (received {type(img).__name__})")
    correct_nifti_header(img)
    return img, np.asanyarray(img.dataobj)


def load_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file exactly as MONAI's LoadImaged + EnsureChannelFirstd would (docs/semantics.md §1)."""
    return read_nifti(path).to_volume()


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

    codec = gzipio.gzip_codec()
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
    return atomic_write(out, lambda tmp: _write_image(img, tmp), ext=ext, by_path=True, error=VolumeError,
                        translate=(OSError, ValueError, TypeError))


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
    if not labels.flags.f_contiguous:  # NIfTI stores Fortran order: such an array is written as it lies
        labels = np.ascontiguousarray(labels)
    return _atomic_save(_nifti_image(labels, aff, hdr), path)


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
