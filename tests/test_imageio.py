"""Input/output format detection and dispatch (segrt/imageio.py)."""

from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from segrt.errors import OutputError, UsageError, VolumeError  # noqa: E402
from segrt.imageio import input_format, load_image, output_format, save_label_image  # noqa: E402
from segrt.volume import load_nifti  # noqa: E402

AFF = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -5.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("name, fmt", [
    ("a.nii", "nifti"), ("a.nii.gz", "nifti"), ("A.NII.GZ", "nifti"), ("b.nrrd", "nrrd"), ("b.NHDR", "nrrd"),
    ("x.seg.nrrd", "nrrd"), ("c.dcm", "dicom"), ("c.DICOM", "dicom"),
])
def test_input_format_by_extension(name, fmt):
    assert input_format(name) == fmt  # decided by the name: existence is the reader's business


def test_input_format_dicom_forms(tmp_path):
    assert input_format(tmp_path) == "dicom"
    assert input_format(str(tmp_path)) == "dicom"
    f = tmp_path / "IM0001"
    f.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert input_format(f) == "dicom"
    assert input_format([tmp_path / "1.dcm", tmp_path / "2.dcm"]) == "dicom"
    assert input_format((f, tmp_path / "2.dcm")) == "dicom"


def test_input_format_refusals(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_bytes(b"\0" * 200)
    with pytest.raises(VolumeError, match=r"\.nii\.gz.*\.nrrd.*directory"):
        input_format(other)
    with pytest.raises(VolumeError, match="not found"):
        input_format(tmp_path / "missing")
    with pytest.raises(VolumeError, match="one image per run"):
        input_format([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    with pytest.raises(VolumeError, match="one image per run"):
        input_format([tmp_path / "a.dcm", tmp_path / "b.nrrd"])
    with pytest.raises(VolumeError, match="empty list"):
        input_format([])
    with pytest.raises(VolumeError, match="expected an image path"):
        input_format(42)
    assert input_format([tmp_path / "a.nii.gz"]) == "nifti"  # a list of one image is that image


def test_load_image_nifti_and_nrrd_agree(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFF), str(tmp_path / "x.nii.gz"))
    lps = np.array([-1.0, -1.0, 1.0])
    nrrd.write(str(tmp_path / "x.nrrd"), data, {"space": "left-posterior-superior",
                                                "space directions": (lps[:, None] * AFF[:3, :3]).T,
                                                "space origin": lps * AFF[:3, 3]})
    a = load_image(tmp_path / "x.nii.gz")
    b = load_image(str(tmp_path / "x.nrrd"))
    c = load_image([tmp_path / "x.nrrd"])
    np.testing.assert_array_equal(a.array, load_nifti(tmp_path / "x.nii.gz").array)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_array_equal(b.array, c.array)
    with pytest.raises(UsageError, match="DICOM series"):
        load_image(tmp_path / "x.nii.gz", series="1.2.3")


def test_load_image_dicom_dispatch(tmp_path, monkeypatch):
    dicomio = pytest.importorskip("segrt.dicomio")
    seen = {}

    class Image:
        volume = "the volume"

    def fake(paths, series_uid=None):
        seen.update(paths=paths, series_uid=series_uid)
        return Image()

    monkeypatch.setattr(dicomio, "read_dicom_series", fake)
    assert load_image(tmp_path, series="1.2.3") == "the volume"
    assert seen == {"paths": tmp_path, "series_uid": "1.2.3"}
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    assert load_image(files) == "the volume" and seen["paths"] == files and seen["series_uid"] is None


@pytest.mark.parametrize("path, fmt, want", [
    ("o.nii.gz", None, "nifti"), ("o.NII", None, "nifti"), ("o.nrrd", None, "nrrd"), ("o.seg.nrrd", None, "nrrd"),
    ("o.dcm", None, "dicom-seg"), ("o.nrrd", "NRRD", "nrrd"), ("out", "nifti", "nifti"), ("o", "dicom-seg", "dicom-seg"),
])
def test_output_format(path, fmt, want):
    assert output_format(path, fmt) == want


def test_output_format_refusals():
    with pytest.raises(OutputError, match=r"nifti \(\.nii, \.nii\.gz\), nrrd \(\.nrrd\) or dicom-seg \(\.dcm\)"):
        output_format("o.mha")
    with pytest.raises(OutputError, match="unknown output format 'mha'"):
        output_format("o.nii.gz", "mha")
    with pytest.raises(OutputError, match="contradicts"):
        output_format("o.nii.gz", "nrrd")
    with pytest.raises(OutputError, match="expected"):
        output_format("o.nhdr")  # a detached pair cannot be written atomically


def test_save_label_image_dispatch(tmp_path):
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    out = save_label_image(labels, AFF, tmp_path / "s.nii.gz", descrip="segrt test")
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_allclose(img.affine, AFF, atol=1e-6)
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"segrt test"

    nrrd = pytest.importorskip("nrrd")
    out = save_label_image(labels, AFF, tmp_path / "s.seg.nrrd", class_names={2: "tumour"}, descrip="segrt test")
    got, h = nrrd.read(str(out))
    np.testing.assert_array_equal(got, labels)
    assert h["Segment0_Name"] == "tumour" and h["content"] == "segrt test"
    lps = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(h["space directions"], (lps[:, None] * AFF[:3, :3]).T)

    with pytest.raises(OutputError, match="DICOM-SEG"):
        save_label_image(labels, AFF, tmp_path / "s.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.nii.gz", "s.seg.nrrd"]
