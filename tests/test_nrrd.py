"""NRRD reading and writing (segrt/nrrdio.py): the geometry matches the same image written as NIfTI, label maps
written as NRRD keep the input's geometry, and bad files are refused with one clear VolumeError."""

from __future__ import annotations

import gzip
import os
import sys
import warnings

import numpy as np
import pytest

nrrd = pytest.importorskip("nrrd")
nib = pytest.importorskip("nibabel")

from segrt.errors import OutputError, VolumeError  # noqa: E402
from segrt.nrrdio import read_nrrd, save_nrrd_labels, save_nrrd_volume  # noqa: E402
from segrt.volume import Volume, load_nifti  # noqa: E402

SIGNS = {"left-posterior-superior": np.array([-1.0, -1.0, 1.0]),
         "right-anterior-superior": np.array([1.0, 1.0, 1.0]),
         "left-anterior-superior": np.array([-1.0, 1.0, 1.0])}


def _rot(ax, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (0, 2), (0, 1)][ax]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(kind):
    a = np.eye(4)
    if kind == "ras":
        a[:3, :3] = np.diag([0.8, 0.9, 2.5])
        a[:3, 3] = [-10.0, 20.5, 3.0]
    elif kind == "lps":  # what DICOM/ITK data usually is: x and y flipped
        a[:3, :3] = np.diag([-0.7, -0.7, 3.0])
        a[:3, 3] = [120.0, 95.5, -40.0]
    else:  # oblique, anisotropic, with a flipped axis
        a[:3, :3] = _rot(0, 17) @ _rot(2, -31) @ np.diag([1.1, 0.6, -2.0])
        a[:3, 3] = [5.25, -7.5, 60.0]
    return a


def _write_nrrd(path, data, affine_ras, space="left-posterior-superior", **extra):
    """Write ``data`` with pynrrd directly, the RAS affine expressed in ``space``."""
    sg = SIGNS[space]
    header = {"space": space, "space directions": (sg[:, None] * affine_ras[:3, :3]).T,
              "space origin": sg * affine_ras[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip", **extra}
    nrrd.write(str(path), data, header)
    return path


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
@pytest.mark.parametrize("space", list(SIGNS))
def test_geometry_matches_nifti(tmp_path, kind, space):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 6, 5)).astype(np.float32)
    aff = _affine(kind)
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "x.nii.gz"))
    ref = load_nifti(tmp_path / "x.nii.gz")
    vol = read_nrrd(_write_nrrd(tmp_path / "x.nrrd", data, aff, space))
    assert vol.array.shape == ref.array.shape == (1, 7, 6, 5)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)  # NIfTI keeps the affine in float32
    np.testing.assert_allclose(vol.affine, aff, atol=1e-12)
    assert vol.axcodes == ref.axcodes
    assert vol.path == str(tmp_path / "x.nrrd")


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_voxels_become_float32(tmp_path, dtype):
    data = (np.arange(60).reshape(3, 4, 5) - 10).astype(dtype) if dtype != np.uint8 else \
        np.arange(60, dtype=dtype).reshape(3, 4, 5)
    vol = read_nrrd(_write_nrrd(tmp_path / "x.nrrd", data, _affine("lps")))
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], data.astype(np.float32))


def test_lps_input_labels_keep_geometry(tmp_path):
    aff = _affine("oblique")
    data = np.zeros((8, 7, 6), np.float32)
    data[2:5, 1:4, 1:3] = 5.0
    data[6:, 5:, 4:] = 9.0
    src = _write_nrrd(tmp_path / "ct.nrrd", data, aff)
    vol = read_nrrd(src)
    labels = np.zeros(vol.spatial_shape, np.uint8)
    labels[vol.array[0] == 5.0] = 1
    labels[vol.array[0] == 9.0] = 3
    out = save_nrrd_labels(labels, vol.affine, tmp_path / "seg.seg.nrrd", class_names={0: "background", 1: "liver",
                                                                                        2: "spleen", 3: "kidney"})
    assert out == tmp_path / "seg.seg.nrrd"
    got, h = nrrd.read(str(out))
    _, hin = nrrd.read(str(src))
    assert h["space"] == "left-posterior-superior"
    np.testing.assert_allclose(h["space directions"], hin["space directions"], atol=1e-12)
    np.testing.assert_allclose(h["space origin"], hin["space origin"], atol=1e-12)
    assert h["kinds"] == ["domain"] * 3 and h["encoding"] == "gzip" and h["type"] == "uint8"
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, labels)
    # 3D Slicer's segment fields, for the labels present only, numbered from 0
    assert (h["Segment0_Name"], h["Segment0_LabelValue"], h["Segment0_Layer"]) == ("liver", "1", "0")
    assert (h["Segment1_Name"], h["Segment1_LabelValue"], h["Segment1_ID"]) == ("kidney", "3", "Segment_3")
    assert "Segment2_ID" not in h  # spleen is absent from the map
    assert h["Segment0_Extent"] == "0 7 0 6 0 5"
    assert len(h["Segment0_Color"].split()) == 3
    assert h["Segmentation_MasterRepresentation"] == "Binary labelmap"
    # and segrt reads its own output back with the same affine
    back = read_nrrd(out)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)


