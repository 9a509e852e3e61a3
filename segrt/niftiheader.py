"""NIfTI-1 headers: checked before a voxel is read (:func:`inspect_nifti`), and corrected as MONAI corrects them
(:func:`correct_nifti_header`); the geometry check every volume passes (:func:`check_geometry`).

Semantics of the correction: ``docs/semantics.md`` §1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segrt import gzipio
from segrt.errors import VolumeError
from segrt.safety import format_bytes

__all__ = ["NiftiInfo", "inspect_nifti", "correct_nifti_header", "check_geometry", "input_path"]


def _column_norms(affine: np.ndarray, r: int) -> np.ndarray:
    """MONAI ``affine_to_spacing(affine, r)``: column norms of ``affine[:r, :r]``, zeros → 1."""
    a = np.asarray(affine, dtype=np.float64)[:r, :r]
    sp = np.sqrt(np.sum(a * a, axis=0))
    sp[sp == 0] = 1.0
    return sp


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


# ---- header inspection: everything refused before a voxel is allocated -----------------------------------
#: DEFLATE's largest compression ratio (RFC 1951: a 258-byte match costs at least 2 bits): a .nii.gz of n bytes
#: cannot hold more than about 1032 n bytes.
_DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class NiftiInfo:
    """What a NIfTI-1 header declares, checked (:func:`inspect_nifti`): spatial ``shape`` (3 values; a 4th is the
    channel count), the stored ``dtype``, the voxel bytes, and where the file keeps them."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_bytes: int
    vox_offset: int
    gzipped: bool

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[:3]) + (1,) * (3 - len(self.shape[:3]))

    @property
    def channels(self) -> int:
        return int(self.shape[3]) if len(self.shape) > 3 else 1


