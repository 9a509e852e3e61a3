"""segrt.volume.read_nifti (voxels as stored, parallel gzip decoding) and the device uploader that takes them.

Every case is compared with nibabel's own reading (``np.asanyarray(nib.load(p).dataobj)``), on fresh random
data of several dtypes, shapes, byte orders and scalings; the parallel decoder (rapidgzip) is forced on small
files here and must give the same arrays and the same errors as the standard path.
"""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

import segrt.gzipio as gz
from segrt.niftiheader import correct_nifti_header
from segrt.errors import VolumeError
from segrt.volume import RawImage, load_nifti, read_nifti, save_labels

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]


def _affine(rng):
    a = np.diag([-0.75, 0.875, 2.5, 1.0])
    a[:3, 3] = rng.integers(-100, 100, 3) / 4.0
    return a


def _random(rng, dtype, shape):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.normal(0, 300, shape)).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


def _write(path, data, affine, slope=None, inter=None, big_endian=False):
    hdr = nib.Nifti1Header(endianness=">" if big_endian else "<")
    hdr.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header=hdr)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def _nibabel_reference(path):
    img = nib.load(str(path))
    correct_nifti_header(img)
    data = np.asanyarray(img.dataobj)
    arr = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return arr, np.asarray(img.affine, np.float64)


@pytest.fixture
def force_parallel(monkeypatch):
    """rapidgzip for every .nii.gz (even tiny ones), with 2 threads; records that it was used."""
    rapidgzip = pytest.importorskip("rapidgzip")
    used = []
    real_open = rapidgzip.open

    def spy(*a, **k):
        used.append(k.get("parallelization"))
        return real_open(*a, **k)

    monkeypatch.setattr(gz, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(gz, "decode_threads", lambda: 2)
    monkeypatch.setenv("SEGRT_PARALLEL_GZIP", "1")  # from 2 CPUs
    monkeypatch.setattr(rapidgzip, "open", spy)
    return used


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_read_nifti_is_nibabels_data_as_stored(tmp_path, request, parallel, ext):
    used = request.getfixturevalue("force_parallel") if parallel else None
    rng = np.random.default_rng(11 + parallel)
    for i, dtype in enumerate(DTYPES):
        shape = tuple(int(s) for s in rng.integers(3, 17, 3))
        data = _random(rng, dtype, shape)
        aff = _affine(rng)
        p = _write(tmp_path / f"a{i}{ext}", data, aff)
        raw = read_nifti(p)
        ref, ref_aff = _nibabel_reference(p)
        assert isinstance(raw, RawImage)
        assert raw.array.dtype == ref.dtype == np.dtype(dtype)  # stored dtype, no conversion
        assert raw.array.shape == (1, *shape) and raw.num_channels == 1 and raw.spatial_shape == shape
        assert raw.array.flags.f_contiguous  # the file's order: no host transposition
        np.testing.assert_array_equal(raw.array, ref)
        np.testing.assert_array_equal(raw.affine, ref_aff)
        vol = raw.to_volume()
        np.testing.assert_array_equal(vol.array, ref.astype(np.float32))
        np.testing.assert_array_equal(load_nifti(p).array, vol.array)
    if parallel:
        assert used == ([2] * 2 * len(DTYPES) if ext == ".nii.gz" else [])  # read_nifti + load_nifti


@pytest.mark.parametrize("parallel", [False, True])
def test_scaled_big_endian_and_4d_files(tmp_path, request, parallel):
    if parallel:
        request.getfixturevalue("force_parallel")
    rng = np.random.default_rng(3)
    aff = _affine(rng)
    # scaled int16: nibabel's scaled values (float), as MONAI sees them
    d = _random(rng, np.int16, (9, 8, 7))
    p = _write(tmp_path / "scaled.nii.gz", d, aff, slope=0.5, inter=-1024.0)
    ref, _ = _nibabel_reference(p)
    raw = read_nifti(p)
    assert raw.array.dtype.kind == "f"
    np.testing.assert_array_equal(raw.array, ref)
    # big-endian storage: same values
    d = _random(rng, np.int16, (9, 8, 7))
    p = _write(tmp_path / "be.nii.gz", d.astype(">i2"), aff, big_endian=True)
    np.testing.assert_array_equal(read_nifti(p).array, _nibabel_reference(p)[0])
    # 4-D (X, Y, Z, 2) → (2, X, Y, Z); the Volume is C-contiguous as before
    d = _random(rng, np.float32, (6, 5, 4, 2))
    p = _write(tmp_path / "4d.nii.gz", d, aff)
    raw = read_nifti(p)
    np.testing.assert_array_equal(raw.array, np.moveaxis(d, -1, 0))
    vol = raw.to_volume()
    assert vol.array.shape == (2, 6, 5, 4) and vol.array.flags.c_contiguous


def test_parallel_decoder_refuses_corrupt_truncated_and_odd_files(tmp_path, force_parallel):
    rng = np.random.default_rng(5)
    d = _random(rng, np.int16, (20, 18, 16))
    good = _write(tmp_path / "good.nii.gz", d, _affine(rng))
    blob = bytearray(good.read_bytes())

    corrupt = tmp_path / "corrupt.nii.gz"
    b = bytearray(blob)
    b[len(b) // 2] ^= 0x5A
    corrupt.write_bytes(bytes(b))
    with pytest.raises(VolumeError, match="corrupt.nii.gz"):
        read_nifti(corrupt)

    for cut in (8, 4, len(blob) // 2):  # trailer gone, ISIZE gone, half the data gone
        trunc = tmp_path / f"trunc{cut}.nii.gz"
        trunc.write_bytes(bytes(blob[:-cut]))
        with pytest.raises(VolumeError, match=f"trunc{cut}.nii.gz"):
            read_nifti(trunc)

    # two gzip members (header | voxels): a valid gzip file; the parallel read is not trusted, the standard
    # path reads it
    raw = gzip.decompress(bytes(blob))
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:352]) + gzip.compress(raw[352:]))
    np.testing.assert_array_equal(read_nifti(multi).array, d[None])
    assert len(force_parallel) >= 4  # rapidgzip was tried on each