def test_labels_dtype_and_names(tmp_path):
    labels = np.zeros((4, 4, 4), np.int32)
    labels[0, 0, 0] = 300
    labels[1, 1, 1] = 2
    save_nrrd_labels(labels, np.eye(4), tmp_path / "a.nrrd", class_names=["bg", "x", "two\nlines é"])
    got, h = nrrd.read(str(tmp_path / "a.nrrd"))
    assert got.dtype == np.uint16 and h["type"] == "uint16"
    np.testing.assert_array_equal(got, labels)
    assert h["Segment0_Name"] == "two lines ?"  # one ASCII line
    assert h["Segment1_Name"] == "class_300"
    save_nrrd_labels(labels.astype(bool), np.eye(4), tmp_path / "b.nrrd", description="model v1")
    got, h = nrrd.read(str(tmp_path / "b.nrrd"))
    assert got.dtype == np.uint8 and h["content"] == "model v1"
    assert not any(k.startswith("Segment") for k in h)  # no class names, no segment fields


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4), np.uint8), "3-D"),
    (np.zeros((2, 2, 2), np.float32), "integer dtype"),
    (np.full((2, 2, 2), -1, np.int16), "0..65535"),
    (np.full((2, 2, 2), 70000, np.int32), "0..65535"),
])
def test_labels_refused(tmp_path, bad, match):
    with pytest.raises(VolumeError, match=match):
        save_nrrd_labels(bad, np.eye(4), tmp_path / "x.nrrd")
    assert not list(tmp_path.iterdir())


def test_labels_output_path_checked(tmp_path):
    lab = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(OutputError, match=r"\.nrrd"):
        save_nrrd_labels(lab, np.eye(4), tmp_path / "x.nhdr")
    with pytest.raises(OutputError, match="does not exist"):
        save_nrrd_labels(lab, np.eye(4), tmp_path / "missing" / "x.nrrd")
    with pytest.raises(VolumeError, match="singular"):
        save_nrrd_labels(lab, np.diag([1.0, 0.0, 1.0, 1.0]), tmp_path / "x.nrrd")


@pytest.mark.parametrize("channels", [1, 3])
def test_volume_round_trip(tmp_path, channels):
    rng = np.random.default_rng(1)
    vol = Volume(rng.normal(size=(channels, 5, 4, 3)).astype(np.float32), _affine("oblique"))
    save_nrrd_volume(vol, tmp_path / "v.nrrd")
    back = read_nrrd(tmp_path / "v.nrrd")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)


def test_detached_header(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    aff = _affine("lps")
    _write_nrrd(tmp_path / "img.nhdr", data, aff)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".nhdr"]  # the data file beside it
    vol = read_nrrd(tmp_path / "img.nhdr")
    np.testing.assert_array_equal(vol.array[0], data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-12)
    for p in tmp_path.iterdir():
        if p.suffix != ".nhdr":
            p.unlink()
    with pytest.raises(VolumeError, match="data file"):
        read_nrrd(tmp_path / "img.nhdr")


def test_vector_first_axis_is_channels(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
    aff = _affine("oblique")
    sg = SIGNS["left-posterior-superior"]
    dirs = np.vstack([np.full((1, 3), np.nan), (sg[:, None] * aff[:3, :3]).T])
    nrrd.write(str(tmp_path / "v.nrrd"), data, {"space": "left-posterior-superior", "space directions": dirs,
                                                "space origin": sg * aff[:3, 3],
                                                "kinds": ["vector", "domain", "domain", "domain"]})
    vol = read_nrrd(tmp_path / "v.nrrd")
    assert vol.array.shape == (3, 5, 4, 6)
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-12)


