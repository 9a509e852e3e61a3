"""segrt.dicomseg: DICOM-SEG written from a label map overlays its source series (geometry, frames, references),
the fast frame path equals highdicom's own output, errors are clear and a failed write leaves nothing."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from segrt import dicomseg  # noqa: E402
from segrt.dicomseg import write_dicom_seg  # noqa: E402
from segrt.errors import OutputError, UsageError  # noqa: E402

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
OBLIQUE = (0.8, 0.6, 0.0, -0.48, 0.64, 0.6)  # orthonormal rows: r.c = 0, |r| = |c| = 1
NAMES = {1: "liver", 2: "spleen", 3: "left kidney", 4: "absent organ", 6: "aorta"}  # 5 has no name


def make_series(cols=32, rows=24, nslices=10, orient=AXIAL, spacing=(0.7, 0.8, 2.5), descending=False):
    """Synthetic CT slices (with pixel data) in the labels' slice order; ``descending``: positions decrease
    along the normal (so highdicom's own sort is the reverse of this order)."""
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    r, c = np.array(orient[:3]), np.array(orient[3:])
    n = np.cross(r, c)
    rng = np.random.default_rng(1)
    out = []
    for z in range(nslices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "", "1"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, z + 1
        ds.ImageOrientationPatient = list(orient)
        k = (nslices - 1 - z) if descending else z
        ds.ImagePositionPatient = [float(v) for v in np.array([-20.0, 15.0, 40.0]) + n * spacing[2] * k]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing, column spacing
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = rng.integers(0, 2000, (rows, cols), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def make_labels(cols=32, rows=24, nslices=10):
    """(X, Y, Z) labels: classes 1, 2, 3, 5, 6 present on different slice ranges, 4 absent, some slices empty."""
    lab = np.zeros((cols, rows, nslices), np.uint8)
    x, y = np.ogrid[:cols, :rows]
    blob = ((x - cols * 0.4) / (cols * 0.3)) ** 2 + ((y - rows * 0.5) / (rows * 0.3)) ** 2 <= 1
    for z in range(1, nslices - 1):
        lab[:, :, z][blob] = 1
    lab[2:9, 3:7, 2:5] = 2
    lab[cols - 8:cols - 2, rows - 9:rows - 3, 4:8] = 3
    lab[cols - 3:, :2, 3] = 5
    lab[0, 0, 1:nslices - 1] = 6  # a one-voxel line
    return lab


def _frames_by_segment_and_slice(seg, srcs):
    """{(segment number, slice index): frame (rows, columns) bool} of a written BINARY/FRACTIONAL SEG."""
    uid_to_z = {ds.SOPInstanceUID: z for z, ds in enumerate(srcs)}
    pixels = seg.pixel_array
    if seg.NumberOfFrames == 1:
        pixels = pixels[None]
    out = {}
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        num = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = uid_to_z[ref]
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in srcs[z].ImagePositionPatient], abs=1e-4)
        assert (num, z) not in out
        out[(num, z)] = pixels[i] > 0
    return out


def _check_read_back(path, labels, srcs, names, classes):
    """The checks of the brief: segments, frames, pixels, references, geometry."""
    seg = hd.seg.segread(str(path))
    assert seg.Modality == "SEG"
    assert seg.number_of_segments == len(classes)
    assert [seg.get_segment_description(i + 1).SegmentLabel for i in range(len(classes))] == \
        [names.get(k, f"label_{k}") for k in classes]
    ds = pydicom.dcmread(str(path))
    assert ds.FrameOfReferenceUID == srcs[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == srcs[0].StudyInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == srcs[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {s.SOPInstanceUID for s in srcs}
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in srcs[0].ImageOrientationPatient])
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in srcs[0].PixelSpacing])
    assert (ds.Rows, ds.Columns) == (srcs[0].Rows, srcs[0].Columns)
    frames = _frames_by_segment_and_slice(ds, srcs)
    expected = {(num, z): labels[:, :, z].T == k
                for num, k in enumerate(classes, 1) for z in range(labels.shape[2]) if (labels[:, :, z] == k).any()}
    assert int(ds.NumberOfFrames) == len(expected) == len(frames)
    assert frames.keys() == expected.keys()
    for key, frame in expected.items():
        np.testing.assert_array_equal(frames[key], frame, err_msg=str(key))
    return ds