def test_truncated_plain_nii_is_refused(tmp_path):
    rng = np.random.default_rng(8)
    p = _write(tmp_path / "t.nii", _random(rng, np.int16, (10, 9, 8)), np.eye(4))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(VolumeError, match="cannot read the voxel data of .*cut.nii.*truncated"):
        read_nifti(cut)


def test_read_nifti_errors_name_the_file(tmp_path):
    with pytest.raises(VolumeError, match="not found"):
        read_nifti(tmp_path / "missing.nii.gz")
    with pytest.raises(VolumeError, match="directory"):
        read_nifti(tmp_path)
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(b"not a gzip file at all")
    with pytest.raises(VolumeError, match="junk.nii.gz"):
        read_nifti(bad)
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    p = _write(tmp_path / "nan.nii.gz", nan, np.eye(4))
    raw = read_nifti(p)  # as stored: not checked here
    with pytest.raises(VolumeError, match="1 non-finite"):
        raw.to_volume()


def test_decode_threads_and_threshold_choose_the_decoder(tmp_path, monkeypatch):
    assert 1 <= gz.decode_threads() <= gz.PARALLEL_MAX_THREADS
    rng = np.random.default_rng(2)
    p = _write(tmp_path / "small.nii.gz", _random(rng, np.int16, (8, 8, 8)), np.eye(4))
    monkeypatch.setattr(gz, "decode_threads", lambda: 1)
    assert gz.open_parallel(p) is None  # one CPU: the single-threaded codec
    monkeypatch.setattr(gz, "decode_threads", lambda: 16)
    assert gz.open_parallel(p) is None  # small file
    pytest.importorskip("rapidgzip")
    monkeypatch.setattr(gz, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.delenv("SEGRT_PARALLEL_GZIP", raising=False)
    f = gz.open_parallel(p)
    assert f is not None  # 16 CPUs, a large enough file
    f.close()
    monkeypatch.setattr(gz, "decode_threads", lambda: 4)
    assert gz.open_parallel(p) is None  # below _PARALLEL_MIN_THREADS: ISA-L is faster on few cores
    monkeypatch.setenv("SEGRT_PARALLEL_GZIP", "1")
    f = gz.open_parallel(p)
    assert f is not None  # forced on
    f.close()
    monkeypatch.setattr(gz, "decode_threads", lambda: 16)
    monkeypatch.setenv("SEGRT_PARALLEL_GZIP", "0")
    assert gz.open_parallel(p) is None  # switched off
    monkeypatch.delenv("SEGRT_PARALLEL_GZIP")
    monkeypatch.setattr(gz, "address_space_limited", lambda: True)
    assert gz.open_parallel(p) is None  # it would crash under an address-space limit


def test_address_space_limit_is_detected_in_a_child(tmp_path):
    import subprocess
    import sys

    code = ("import resource, segrt.gzipio as gz; print(gz.address_space_limited()); "
            "resource.setrlimit(resource.RLIMIT_DATA, (8 << 30, 8 << 30)); print(gz.address_space_limited())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == [str(gz.address_space_limited()), "True"], out.stderr


def test_fortran_labels_are_written_as_they_lie(tmp_path):
    rng = np.random.default_rng(4)
    lab = rng.integers(0, 105, size=(33, 21, 14), dtype=np.uint8)
    a = save_labels(lab, np.eye(4), tmp_path / "c.nii.gz")
    b = save_labels(np.asfortranarray(lab), np.eye(4), tmp_path / "f.nii.gz")
    assert a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(b)).dataobj), lab)


