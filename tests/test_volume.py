"""segrt.volume against MONAI 1.6.1 LoadImaged + EnsureChannelFirstd, plus errors and atomic writes."""

from __future__ import annotations

import gzip
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from segrt.errors import VolumeError
from segrt.volume import Volume, load_nifti, save_labels, save_volume


def _monai_load(path):
    pytest.importorskip("monai")
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = Compose([LoadImaged("image", image_only=False), EnsureChannelFirstd("image")])({"image": str(path)})
    return d["image"].numpy(), np.asarray(d["image"].affine, dtype=np.float64)


def _check_same_as_monai(path):
    ref_arr, ref_aff = _monai_load(path)
    vol = load_nifti(path)
    assert vol.array.dtype == np.float32 and ref_arr.dtype == np.float32
    assert vol.array.shape == ref_arr.shape
    assert np.array_equal(vol.array, ref_arr)
    assert np.array_equal(vol.affine, ref_aff), (vol.affine, ref_aff)
    return vol


def _flip_affine():
    a = np.diag([-0.8, -0.8, 2.5, 1.0])
    a[:3, 3] = [100.0, 80.0, -40.0]
    return a


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_plain_3d(tmp_path, rng):
    p = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(7, 6, 5)).astype(np.float32), _flip_affine()), p)
    vol = _check_same_as_monai(p)
    assert vol.array.shape == (1, 7, 6, 5)
    assert vol.axcodes == ("L", "P", "S")
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 2.5))
    assert vol.num_channels == 1 and vol.spatial_shape == (7, 6, 5)


def test_sform_disagreeing_with_pixdim_is_replaced_by_qform(tmp_path, rng):
    img = nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    bad = np.diag([1.2, 1.0, 2.0, 1.0])
    bad[:3, 3] = [5, 6, 7]
    img.set_qform(np.diag([1.0, 1.0, 2.0, 1.0]), code=0)  # pixdim (1, 1, 2)
    img.set_sform(bad, code=1)
    p = tmp_path / "s.nii"
    nib.save(img, p)
    assert np.allclose(nib.load(p).affine, bad)  # nibabel alone would use the sform
    vol = _check_same_as_monai(p)
    np.testing.assert_allclose(vol.affine, np.diag([1.0, 1.0, 2.0, 1.0]))  # MONAI: qform geometry wins


@pytest.mark.parametrize("variant", ["sform_only", "qform_consistent"])
def test_4d_single_channel(tmp_path, rng, variant):
    data = rng.normal(size=(6, 5, 4, 1)).astype(np.float32)
    img = nib.Nifti1Image(data, _flip_affine())
    if variant == "sform_only":
        img.header.set_qform(np.eye(4), code=0)
        img.header["pixdim"][1:4] = [0.8, 0.8, 2.5]
    else:
        img.header.set_qform(_flip_affine(), code=1)
    p = tmp_path / f"{variant}.nii.gz"
    nib.save(img, p)
    vol = _check_same_as_monai(p)
    assert vol.array.shape == (1, 6, 5, 4)
    if variant == "sform_only":  # MONAI drops the flips and the translation here (docs/semantics.md §1)
        np.testing.assert_allclose(vol.affine, np.diag([0.8, 0.8, 2.5, 1.0]))
    else:
        np.testing.assert_allclose(vol.affine, _flip_affine())


def test_4d_multichannel_is_channel_first(tmp_path, rng):
    data = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    p = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), p)
    vol = _check_same_as_monai(p)
    assert vol.array.shape == (3, 6, 5, 4)


def test_scaled_integer_storage(tmp_path, rng):
    data = rng.integers(-100, 100, size=(5, 6, 7)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([0.7, 0.7, 3.0, 1.0]))
    img.header.set_slope_inter(2.5, -1024.0)
    p = tmp_path / "ct.nii.gz"
    nib.save(img, p)
    vol = _check_same_as_monai(p)
    assert np.array_equal(vol.array[0], data.astype(np.float64) * 2.5 - 1024.0)


# ---- errors -------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match="not found"):
        load_nifti(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("name,payload", [("g.nii.gz", b"\x1f\x8b garbage"), ("g.nii", b"hello" * 100),
                                           ("g.txt", b"plain text")])
def test_garbage_file(tmp_path, name, payload):
    p = tmp_path / name
    p.write_bytes(payload)
    with pytest.raises(VolumeError, match="cannot read"):
        load_nifti(p)


def test_truncated_file(tmp_path, rng):
    p = tmp_path / "t.nii"
    nib.save(nib.Nifti1Image(rng.normal(size=(20, 20, 20)).astype(np.float32), np.eye(4)), p)
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(VolumeError, match="cannot read"):
        load_nifti(p)


def test_2d_image_rejected(tmp_path, rng):
    p = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(8, 9)).astype(np.float32), np.eye(4)), p)
    with pytest.raises(VolumeError, match=r"3-D .* received 2-D"):
        load_nifti(p)