@pytest.mark.parametrize("orient", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_binary_read_back(tmp_path, orient, descending):
    srcs = make_series(orient=orient, descending=descending)
    labels = make_labels()
    out = write_dicom_seg(labels, srcs, tmp_path / "seg.dcm", NAMES)
    assert out == tmp_path / "seg.dcm" and out.is_file()
    ds = _check_read_back(out, labels, srcs, NAMES, [1, 2, 3, 5, 6])
    assert ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1
    assert ds.SeriesDescription == "segrt segmentation" and ds.Manufacturer == "segrt"
    for item in ds.SegmentSequence:
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.TrackingID == item.SegmentLabel and item.TrackingUID
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "segrt"
    assert len({item.TrackingUID for item in ds.SegmentSequence}) == 5
    assert os.listdir(tmp_path) == ["seg.dcm"]  # no temporary file left


def test_source_datasets_without_pixel_data(tmp_path):
    srcs = make_series()
    for ds in srcs:
        del ds.PixelData  # read with stop_before_pixels=True
    labels = make_labels()
    out = write_dicom_seg(labels, srcs, tmp_path / "seg.dcm", NAMES)
    _check_read_back(out, labels, srcs, NAMES, [1, 2, 3, 5, 6])


def test_sources_missing_type2_patient_and_study_attributes(tmp_path):
    """Anonymised series often lack PatientBirthDate, AccessionNumber...: the SEG is written with them empty, and the
    caller's datasets are left as they were."""
    srcs = make_series()
    for ds in srcs:
        for k in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
            delattr(ds, k)
    labels = make_labels()
    out = write_dicom_seg(labels, srcs, tmp_path / "seg.dcm", NAMES)
    _check_read_back(out, labels, srcs, NAMES, [1, 2, 3, 5, 6])
    assert all("PatientBirthDate" not in ds for ds in srcs)


_VOLATILE = {"SOPInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID", "ContentDate", "ContentTime",
             "SeriesDate", "SeriesTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime",
             "DimensionOrganizationUID", "TrackingUID", "PixelData"}


def _assert_same(a, b, where=""):
    ka = [e.keyword for e in a if e.keyword not in _VOLATILE]
    kb = [e.keyword for e in b if e.keyword not in _VOLATILE]
    assert ka == kb, where
    for key in ka:
        ea, eb = a[key], b[key]
        assert ea.VR == eb.VR, where + key
        if ea.VR == "SQ":
            assert len(ea.value) == len(eb.value), where + key
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value)):
                _assert_same(ia, ib, f"{where}{key}[{i}].")
        else:
            assert ea.value == eb.value, where + key


@pytest.mark.parametrize("seg_type", ["binary", "fractional"])
@pytest.mark.parametrize("size", [(32, 24), (33, 23)], ids=["aligned", "odd"])  # 33*23 pixels: frames share bytes
def test_fast_path_equals_highdicom(tmp_path, seg_type, size):
    srcs = make_series(*size, orient=OBLIQUE, descending=True)
    labels = make_labels(*size)
    fast = write_dicom_seg(labels, srcs, tmp_path / "fast.dcm", NAMES, seg_type=seg_type)
    ref = write_dicom_seg(labels, srcs, tmp_path / "ref.dcm", NAMES, seg_type=seg_type, fast=False)
    a, b = pydicom.dcmread(str(fast)), pydicom.dcmread(str(ref))
    _assert_same(a, b)
    bits = int(a.NumberOfFrames) * a.Rows * a.Columns * (1 if seg_type == "binary" else 8)
    n = (bits + 7) // 8
    assert len(a.PixelData) == n + n % 2
    if bits % 8:  # the unused bits of the last byte
        mask = (1 << (bits % 8)) - 1
        assert a.PixelData[:n - 1] == b.PixelData[:n - 1]
        assert a.PixelData[n - 1] & mask == b.PixelData[n - 1] & mask
    else:
        assert a.PixelData[:n] == b.PixelData[:n]
    if seg_type == "fractional":
        assert a.SegmentationType == "FRACTIONAL" and a.BitsAllocated == 8
        assert set(np.unique(a.pixel_array)) <= {0, 255}
        _check_read_back(fast, labels, srcs, NAMES, [1, 2, 3, 5, 6])


def test_fractional_flag(tmp_path):
    srcs, labels = make_series(), make_labels()
    ds = pydicom.dcmread(str(write_dicom_seg(labels, srcs, tmp_path / "s.dcm", NAMES, fractional=True)))
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    with pytest.raises(UsageError, match="choose one"):
        write_dicom_seg(labels, srcs, tmp_path / "t.dcm", NAMES, fractional=True, seg_type="labelmap")
    with pytest.raises(UsageError, match="seg_type"):
        write_dicom_seg(labels, srcs, tmp_path / "t.dcm", NAMES, seg_type="rle")