# ---- the device uploader ------------------------------------------------------------------------
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", DTYPES + [np.uint32, np.float16])
@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_uploader_gives_contiguous_float32_equal_to_numpy(dtype, order):
    from segrt.engine.gpu.preprocess import Uploader

    rng = np.random.default_rng(hash((np.dtype(dtype).str, order)) % 2**32)
    shape = (2, *(int(s) for s in rng.integers(3, 12, 3)))
    a = _random(rng, dtype, shape)
    if order == "F":
        a = np.asfortranarray(a)
    elif order == "strided":
        a = _random(rng, dtype, (2, shape[1] * 2, shape[2], shape[3] + 1))[:, ::2, :, 1:]
    out = Uploader("cpu").upload(a)
    assert out.dtype == torch.float32 and out.is_contiguous() and tuple(out.shape) == a.shape
    np.testing.assert_array_equal(out.numpy(), a.astype(np.float32))


def test_uploader_uint16_extremes():
    from segrt.engine.gpu.preprocess import Uploader

    a = np.array([0, 1, 32767, 32768, 40000, 65535], np.uint16).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(Uploader("cpu").upload(np.asfortranarray(a)).numpy(), a.astype(np.float32))


@pytest.mark.gpu
def test_uploader_on_cuda_matches_numpy():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from segrt.engine.gpu.preprocess import Uploader

    rng = np.random.default_rng(9)
    up = Uploader("cuda", chunk_bytes=1 << 16)  # several staging rounds
    for dtype in DTYPES:
        a = np.asfortranarray(_random(rng, dtype, (1, 61, 47, 33)))
        np.testing.assert_array_equal(up.upload(a).cpu().numpy(), a.astype(np.float32))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_header_extensions_shift_the_voxels_and_are_kept(tmp_path, ext):
    rng = np.random.default_rng(21)
    data = _random(rng, np.int16, (7, 6, 5))
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"segrt test extension " * 7))
    p = tmp_path / f"ext{ext}"
    nib.save(img, str(p))
    raw = read_nifti(p)
    assert nib.load(str(p)).dataobj.offset > 352  # the voxels start after the extension
    np.testing.assert_array_equal(raw.array[0], data)
    assert [e.get_content() for e in raw.header.extensions] == [b"segrt test extension " * 7]