def _memory_limit() -> int | None:
    """The most memory this process could ever get: physical RAM, or a smaller cgroup limit (bytes)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < (1 << 60):
            limits.append(int(v))
    return min(limits) if limits else None


def inspect_nifti(path: str | os.PathLike) -> NiftiInfo | None:
    """Check a ``.nii`` / ``.nii.gz`` file's NIfTI-1 header before any voxel is read (reads 348 bytes).

    Refused with a :class:`VolumeError` naming the field: ``dim[0]`` outside 1..7, a dimension < 1, an unknown
    datatype code, complex or RGB voxels, voxel spacing (``pixdim[1..3]``) that is NaN/infinite, or zero/negative
    when the file has no sform (then the spacing *is* the geometry; nibabel would silently substitute 1 mm or the
    absolute value), a declared voxel payload that the file cannot hold (a plain file shorter than offset + bytes;
    a gzip file beyond DEFLATE's 1032:1 ratio) or that exceeds the memory this machine has. Returns None when the
    file is not a NIfTI-1 single file (NIfTI-2, other formats: nibabel's own reader decides).
    """
    p = input_path(path)
    gz = p.name.lower().endswith(".gz")
    try:
        if gz:
            with gzipio.gzip_codec().module.open(str(p), "rb") as f:
                block = f.read(348)
        else:
            with open(p, "rb") as f:
                block = f.read(348)
    except Exception as exc:  # noqa: BLE001 - each gzip codec raises its own error type (IsalError, zlib.error)
        raise VolumeError(f"cannot read {str(p)!r}: {'not a valid gzip file' if gz else exc} "
                          f"(expected a NIfTI .nii or .nii.gz file)") from None
    return _check_header_block(block, p, gz)


def _check_header_block(block: bytes, p: Path, gz: bool) -> NiftiInfo | None:
    """:func:`inspect_nifti` on the header's first 348 bytes ``block`` of file ``p``."""
    import math
    import struct

    import nibabel as nib

    if len(block) < 348 or block[344:348] not in (b"n+1\0", b"ni1\0"):
        return None
    # byte order from sizeof_hdr (348), as the NIfTI-1 standard says; nibabel's guess from dim[0] is what a
    # corrupt dim[0] would fool
    order = "<" if struct.unpack("<i", block[:4])[0] == 348 else ">" if struct.unpack(">i", block[:4])[0] == 348 \
        else ("<" if 1 <= struct.unpack("<h", block[40:42])[0] <= 7 else ">")
    try:
        hdr = nib.Nifti1Header(block, endianness=order, check=False)
    except Exception:  # noqa: BLE001 - let the reader give nibabel's own error
        return None
    where = f"in {str(p)!r}"
    dim = [int(v) for v in hdr["dim"]]
    nd = dim[0]
    if not 1 <= nd <= 7:
        raise VolumeError(f"NIfTI header field dim[0] is {nd} {where}; expected the number of dimensions, 1 to 7 "
                          f"(a corrupt or non-NIfTI header)")
    shape = tuple(dim[1:nd + 1])
    if any(s < 1 for s in shape):
        raise VolumeError(f"NIfTI header declares a dimension of size {min(shape)} (dim = {list(shape)}) {where}; "
                          f"expected sizes >= 1")
    code = int(hdr["datatype"])
    if code not in nib.nifti1.data_type_codes.value_set():
        raise VolumeError(f"NIfTI header datatype code {code} is not a NIfTI data type {where}")
    dtype = np.dtype(nib.nifti1.data_type_codes.dtype[code])
    if dtype.kind == "c":
        raise VolumeError(f"complex voxels ({dtype}) are not supported {where}: expected real-valued intensities")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise VolumeError(f"voxels of type {nib.nifti1.data_type_codes.label[code]} ({dtype}) are not supported "
                          f"{where}: expected real-valued intensities (integers or floats)")
    pixdim = [float(v) for v in hdr["pixdim"][1:min(nd, 3) + 1]]
    if any(not (math.isfinite(v) and v > 0) for v in pixdim):
        # nibabel replaces 0 by 1 and negatives by their absolute value (a warning only); MONAI's header correction
        # then trusts those invented zooms over the sform: the geometry would be made up
        raise VolumeError(f"voxel spacing pixdim[1..{len(pixdim)}] = {pixdim} is not positive and finite {where}; "
                          f"expected spacings in mm (> 0)")
    n_vox = math.prod(shape)
    nbytes = n_vox * dtype.itemsize
    offset = int(hdr["vox_offset"]) if math.isfinite(float(hdr["vox_offset"])) else -1
    if offset < 0:
        raise VolumeError(f"NIfTI header vox_offset {float(hdr['vox_offset'])} is invalid {where}")
    size = p.stat().st_size
    decl = f"{'x'.join(map(str, shape))} {dtype} voxels ({format_bytes(nbytes)})"
    if not gz and size < max(offset, 352) + nbytes:
        raise VolumeError(f"cannot read the voxel data of {str(p)!r}: the file is truncated or its header is "
                          f"corrupt (the header declares {decl} from byte {max(offset, 352)}, the file has {size} "
                          f"bytes)")
    if gz and nbytes > _DEFLATE_MAX_RATIO * size + (1 << 20):
        raise VolumeError(f"the header of {str(p)!r} declares {decl}, more than a gzip file of "
                          f"{format_bytes(size)} can hold (DEFLATE compresses at most {_DEFLATE_MAX_RATIO}:1): the "
                          f"header is corrupt")
    limit = _memory_limit()
    need = nbytes + n_vox * 4  # the stored voxels and their float32 copy
    if limit is not None and need > limit:
        raise VolumeError(f"{str(p)!r} declares {decl}: reading it needs {format_bytes(need)} of memory, this "
                          f"machine has {format_bytes(limit)}")
    return NiftiInfo(str(p), shape, dtype, nbytes, offset, gz)


def check_geometry(affine: np.ndarray, where: str) -> None:
    """A voxel-to-world affine must be finite with independent voxel axes (a non-singular 3x3 part)."""
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"the affine {where} holds NaN/Inf; expected finite numbers")
    m = affine[:3, :3]
    norms = np.sqrt(np.sum(m * m, axis=0))
    # |det| over the product of the column lengths: 1 for orthogonal axes, 0 for collinear ones
    if np.any(norms == 0) or abs(float(np.linalg.det(m))) < 1e-6 * float(np.prod(norms)):
        raise VolumeError(f"the affine {where} is singular (its voxel axes do not span 3-D space: "
                          f"{np.round(m, 6).tolist()}); expected a voxel-to-world matrix with non-zero spacings")


def input_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"input image not found: expected an existing NIfTI file, received {str(p)!r}")
    if p.is_dir():
        raise VolumeError(f"input image must be a file, received a directory {str(p)!r}")
    return p