def test_list_last_axis_moves_first(tmp_path):
    data = np.arange(5 * 4 * 3 * 2, dtype=np.float32).reshape(5, 4, 3, 2)
    nrrd.write(str(tmp_path / "v.nrrd"), data, {"space": "RAS", "space directions": np.vstack(
        [np.diag([1.0, 2.0, 3.0]), np.full((1, 3), np.nan)]), "kinds": ["domain", "domain", "domain", "list"]})
    vol = read_nrrd(tmp_path / "v.nrrd")
    assert vol.array.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(vol.array, np.moveaxis(data, -1, 0))
    np.testing.assert_allclose(vol.affine, np.diag([1.0, 2.0, 3.0, 1.0]))


def test_spacings_without_directions(tmp_path):
    data = np.zeros((3, 4, 5), np.float32)
    nrrd.write(str(tmp_path / "s.nrrd"), data, {"spacings": [0.5, 0.75, 2.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # spacings alone: no warning, recorded in the header
        vol = read_nrrd(tmp_path / "s.nrrd")
    np.testing.assert_allclose(vol.affine, np.diag([0.5, 0.75, 2.0, 1.0]))
    assert "spacings" in vol.header["segrt geometry"]
    nrrd.write(str(tmp_path / "n.nrrd"), data, {})
    with pytest.warns(UserWarning, match="1 mm"):
        vol = read_nrrd(tmp_path / "n.nrrd")
    np.testing.assert_allclose(vol.affine, np.eye(4))


def test_space_dimension_without_space_is_lps(tmp_path):
    aff = _affine("lps")
    sg = SIGNS["left-posterior-superior"]
    nrrd.write(str(tmp_path / "x.nrrd"), np.zeros((2, 3, 4), np.float32), {
        "space dimension": 3, "space directions": (sg[:, None] * aff[:3, :3]).T, "space origin": sg * aff[:3, 3]})
    with pytest.warns(UserWarning, match="left-posterior-superior"):
        vol = read_nrrd(tmp_path / "x.nrrd")
    np.testing.assert_allclose(vol.affine, aff, atol=1e-12)


# ---- refused inputs ----------------------------------------------------------------------------------------------
def _raw(path, text: str, payload: bytes = b""):
    path.write_bytes(text.encode("ascii") + b"\n" + payload)
    return path


def test_refuses_2d_and_5d(tmp_path):
    nrrd.write(str(tmp_path / "a.nrrd"), np.zeros((3, 4), np.float32), {})
    with pytest.raises(VolumeError, match="received 2-D"):
        read_nrrd(tmp_path / "a.nrrd")
    nrrd.write(str(tmp_path / "b.nrrd"), np.zeros((2, 2, 3, 4, 5), np.float32), {})
    with pytest.raises(VolumeError, match="received 5-D"):
        read_nrrd(tmp_path / "b.nrrd")


def test_refuses_unknown_space(tmp_path):
    p = _write_nrrd(tmp_path / "x.nrrd", np.zeros((2, 3, 4), np.float32), np.eye(4))
    txt = p.read_bytes().replace(b"space: left-posterior-superior", b"space: scanner-xyz")
    p.write_bytes(txt)
    with pytest.raises(VolumeError, match=r"'scanner-xyz'.*left-posterior-superior"):
        read_nrrd(p)


def test_refuses_nan_and_singular_directions(tmp_path):
    head = ("NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
            "space directions: {}\nencoding: raw\n")
    p = _raw(tmp_path / "nan.nrrd", head.format("(1,0,0) (0,nan,0) (0,0,1)"), bytes(8))
    with pytest.raises(VolumeError, match="NaN"):
        read_nrrd(p)
    p = _raw(tmp_path / "none.nrrd", head.format("(1,0,0) none (0,0,1)"), bytes(8))
    with pytest.raises(VolumeError, match="3 spatial axes"):
        read_nrrd(p)
    p = _raw(tmp_path / "sing.nrrd", head.format("(1,0,0) (2,0,0) (0,0,1)"), bytes(8))
    with pytest.raises(VolumeError, match="singular"):
        read_nrrd(p)


def test_refuses_ambiguous_4d(tmp_path):
    nrrd.write(str(tmp_path / "a.nrrd"), np.zeros((2, 3, 4, 5), np.float32), {"kinds": ["domain"] * 4})
    with pytest.raises(VolumeError, match="channel axis"):
        read_nrrd(tmp_path / "a.nrrd")


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_refuses_truncated(tmp_path, encoding):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(8, 8, 8)).astype(np.float32)
    p = _write_nrrd(tmp_path / "t.nrrd", data, np.eye(4), encoding=encoding)
    whole = p.read_bytes()
    p.write_bytes(whole[: len(whole) - 700])
    with pytest.raises(VolumeError, match=r"truncated, corrupt or not NRRD") as e:
        read_nrrd(p)
    assert "\n" not in str(e.value)


def test_refuses_corrupt_gzip_and_garbage(tmp_path):
    data = np.ones((8, 8, 8), np.float32)
    p = _write_nrrd(tmp_path / "c.nrrd", data, np.eye(4))
    b = bytearray(p.read_bytes())
    b[-12:-8] = b"\xff\xff\xff\xff"  # inside the deflate stream / CRC
    p.write_bytes(bytes(b))
    with pytest.raises(VolumeError, match="truncated, corrupt"):
        read_nrrd(p)
    g = tmp_path / "g.nrrd"
    g.write_bytes(gzip.compress(b"not an nrrd at all"))
    with pytest.raises(VolumeError, match="not NRRD"):
        read_nrrd(g)
    with pytest.raises(VolumeError, match="not found"):
        read_nrrd(tmp_path / "missing.nrrd")


def test_gzip_trailer_is_checked(tmp_path):
    """pynrrd's decoder does not notice a gzip stream cut before its trailer (zlib checks a trailer that is there):
    such a file, or one with a wrong CRC-32, is refused."""
    data = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    p = _write_nrrd(tmp_path / "c.nrrd", data, np.eye(4))
    whole = p.read_bytes()
    p.write_bytes(whole[:-8])  # no trailer: pynrrd alone returns every voxel
    assert nrrd.read(str(p))[0].shape == (8, 8, 8)
    with pytest.raises(VolumeError, match="gzip data or checksum"):
        read_nrrd(p)
    crc = bytearray(whole)
    crc[-8] ^= 0xFF
    p.write_bytes(bytes(crc))
    with pytest.raises(VolumeError, match="truncated,? (or )?corrupt"):
        read_nrrd(p)


def test_gzip_big_endian(tmp_path):
    data = np.arange(60, dtype=">i2").reshape(3, 4, 5)
    head = ("NRRD0004\ntype: short\ndimension: 3\nspace: RAS\nsizes: 3 4 5\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: big\nencoding: gzip\n\n").encode()
    raw = data.tobytes(order="F")
    p = tmp_path / "m.nrrd"
    p.write_bytes(head + gzip.compress(raw))
    np.testing.assert_array_equal(read_nrrd(p).array[0], data.astype(np.float32))


def test_refuses_non_finite_voxels(tmp_path):
    data = np.zeros((2, 3, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(VolumeError, match="non-finite"):
        read_nrrd(_write_nrrd(tmp_path / "x.nrrd", data, np.eye(4)))


def test_missing_pynrrd(tmp_path, monkeypatch):
    p = _write_nrrd(tmp_path / "x.nrrd", np.zeros((2, 2, 2), np.float32), np.eye(4))
    monkeypatch.setitem(sys.modules, "nrrd", None)  # import nrrd → ImportError
    with pytest.raises(VolumeError, match=r"pip install 'segrt\[nrrd\]'"):
        read_nrrd(p)
    with pytest.raises(OutputError, match="pynrrd"):
        save_nrrd_labels(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "y.nrrd")


# ---- atomic writes -----------------------------------------------------------------------------------------------
def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    real = nrrd.write

    def broken(fh, data, header, **kw):
        fh.write(b"NRRD0005\npartial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nrrd, "write", broken)
    with pytest.raises(OutputError, match="No space left"):
        save_nrrd_labels(np.ones((3, 3, 3), np.uint8), np.eye(4), tmp_path / "seg.nrrd")
    assert list(tmp_path.iterdir()) == []
    # an existing output stays as it was
    monkeypatch.setattr(nrrd, "write", real)
    save_nrrd_labels(np.ones((3, 3, 3), np.uint8), np.eye(4), tmp_path / "seg.nrrd")
    before = (tmp_path / "seg.nrrd").read_bytes()
    monkeypatch.setattr(nrrd, "write", broken)
    with pytest.raises(OutputError):
        save_nrrd_volume(Volume.from_array(np.zeros((3, 3, 3))), tmp_path / "seg.nrrd")
    assert (tmp_path / "seg.nrrd").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["seg.nrrd"]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(fh, data, header, **kw):
        fh.write(b"NRRD0005\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(nrrd, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_nrrd_labels(np.ones((3, 3, 3), np.uint8), np.eye(4), tmp_path / "seg.nrrd")
    assert list(tmp_path.iterdir()) == []