def test_nan_voxels_rejected_with_count(tmp_path, rng):
    data = rng.normal(size=(6, 6, 6)).astype(np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    with pytest.raises(VolumeError, match=r"holds 4 non-finite"):
        load_nifti(p)


def test_volume_validation():
    with pytest.raises(VolumeError, match=r"must be \(4, 4\), not \(3, 3\)"):
        Volume(np.zeros((1, 2, 2, 2), np.float32), np.eye(3))
    with pytest.raises(VolumeError, match=r"4-D channel-first .* received shape \(2, 2, 2\)"):
        Volume(np.zeros((2, 2, 2), np.float32), np.eye(4))
    v = Volume.from_array(np.ones((3, 4, 5), np.int16), spacing=(0.5, 1, 2))
    assert v.array.shape == (1, 3, 4, 5) and v.array.dtype == np.float32
    assert v.spacing == (0.5, 1.0, 2.0)


# ---- writers --------------------------------------------------------------------------------------
def test_save_labels_keeps_like_header(tmp_path, rng):
    img = nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), _flip_affine())
    img.header.set_sform(_flip_affine(), code=4)  # mni
    img.header.set_qform(_flip_affine(), code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"scanner X"
    src = tmp_path / "in.nii.gz"
    nib.save(img, src)
    vol = load_nifti(src)
    labels = rng.integers(0, 200, size=(6, 5, 4)).astype(np.uint8)
    out = save_labels(labels, vol.affine, tmp_path / "lab.nii.gz", like=vol)
    back = nib.load(out)
    h = back.header
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(back.dataobj), labels)
    assert np.asanyarray(back.dataobj).dtype == np.uint8  # raw storage, no scaling
    assert int(h["sform_code"]) == 4 and int(h["qform_code"]) == 1
    assert h.get_xyzt_units() == ("mm", "sec")
    assert h["descrip"].item() == b"scanner X"
    np.testing.assert_allclose(back.affine, _flip_affine())
    np.testing.assert_allclose(h.get_zooms(), (0.8, 0.8, 2.5))
    assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "lab.nii.gz"]


def test_save_labels_fresh_header_and_uint16(tmp_path, rng):
    labels = rng.integers(0, 400, size=(4, 5, 6)).astype(np.uint16)
    aff = _flip_affine()
    out = save_labels(labels, aff, tmp_path / "lab.nii")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint16
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1
    assert np.array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, aff)


def test_save_labels_rejects_bad_input(tmp_path):
    with pytest.raises(VolumeError, match="3-D"):
        save_labels(np.zeros((2, 2), np.uint8), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(VolumeError, match="integer dtype"):
        save_labels(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(VolumeError, match=r"\.nii or \.nii\.gz"):
        save_labels(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "x.png")
    with pytest.raises(VolumeError, match=r"not \(3, 3\)"):
        save_labels(np.zeros((2, 2, 2), np.uint8), np.eye(3), tmp_path / "x.nii.gz")
    assert os.listdir(tmp_path) == []


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import segrt.volume as sv

    target = tmp_path / "lab.nii.gz"
    target.write_bytes(b"previous result")
    real_save = sv._write_image  # nibabel.save's signature; serialises through the selected gzip codec

    def failing_save(img, filename):
        with open(filename, "wb") as f:  # half a file, then the disk "fills up"
            f.write(gzip.compress(b"\0" * 100)[:20])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sv, "_write_image", failing_save)
    with pytest.raises(VolumeError, match="No space left"):
        save_labels(np.zeros((3, 3, 3), np.uint8), np.eye(4), target)
    assert sorted(os.listdir(tmp_path)) == ["lab.nii.gz"]
    assert target.read_bytes() == b"previous result"

    def interrupted_save(img, filename):
        real_save(img, filename)
        raise KeyboardInterrupt

    monkeypatch.setattr(sv, "_write_image", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_labels(np.zeros((3, 3, 3), np.uint8), np.eye(4), target)
    assert sorted(os.listdir(tmp_path)) == ["lab.nii.gz"]
    assert target.read_bytes() == b"previous result"


def test_save_volume_round_trip(tmp_path, rng):
    for c in (1, 2):
        v = Volume(rng.normal(size=(c, 5, 4, 3)).astype(np.float32), _flip_affine())
        p = save_volume(v, tmp_path / f"v{c}.nii.gz")
        back = load_nifti(p)
        assert np.array_equal(back.array, v.array)
        np.testing.assert_allclose(back.affine, v.affine)