def test_single_segment(tmp_path):
    srcs, labels = make_series(), make_labels()
    out = write_dicom_seg(labels, srcs, tmp_path / "one.dcm", NAMES, labels_subset=[2])
    ds = pydicom.dcmread(str(out))
    assert ds.SegmentSequence[0].SegmentLabel == "spleen" and len(ds.SegmentSequence) == 1
    uid_to_z = {s.SOPInstanceUID: z for z, s in enumerate(srcs)}
    zs = [uid_to_z[i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
          for i in ds.PerFrameFunctionalGroupsSequence]
    assert sorted(zs) == [2, 3, 4]
    pixels = ds.pixel_array
    for i, z in enumerate(zs):
        np.testing.assert_array_equal(pixels[i] > 0, labels[:, :, z].T == 2)


def test_labels_subset(tmp_path):
    srcs, labels = make_series(), make_labels()
    out = write_dicom_seg(labels, srcs, tmp_path / "sub.dcm", NAMES, labels_subset=[3, 1, 4])
    _check_read_back(out, labels, srcs, NAMES, [1, 3])  # 4 is absent: no segment
    with pytest.raises(OutputError, match="no segment"):
        write_dicom_seg(labels, srcs, tmp_path / "none.dcm", NAMES, labels_subset=[4])
    with pytest.raises(UsageError, match="labels_subset"):
        write_dicom_seg(labels, srcs, tmp_path / "none.dcm", NAMES, labels_subset=["liver"])
    assert sorted(os.listdir(tmp_path)) == ["sub.dcm"]


def test_layouts_and_dtypes_agree(tmp_path):
    srcs, labels = make_series(), make_labels()
    a = write_dicom_seg(labels, srcs, tmp_path / "c.dcm", NAMES)
    b = write_dicom_seg(np.asfortranarray(labels.astype(np.uint16)), srcs, tmp_path / "f.dcm", NAMES)
    c = write_dicom_seg(labels.astype(np.int32)[:, :, :], srcs, tmp_path / "i.dcm", NAMES)
    pa, pb, pc = (pydicom.dcmread(str(p)).PixelData for p in (a, b, c))
    assert pa == pb == pc


def test_labelmap(tmp_path):
    if not hasattr(hd.seg.SegmentationTypeValues, "LABELMAP"):
        pytest.skip("highdicom < 0.23 has no LABELMAP segmentations")
    srcs, labels = make_series(orient=OBLIQUE), make_labels()
    out = write_dicom_seg(labels, srcs, tmp_path / "lm.dcm", NAMES, seg_type="labelmap", labels_subset=[1, 2, 3, 6])
    ds = pydicom.dcmread(str(out))
    assert ds.SegmentationType == "LABELMAP" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert ds.FrameOfReferenceUID == srcs[0].FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == srcs[0].SeriesInstanceUID
    segs = {int(i.SegmentNumber): i.SegmentLabel for i in ds.SegmentSequence}
    assert segs == {0: "Background", 1: "liver", 2: "spleen", 3: "left kidney", 6: "aorta"}
    expected = np.where(np.isin(labels, [1, 2, 3, 6]), labels, 0)
    uid_to_z = {s.SOPInstanceUID: z for z, s in enumerate(srcs)}
    pixels = ds.pixel_array
    seen = set()
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        z = uid_to_z[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(pixels[i], expected[:, :, z].T)
        seen.add(z)
    assert seen == {z for z in range(labels.shape[2]) if expected[:, :, z].any()}


def test_shape_mismatch_names_both_shapes(tmp_path):
    srcs, labels = make_series(), make_labels()
    with pytest.raises(OutputError, match=r"\(24, 32, 10\).*\(32, 24, 10\)"):
        write_dicom_seg(labels.transpose(1, 0, 2), srcs, tmp_path / "s.dcm", NAMES)
    with pytest.raises(OutputError, match=r"\(32, 24, 9\).*\(32, 24, 10\)"):
        write_dicom_seg(labels[:, :, :9], srcs, tmp_path / "s.dcm", NAMES)
    with pytest.raises(OutputError, match="3-D"):
        write_dicom_seg(labels[:, :, 0], srcs, tmp_path / "s.dcm", NAMES)
    with pytest.raises(OutputError, match="integer"):
        write_dicom_seg(labels.astype(np.float32), srcs, tmp_path / "s.dcm", NAMES)
    with pytest.raises(OutputError, match="0..65535"):
        write_dicom_seg(labels.astype(np.int16) - 1, srcs, tmp_path / "s.dcm", NAMES)
    with pytest.raises(OutputError, match="does not exist"):
        write_dicom_seg(labels, srcs, tmp_path / "missing" / "s.dcm", NAMES)
    with pytest.raises(OutputError, match="empty"):
        write_dicom_seg(labels, [], tmp_path / "s.dcm", NAMES)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage", ["header", "frames"])
@pytest.mark.parametrize("fast", [True, False])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, stage, fast):
    srcs, labels = make_series(), make_labels()
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"previous")

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    if stage == "header":
        monkeypatch.setattr(dicomseg, "_dcmwrite", boom)
    elif fast:
        monkeypatch.setattr(dicomseg._Tail, "write", boom)
    else:
        pytest.skip("highdicom alone writes no separate frames stage")
    with pytest.raises(OutputError, match="No space left"):
        write_dicom_seg(labels, srcs, target, NAMES, fast=fast)
    assert os.listdir(tmp_path) == ["seg.dcm"] and target.read_bytes() == b"previous"


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    srcs, labels = make_series(), make_labels()

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dicomseg._Tail, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_dicom_seg(labels, srcs, tmp_path / "seg.dcm", NAMES)
    assert os.listdir(tmp_path) == []


