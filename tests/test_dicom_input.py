"""segrt.dicomio: DICOM series written here with pydicom from a synthetic 3-D array are read back with the right
voxels and the right RAS affine (checked voxel by voxel against the IPP/IOP geometry, and against SimpleITK's
ImageSeriesReader when SimpleITK is installed); what the affine cannot represent is refused with a clear error."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from segrt import dicomio  # noqa: E402
from segrt.dicomio import dicom_available, find_series, read_dicom_series  # noqa: E402
from segrt.errors import VolumeError  # noqa: E402

_PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _save(ds: Dataset, path: Path) -> None:
    if _PYDICOM3:
        ds.save_as(str(path), enforce_file_format=True)
    else:  # pydicom 2.4
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


def _dataset(stored_slice_rc: np.ndarray, ipp, r, c, pixel_spacing, *, series_uid, study_uid, frame_uid,
             instance: int, slice_thickness, slope, intercept, description, modality,
             transfer_syntax=ExplicitVRLittleEndian, pixel_data: bytes | None = None, **tags) -> Dataset:
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "segrt-test"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "20240101", "120000", "1", 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{x:.6f}" for x in ipp]
    ds.ImageOrientationPatient = [f"{x:.8f}" for x in (*r, *c)]
    ds.PixelSpacing = [f"{x:g}" for x in pixel_spacing]
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.Rows, ds.Columns = (int(s) for s in stored_slice_rc.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = stored_slice_rc.astype("<i2").tobytes() if pixel_data is None else pixel_data
    for keyword, value in tags.items():  # further DICOM attributes by keyword
        setattr(ds, keyword, value)
    return ds


def write_series(folder, stored: np.ndarray, *, r=(1.0, 0.0, 0.0), c=(0.0, 1.0, 0.0), pixel_spacing=(0.8, 0.7),
                 origin=(-30.0, -20.0, 15.0), slice_spacing=2.5, positions=None, slice_thickness=None,
                 slope=1.0, intercept=0.0, series_uid=None, description="synthetic", modality="CT",
                 reverse_on_disk=False, seed=0, prefix="IM", **ds_kw) -> dict:
    """Write ``stored`` (X=columns, Y=rows, Z=slices, int16) as one CT series, one file per slice, in shuffled
    order with shuffled InstanceNumbers (``reverse_on_disk``: files and instance numbers in reverse slice order).

    Geometry in LPS: row direction ``r``, column direction ``c``, slice ``k`` at ``positions[k]`` (default
    ``origin + k * slice_spacing * (r x c)``); ``pixel_spacing`` is DICOM's (row spacing, column spacing).
    ``ds_kw``: ``transfer_syntax``, ``pixel_data`` (bytes for every slice) or further DICOM attributes by keyword.
    Returns the series UID, the files (slice order) and the positions (slice order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r, c = np.asarray(r, float), np.asarray(c, float)
    n = np.cross(r, c)
    nz = stored.shape[2]
    if positions is None:
        positions = [np.asarray(origin, float) + k * slice_spacing * n for k in range(nz)]
    positions = [np.asarray(p, float) for p in positions]
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    rng = random.Random(seed)
    order = list(range(nz))
    instances = list(range(1, nz + 1))
    if reverse_on_disk:
        order.reverse()
    else:
        rng.shuffle(order)
        rng.shuffle(instances)
    files = [None] * nz
    for write_idx, k in enumerate(order):
        ds = _dataset(stored[:, :, k].T, positions[k], r, c, pixel_spacing, series_uid=series_uid,
                      study_uid=study_uid, frame_uid=frame_uid, instance=instances[write_idx],
                      slice_thickness=slice_spacing if slice_thickness is None else slice_thickness,
                      slope=slope, intercept=intercept, description=description, modality=modality, **ds_kw)
        path = folder / f"{prefix}{write_idx:04d}.dcm"
        _save(ds, path)
        files[k] = str(path)
    return {"uid": series_uid, "files": files, "positions": positions}


def _stored(shape=(6, 5, 7), seed=1) -> np.ndarray:
    """A synthetic int16 volume with distinct values along every axis (an axis swap or flip changes it)."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    noise = np.random.default_rng(seed).integers(-50, 50, size=shape)
    return (1000 * z + 37 * y + 3 * x + noise - 800).astype(np.int16)


def _expected_world_ras(r, c, pixel_spacing, positions_sorted, i, j, k) -> np.ndarray:
    lps = (np.asarray(positions_sorted[k]) + i * pixel_spacing[1] * np.asarray(r)
           + j * pixel_spacing[0] * np.asarray(c))
    return np.array([-lps[0], -lps[1], lps[2]])


def _check_geometry(img, r, c, pixel_spacing, positions):
    """Every voxel corner of the grid (and a few inside) maps to the RAS of its slice's IPP/IOP."""
    d = np.cross(r, c)
    order = np.argsort([np.dot(p, d) for p in positions])
    ps = [positions[i] for i in order]
    nx, ny, nz = img.volume.spatial_shape
    for i, j, k in [(0, 0, 0), (nx - 1, 0, 0), (0, ny - 1, 0), (0, 0, nz - 1), (nx - 1, ny - 1, nz - 1),
                    (2, 3, 4), (1, 4, 2)]:
        world = img.volume.affine @ np.array([i, j, k, 1.0])
        np.testing.assert_allclose(world[:3], _expected_world_ras(r, c, pixel_spacing, ps, i, j, k),
                                   atol=1e-4, err_msg=f"voxel {(i, j, k)}")


# ---- reading ------------------------------------------------------------------------------------------------------
def test_axial_standard(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored, slope=1, intercept=-1024)
    img = read_dicom_series(tmp_path)
    assert img.volume.array.shape == (1, 6, 5, 7) and img.volume.array.dtype == np.float32
    np.testing.assert_array_equal(img.volume.array[0], stored.astype(np.float32) - 1024)
    assert img.series_uid == w["uid"] and img.description == "synthetic"
    assert img.files == w["files"]
    assert [float(ds.ImagePositionPatient[2]) for ds in img.datasets] == [p[2] for p in w["positions"]]
    assert all("PixelData" not in ds for ds in img.datasets)
    assert img.volume.axcodes == ("L", "P", "S")
    np.testing.assert_allclose(img.volume.spacing, (0.7, 0.8, 2.5))
    expect = np.array([[-0.7, 0, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, 15.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.volume.affine, expect, atol=1e-9)
    _check_geometry(img, (1, 0, 0), (0, 1, 0), (0.8, 0.7), w["positions"])


def _oblique_dirs():
    def rot(axis, deg):
        a = np.radians(deg)
        x, y, z = np.asarray(axis, float) / np.linalg.norm(axis)
        k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
        return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    m = rot((1, 2, 0.5), 27) @ rot((0, 0, 1), 10)
    return m[:, 0], m[:, 1]


def test_oblique_orientation(tmp_path):
    r, c = _oblique_dirs()
    stored = _stored()
    w = write_series(tmp_path, stored, r=r, c=c, pixel_spacing=(0.9, 1.1), slice_spacing=1.7)
    img = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(img.volume.array[0], stored)
    _check_geometry(img, r, c, (0.9, 1.1), w["positions"])
    np.testing.assert_allclose(img.volume.spacing, (1.1, 0.9, 1.7), atol=1e-5)


def test_slice_thickness_is_not_the_spacing(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored, slice_spacing=1.25, slice_thickness=5.0, SpacingBetweenSlices="3.0")
    img = read_dicom_series(tmp_path)
    np.testing.assert_allclose(img.volume.spacing[2], 1.25, atol=1e-6)
    _check_geometry(img, (1, 0, 0), (0, 1, 0), (0.8, 0.7), w["positions"])


@pytest.mark.parametrize("slope,intercept", [(1.0, -1024.0), (0.5, 10.0), (2.0, 0.0)])
def test_rescale_slope_intercept(tmp_path, slope, intercept):
    stored = _stored()
    write_series(tmp_path, stored, slope=slope, intercept=intercept)
    img = read_dicom_series(tmp_path)
    np.testing.assert_allclose(img.volume.array[0], stored.astype(np.float64) * slope + intercept, rtol=0, atol=0)


def test_rescale_per_slice(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored)
    for k, f in enumerate(w["files"]):  # each slice its own slope and intercept
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = f"{1 + k}", f"{-10 * k}"
        _save(ds, Path(f))
    img = read_dicom_series(tmp_path)
    for k in range(stored.shape[2]):
        np.testing.assert_array_equal(img.volume.array[0, :, :, k], stored[:, :, k] * (1.0 + k) - 10.0 * k)


def test_reversed_order_on_disk(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored, reverse_on_disk=True, slice_spacing=3.0)
    img = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(img.volume.array[0], stored)
    assert img.files == w["files"]
    _check_geometry(img, (1, 0, 0), (0, 1, 0), (0.8, 0.7), w["positions"])


def test_positions_decreasing_along_the_normal(tmp_path):
    """A series acquired head to feet: the slice stored first is the highest; the volume still goes up along n."""
    stored = _stored()
    pos = [np.array([-30.0, -20.0, 100.0 - 2.0 * k]) for k in range(stored.shape[2])]
    write_series(tmp_path, stored, positions=pos)
    img = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(img.volume.array[0], stored[:, :, ::-1])
    assert img.volume.affine[2, 2] == pytest.approx(2.0) and img.volume.affine[2, 3] == pytest.approx(88.0)
    _check_geometry(img, (1, 0, 0), (0, 1, 0), (0.8, 0.7), pos)


def test_list_of_files_and_single_folder_file(tmp_path):
    stored = _stored()
    w = write_series(tmp_path / "s", stored)
    img = read_dicom_series(list(reversed(w["files"])))
    np.testing.assert_array_equal(img.volume.array[0], stored)
    assert img.files == w["files"]


def test_nested_folders_and_non_dicom_files_ignored(tmp_path):
    stored = _stored()
    write_series(tmp_path / "a" / "b", stored)
    (tmp_path / "README").write_text("not a DICOM file\n")
    (tmp_path / "a" / "junk.dcm").write_bytes(b"\x00" * 300)
    (tmp_path / "a" / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM")  # truncated: not readable as DICOM
    series = find_series(tmp_path)
    assert len(series) == 1 and series[0].num_files == stored.shape[2] and series[0].modality == "CT"
    assert series[0].description == "synthetic" and len(series[0].files) == stored.shape[2]
    assert len(series.skipped) == 3
    img = read_dicom_series(tmp_path)
    assert img.skipped_files == 3
    np.testing.assert_array_equal(img.volume.array[0], stored)


def test_dicomdir_file_set(tmp_path):
    """A DICOM File-set (what a CD holds): the DICOMDIR is skipped, the images under it are read."""
    from pydicom.fileset import FileSet

    stored = _stored()
    w = write_series(tmp_path / "src", stored)
    fs = FileSet()
    for f in w["files"]:
        fs.add(f)
    fs.write(tmp_path / "cd")
    series = find_series(tmp_path / "cd")
    assert [Path(p).name for p in series.skipped] == ["DICOMDIR"]
    assert len(series) == 1 and series[0].uid == w["uid"]
    img = read_dicom_series(tmp_path / "cd")
    np.testing.assert_array_equal(img.volume.array[0], stored)
    _check_geometry(img, (1, 0, 0), (0, 1, 0), (0.8, 0.7), w["positions"])


def test_two_series_in_one_folder(tmp_path):
    a, b = _stored(seed=1), _stored((4, 4, 3), seed=2)
    wa = write_series(tmp_path, a, description="AX soft tissue", prefix="A")
    wb = write_series(tmp_path, b, description="AX bone", prefix="B", slice_spacing=1.0)
    with pytest.raises(VolumeError) as ei:
        read_dicom_series(tmp_path)
    msg = str(ei.value)
    assert "2 image series" in msg and "--series UID" in msg and "\n" not in msg
    for uid, desc, n in [(wa["uid"], "AX soft tissue", 7), (wb["uid"], "AX bone", 3)]:
        assert uid in msg and desc in msg and f"{n} slices" in msg
    assert "CT" in msg
    img = read_dicom_series(tmp_path, series_uid=wb["uid"])
    np.testing.assert_array_equal(img.volume.array[0], b)
    assert img.series_uid == wb["uid"]
    assert {s.uid for s in find_series(tmp_path)} == {wa["uid"], wb["uid"]}
    with pytest.raises(VolumeError, match="not found") as ei:
        read_dicom_series(tmp_path, series_uid="1.2.3.4")
    assert wa["uid"] in str(ei.value) and wb["uid"] in str(ei.value)


def test_non_image_series_beside_the_images_is_not_a_choice(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored)
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.SeriesInstanceUID, sr.Modality = generate_uid(), "SR"
    _save(sr, tmp_path / "report.dcm")
    series = find_series(tmp_path)
    assert sorted(s.is_image for s in series) == [False, True]
    assert read_dicom_series(tmp_path).series_uid == w["uid"]
    sr_uid = next(x.uid for x in series if not x.is_image)
    with pytest.raises(VolumeError, match="SR.* is not an image series"):
        read_dicom_series(tmp_path, series_uid=sr_uid)


# ---- refusals -----------------------------------------------------------------------------------------------------
def test_gantry_tilt_refused(tmp_path):
    stored = _stored()
    tilt = np.radians(12.0)
    pos = [np.array([-30.0, -20.0 + k * 2.0 * np.tan(tilt), 15.0 + 2.0 * k]) for k in range(stored.shape[2])]
    write_series(tmp_path, stored, positions=pos)
    with pytest.raises(VolumeError, match=r"gantry tilt of 12 degrees"):
        read_dicom_series(tmp_path)


def test_tiny_position_rounding_is_not_tilt(tmp_path):
    stored = _stored()
    rng = np.random.default_rng(3)
    pos = [np.array([-30.0, -20.0, 15.0 + 2.0 * k]) + rng.uniform(-0.004, 0.004, 3) for k in range(7)]
    write_series(tmp_path, stored, positions=pos)
    img = read_dicom_series(tmp_path)
    np.testing.assert_allclose(img.volume.spacing[2], 2.0, atol=0.01)


def test_missing_slice_refused(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored)
    Path(w["files"][3]).unlink()
    with pytest.raises(VolumeError, match=r"missing slice.*2\.5 mm.*5 mm.*between slices 2 and 3") as ei:
        read_dicom_series(tmp_path)
    assert w["files"][2] in str(ei.value) and w["files"][4] in str(ei.value)


def test_non_uniform_spacing_refused(tmp_path):
    stored = _stored()
    z = [0, 2, 4, 6, 8.3, 10.3, 12.3]
    write_series(tmp_path, stored, positions=[np.array([0.0, 0.0, v]) for v in z])
    with pytest.raises(VolumeError, match="non-uniform slice spacing.*from 2 mm.*to 2.3 mm"):
        read_dicom_series(tmp_path)


def test_duplicate_slice_refused(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored)
    pos = w["positions"][2]
    extra = write_series(tmp_path / "x", stored[:, :, 2:3], positions=[pos], series_uid=w["uid"], prefix="DUP")
    with pytest.raises(VolumeError, match="two slices at the same position") as ei:
        read_dicom_series(tmp_path)
    msg = str(ei.value)
    assert w["files"][2] in msg and extra["files"][0] in msg


def test_different_orientation_refused(tmp_path):
    stored = _stored()
    w = write_series(tmp_path, stored)
    ds = pydicom.dcmread(w["files"][4])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    _save(ds, Path(w["files"][4]))
    with pytest.raises(VolumeError, match="different ImageOrientationPatient"):
        read_dicom_series(tmp_path)


def test_different_pixel_spacing_and_size_refused(tmp_path):
    stored = _stored()
    w = write_series(tmp_path / "a", stored)
    ds = pydicom.dcmread(w["files"][1])
    ds.PixelSpacing = [0.8, 0.75]
    _save(ds, Path(w["files"][1]))
    with pytest.raises(VolumeError, match="different PixelSpacing"):
        read_dicom_series(tmp_path / "a")
    w = write_series(tmp_path / "b", stored)
    small = write_series(tmp_path / "b" / "x", stored[:4, :, 5:6], positions=[np.array([0, 0, 99.0])],
                         series_uid=w["uid"], prefix="S")
    with pytest.raises(VolumeError, match="different sizes") as ei:
        read_dicom_series(tmp_path / "b")
    assert small["files"][0] in str(ei.value)


def test_colour_refused(tmp_path):
    w = write_series(tmp_path, _stored()[:, :, :2])
    ds = pydicom.dcmread(w["files"][1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    _save(ds, Path(w["files"][1]))
    with pytest.raises(VolumeError, match="colour image"):
        read_dicom_series(tmp_path)


def test_single_slice_refused(tmp_path):
    w = write_series(tmp_path, _stored()[:, :, :1])
    with pytest.raises(VolumeError, match="a single slice is not a 3-D volume"):
        read_dicom_series(w["files"][0])


def test_multi_frame_refused(tmp_path):
    w = write_series(tmp_path, _stored()[:, :, :2])
    ds = pydicom.dcmread(w["files"][0])
    ds.NumberOfFrames = 2
    _save(ds, Path(w["files"][0]))
    with pytest.raises(VolumeError, match="multi-frame"):
        read_dicom_series(tmp_path)


def _jpeg_lossless_decodable() -> bool:
    for mod in ("gdcm", "libjpeg"):  # python-gdcm, pylibjpeg-libjpeg: pydicom's JPEG Lossless decoders
        try:
            __import__(mod)
            return True
        except ImportError:
            pass
    return False


def test_compressed_without_decoder_is_a_volume_error(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    if _jpeg_lossless_decodable():
        pytest.skip("a JPEG Lossless decoder is installed")
    write_series(tmp_path, _stored(), transfer_syntax=JPEGLosslessSV1,
                 pixel_data=encapsulate([b"\xff\xd8" + b"\x00" * 62]))
    with pytest.raises(VolumeError, match="no decoder for its transfer syntax JPEG Lossless.*pip install pylibjpeg") \
            as ei:
        read_dicom_series(tmp_path)
    assert "\n" not in str(ei.value)


def test_corrupt_compressed_data_is_a_volume_error(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    write_series(tmp_path, _stored(), transfer_syntax=RLELossless,
                 pixel_data=encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60]))  # RLE: decoded by pydicom itself
    with pytest.raises(VolumeError, match="cannot decode the pixel data .*RLE Lossless.*corrupt") as ei:
        read_dicom_series(tmp_path)
    assert "\n" not in str(ei.value) and "pip install" not in str(ei.value)


def test_no_dicom_and_missing_paths(tmp_path):
    (tmp_path / "README").write_text("hello")
    with pytest.raises(VolumeError, match=r"no DICOM series found .*1 non-DICOM"):
        read_dicom_series(tmp_path)
    with pytest.raises(VolumeError, match="not found"):
        read_dicom_series(tmp_path / "nope")
    with pytest.raises(VolumeError, match="empty list"):
        find_series([])


def test_without_pydicom(monkeypatch, tmp_path):
    assert dicom_available()
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert not dicom_available()
    with pytest.raises(VolumeError, match=r"reading DICOM needs pydicom: pip install 'segrt\[dicom\]'"):
        read_dicom_series(tmp_path)
    with pytest.raises(VolumeError, match="needs pydicom"):
        dicomio.find_series(tmp_path)


# ---- against SimpleITK --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["axial", "oblique", "reversed", "thickness"])
def test_matches_simpleitk(tmp_path, case):
    sitk = pytest.importorskip("SimpleITK")
    stored = _stored((9, 8, 6))
    kw = {"axial": {}, "oblique": dict(zip("rc", _oblique_dirs()), pixel_spacing=(0.6, 1.3)),
          "reversed": {"reverse_on_disk": True}, "thickness": {"slice_thickness": 7.0, "slice_spacing": 1.5}}[case]
    w = write_series(tmp_path, stored, slope=0.5, intercept=-3, **kw)
    img = read_dicom_series(tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path), w["uid"]))
    ref = reader.Execute()
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    np.testing.assert_allclose(img.volume.affine, LPS_TO_RAS @ lps, atol=1e-4)
    ref_arr = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    np.testing.assert_allclose(img.volume.array[0], ref_arr, atol=1e-4)


def test_in_plane_geometry_matches_nibabel_nicom(tmp_path):
    """nibabel's DICOM wrapper (voxel order (row, column), i.e. ours transposed) gives the same in-plane axes and
    origin for the first slice; its slice axis lies along the same normal (nibabel points it the other way)."""
    import warnings

    dw = pytest.importorskip("nibabel.nicom.dicomwrappers")
    r, c = _oblique_dirs()
    write_series(tmp_path, _stored(), r=r, c=c, pixel_spacing=(0.9, 1.1), slice_spacing=1.3)
    img = read_dicom_series(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nib_lps = np.asarray(dw.wrapper_from_data(img.datasets[0]).affine, dtype=float)
    ours_lps = LPS_TO_RAS @ img.volume.affine
    np.testing.assert_allclose(nib_lps[:3, [1, 0, 3]], ours_lps[:3, [0, 1, 3]], atol=1e-5)
    cos = nib_lps[:3, 2] @ ours_lps[:3, 2] / np.linalg.norm(nib_lps[:3, 2]) / np.linalg.norm(ours_lps[:3, 2])
    assert abs(cos) == pytest.approx(1.0, abs=1e-6)
