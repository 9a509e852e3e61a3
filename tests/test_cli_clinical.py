"""segrt run with clinical inputs and outputs (issue 11): a DICOM series (oblique, SliceThickness != the slice
spacing) segments exactly like the same image as NIfTI; DICOM-SEG, NRRD, --split, --stats, --labels, --preview; every
wrong combination is one ``segrt: error:`` line, exit 2, before the model loads."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
nrrd = pytest.importorskip("nrrd")

from parity_util import ct_like  # noqa: E402
from test_dicom_input import _oblique_dirs, write_series  # noqa: E402

from segrt.cli import main  # noqa: E402
from segrt.dicomio import read_dicom_series  # noqa: E402
from segrt.volume import save_volume  # noqa: E402

SHAPE = (41, 37, 19)  # X = columns, Y = rows, Z = slices


def run(capsys, *args):
    code = main(["run", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _error(code, err, *words):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("segrt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """An oblique CT series (int16 + intercept), and the same image as NIfTI built from what segrt reads."""
    d = tmp_path_factory.mktemp("dicom")
    hu = ct_like(SHAPE, seed=3)
    stored = np.clip(np.round(hu + 1024), 0, 4000).astype(np.int16)
    r, c = _oblique_dirs()
    w = write_series(d / "series", stored, r=r, c=c, pixel_spacing=(1.9, 2.1), slice_spacing=3.1,
                     slice_thickness=5.0, intercept=-1024.0, PatientBirthDate="", PatientSex="O",
                     AccessionNumber="", ReferringPhysicianName="")
    img = read_dicom_series(d / "series")
    nii = save_volume(img.volume, d / "same.nii.gz")
    return {"dir": d / "series", "files": w["files"], "uid": w["uid"], "image": img, "nifti": nii}


@pytest.fixture(scope="module")
def names(small_artifact):
    from segrt.artifact import Artifact

    return Artifact.load(small_artifact).spec.class_names


@pytest.fixture(scope="module")
def dicom_run(small_artifact, series, tmp_path_factory):
    """One DICOM-folder run writing NIfTI labels, JSON stats, a preview and split masks."""
    out = tmp_path_factory.mktemp("dicom_run")
    code = main(["run", str(small_artifact), str(series["dir"]), "-o", str(out / "labels.nii.gz"), "--device", "cpu",
                 "--stats", str(out / "stats.json"), "--preview", str(out / "preview.png"), "--split",
                 str(out / "split"), "--json", "-q"])
    assert code == 0
    return out


def test_dicom_equals_nifti(small_artifact, series, dicom_run, tmp_path, capsys):
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "n.nii.gz", "--device", "cpu", "-q")
    assert code == 0, err
    a = np.asarray(nib.load(str(dicom_run / "labels.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "n.nii.gz")).dataobj)
    assert a.shape == SHAPE and np.array_equal(a, b)
    assert np.allclose(nib.load(str(dicom_run / "labels.nii.gz")).affine, series["image"].volume.affine, atol=1e-4)
    assert len(np.unique(a)) >= 2  # something to write in the tests below


def test_stats_preview_split(dicom_run, names):
    labels = np.asarray(nib.load(str(dicom_run / "labels.nii.gz")).dataobj)
    present = [int(v) for v in np.unique(labels) if v != 0]
    stats = json.loads((dicom_run / "stats.json").read_text())
    text = json.dumps(stats)
    for k in present:
        assert names[k] in text
    png = (dicom_run / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(p.name for p in (dicom_run / "split").iterdir())
    assert len(files) == len(present) and all(f.endswith(".nii.gz") for f in files)
    for k in present:
        from segrt.engine.segmentation import split_file_name

        m = np.asarray(nib.load(str(dicom_run / "split" / f"{split_file_name(names[k], k)}.nii.gz")).dataobj)
        assert np.array_equal(m.astype(bool), labels == k)


def test_dicom_seg_out_with_labels(small_artifact, series, dicom_run, names, tmp_path, capsys):
    full = np.asarray(nib.load(str(dicom_run / "labels.nii.gz")).dataobj)
    present = [int(v) for v in np.unique(full) if v != 0]
    keep = present[:2]
    out = tmp_path / "seg.dcm"
    code, stdout, err = run(capsys, small_artifact, *series["files"], "-o", out, "--labels",
                            ",".join(names[k] for k in keep), "--device", "cpu", "--json",
                            "--stats", tmp_path / "s.csv")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["source_format"] == "dicom" and summary["stats"] == str(tmp_path / "s.csv")
    ds = pydicom.dcmread(str(out))
    assert ds.Modality == "SEG"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [names[k] for k in keep]
    frames = sum(int((full[:, :, z] == k).any()) for k in keep for z in range(SHAPE[2]))
    assert int(ds.NumberOfFrames) == frames
    src = {d.SOPInstanceUID for d in series["image"].datasets}
    refs = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in ds.PerFrameFunctionalGroupsSequence}
    assert refs <= src
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == len(keep)


def test_nrrd_in_and_out(small_artifact, series, dicom_run, tmp_path, capsys):
    vol = series["image"].volume
    lps = np.diag([-1.0, -1.0, 1.0])
    nrrd.write(str(tmp_path / "ct.nrrd"), vol.array[0], {
        "space": "left-posterior-superior", "space directions": (lps @ vol.affine[:3, :3]).T,
        "space origin": lps @ vol.affine[:3, 3]})
    code, _, err = run(capsys, small_artifact, tmp_path / "ct.nrrd", "-o", tmp_path / "l.nrrd", "--device", "cpu",
                       "-q", "--split", tmp_path / "split", "--format", "nrrd")
    assert code == 0, err
    data, header = nrrd.read(str(tmp_path / "l.nrrd"))
    assert np.array_equal(data, np.asarray(nib.load(str(dicom_run / "labels.nii.gz")).dataobj))
    assert all(p.name.endswith(".nrrd") for p in (tmp_path / "split").iterdir())


def test_unknown_label_name(small_artifact, series, tmp_path, capsys, names):
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "o.nii.gz", "--labels",
                       names[1][:-1] + "x")
    _error(code, err, names[1])
    assert not (tmp_path / "o.nii.gz").exists()


def test_dicom_seg_needs_dicom_input(small_artifact, series, tmp_path, capsys):
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "o.dcm")
    _error(code, err, "DICOM-SEG", "DICOM input")
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "o.nii.gz", "--format", "dicom-seg")
    _error(code, err, "contradicts")


def test_multi_series_folder_needs_series(small_artifact, series, tmp_path, capsys):
    d = tmp_path / "two"
    a = write_series(d, np.zeros((8, 8, 4), np.int16), description="AX soft", prefix="A")
    b = write_series(d, np.zeros((8, 8, 3), np.int16), description="AX bone", prefix="B")
    code, _, err = run(capsys, small_artifact, d, "-o", tmp_path / "o.nii.gz")
    _error(code, err, a["uid"], b["uid"], "--series")
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "o.nii.gz", "--series", a["uid"])
    _error(code, err, "DICOM")


def test_several_non_dicom_inputs(small_artifact, series, tmp_path, capsys):
    code, _, err = run(capsys, small_artifact, series["nifti"], series["nifti"], "-o", tmp_path / "o.nii.gz")
    _error(code, err, "one image per run")


def test_output_paths_checked_up_front(small_artifact, series, tmp_path, capsys):
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "o.nii.gz", "--stats",
                       tmp_path / "s.txt")
    _error(code, err, "statistics file")
    code, _, err = run(capsys, small_artifact, series["nifti"], "-o", tmp_path / "o.nii.gz", "--preview",
                       tmp_path / "nodir" / "p.png")
    _error(code, err, "preview")
    code, _, err = run(capsys, small_artifact, series["files"][0], "-o", series["files"][0])
    _error(code, err)
    assert not (tmp_path / "o.nii.gz").exists()