def test_without_highdicom(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    assert not dicomseg.dicomseg_available()
    with pytest.raises(OutputError, match=r"pip install 'segrt\[dicom\]'"):
        write_dicom_seg(make_labels(), make_series(), tmp_path / "s.dcm", NAMES)
    assert os.listdir(tmp_path) == []


def test_names_are_sanitised(tmp_path):
    srcs, labels = make_series(), make_labels()
    names = {1: "a\\b", 2: "x" * 80, 3: "tab\there"}
    ds = pydicom.dcmread(str(write_dicom_seg(labels, srcs, tmp_path / "n.dcm", names, labels_subset=[1, 2, 3])))
    assert [i.SegmentLabel for i in ds.SegmentSequence] == ["a/b", "x" * 64, "tab here"]


def test_unrecognised_layout_falls_back_to_highdicom(tmp_path, monkeypatch):
    srcs, labels = make_series(orient=OBLIQUE), make_labels()
    calls = []

    def not_recognised(*_a, **_k):
        calls.append(1)
        raise dicomseg._NotRecognised("test")

    monkeypatch.setattr(dicomseg, "_fast_frames", not_recognised)
    out = write_dicom_seg(labels, srcs, tmp_path / "seg.dcm", NAMES)
    assert calls == [1]
    _check_read_back(out, labels, srcs, NAMES, [1, 2, 3, 5, 6])


def test_many_classes_uint16(tmp_path):
    srcs = make_series(16, 16, 4)
    labels = np.arange(1, 16 * 16 * 4 + 1, dtype=np.uint16).reshape(16, 16, 4) % 300  # 0..299, 299 classes
    names = {k: f"c{k}" for k in range(1, 300)}
    out = write_dicom_seg(labels, srcs, tmp_path / "many.dcm", names)
    ds = _check_read_back(out, labels, srcs, names, list(range(1, 300)))
    assert len(ds.SegmentSequence) == 299


def test_with_dicomio_reader(tmp_path):
    """The series read by segrt.dicomio (headers only, sorted along the normal) is a valid source as it comes."""
    dicomio = pytest.importorskip("segrt.dicomio")
    srcs = make_series(orient=OBLIQUE, descending=True)
    folder = tmp_path / "series"
    folder.mkdir()
    for i in np.random.default_rng(0).permutation(len(srcs)):
        pydicom.dcmwrite(str(folder / f"im{i:03d}.dcm"), srcs[i], enforce_file_format=True)
    img = dicomio.read_dicom_series(folder)
    uid_to_z = {s.SOPInstanceUID: z for z, s in enumerate(srcs)}
    labels = make_labels()[:, :, [uid_to_z[ds.SOPInstanceUID] for ds in img.datasets]]  # the reader's order
    assert labels.shape == img.volume.array.shape[1:]
    out = write_dicom_seg(labels, img.datasets, tmp_path / "seg.dcm", NAMES)
    _check_read_back(out, labels, img.datasets, NAMES, [1, 2, 3, 5, 6])
