"""segrt batch: every good case written, bad ones recorded, resumable exactly once, interruptible, pool == run == Ray."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from parity_util import ct_like, lps_affine, write_volume
from segrt.cli import main

SHAPES = [(40, 36, 22), (44, 34, 20), (38, 40, 24), (42, 38, 18)]


def batch(*args) -> int:
    return main(["batch", *map(str, args)])


def _phantom(path: Path, i: int, seed: int | None = None) -> Path:
    return write_volume(path, ct_like(SHAPES[i % len(SHAPES)], seed=i if seed is None else seed),
                        lps_affine((1.6, 1.7, 3.2)))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """4 phantoms and one truncated .nii.gz, in one folder."""
    d = tmp_path_factory.mktemp("scans")
    for i in range(4):
        _phantom(d / f"case{i}.nii.gz", i)
    data = (d / "case0.nii.gz").read_bytes()
    (d / "corrupt.nii.gz").write_bytes(data[: len(data) // 2])
    return d


def _labels(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def _errors(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "errors.jsonl").read_text().splitlines() if ln.strip()]


def _temps(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def first_run(small_artifact, scans, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    rc = batch(small_artifact, scans, "-o", out, "-q", "--device", "cpu")
    return rc, out


def test_good_cases_written_bad_one_recorded(first_run, small_artifact, scans):
    rc, out = first_run
    assert rc == 1  # one case failed
    for i in range(4):
        assert (out / f"case{i}.nii.gz").is_file()
        side = json.loads((out / f"case{i}.nii.gz.segrt.json").read_text())
        assert side["status"] == "ok" and side["windows"] >= 1 and side["seconds"] > 0
        from segrt.batch import artifact_sha256, input_sha256

        assert side["input_sha256"] == input_sha256(str(scans / f"case{i}.nii.gz"))
        assert side["artifact_sha256"] == artifact_sha256(small_artifact)
    assert not (out / "corrupt.nii.gz").exists() and not (out / "corrupt.nii.gz.segrt.json").exists()
    errs = _errors(out)
    assert len(errs) == 1 and errs[0]["case"] == "corrupt" and errs[0]["message"]
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {**{f"case{i}": "ok" for i in range(4)}, "corrupt": "failed"}
    assert rows["corrupt"]["error"]
    assert not _temps(out)


def test_labels_equal_segrt_run(first_run, small_artifact, scans, tmp_path):
    _, out = first_run
    ref = tmp_path / "ref.nii.gz"
    r = subprocess.run([sys.executable, "-m", "segrt.cli", "run", str(small_artifact), str(scans / "case1.nii.gz"),
                        "-o", str(ref), "-q", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(_labels(ref), _labels(out / "case1.nii.gz"))
    img, src = nib.load(str(out / "case1.nii.gz")), nib.load(str(scans / "case1.nii.gz"))
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)


def test_workers_2_same_labels(first_run, small_artifact, scans, tmp_path, capsys):
    _, out = first_run
    out2 = tmp_path / "out2"
    capsys.readouterr()
    rc = batch(small_artifact, *[scans / f"case{i}.nii.gz" for i in range(4)], "-o", out2, "--json",
               "--workers", "2", "--device", "cpu")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["cases"], summary["ok"], summary["failed"], summary["skipped"]) == (4, 4, 0, 0)
    for i in range(4):
        assert np.array_equal(_labels(out2 / f"case{i}.nii.gz"), _labels(out / f"case{i}.nii.gz"))
    assert {r["status"] for r in _summary(out2).values()} == {"ok"}
    assert _errors(out2) == []


def test_rerun_skips_done_and_redoes_changed(small_artifact, scans, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"s{i}.nii.gz").write_bytes((scans / f"case{i}.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert batch(small_artifact, src, "-o", out, "-q", "--device", "cpu") == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("s[0-9]*")}
    assert len(mtimes) == 6
    time.sleep(0.05)
    assert batch(small_artifact, src, "-o", out, "-q", "--device", "cpu") == 0
    assert {r["status"] for r in _summary(out).values()} == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("s[0-9]*")} == mtimes
    _phantom(src / "s1.nii.gz", 1, seed=99)  # changed content: only this case is redone
    assert batch(small_artifact, src, "-o", out, "-q", "--device", "cpu") == 0
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {"s0": "skipped", "s1": "ok", "s2": "skipped"}
    new = {p.name: p.stat().st_mtime_ns for p in out.glob("s[0-9]*")}
    assert new["s0.nii.gz"] == mtimes["s0.nii.gz"] and new["s2.nii.gz"] == mtimes["s2.nii.gz"]
    assert new["s1.nii.gz"] != mtimes["s1.nii.gz"]
    (out / "s2.nii.gz").write_bytes(b"edited")  # an output edited since: redone, not trusted
    (out / "s0.nii.gz.segrt.json").unlink()  # an output without its sidecar: redone
    assert batch(small_artifact, src, "-o", out, "-q", "--device", "cpu") == 0
    assert {k: r["status"] for k, r in _summary(out).items()} == {"s0": "ok", "s1": "skipped", "s2": "ok"}
    (src / "s0.nii.gz").write_bytes(b"not a nifti any more")  # fails now: its older output is no longer 'done'
    assert batch(small_artifact, src, "-o", out, "-q", "--device", "cpu") == 1
    assert not (out / "s0.nii.gz.segrt.json").exists() and _summary(out)["s0"]["status"] == "failed"


def test_csv_and_txt_lists(small_artifact, scans, tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text(f"input,output\n{scans / 'case0.nii.gz'},alpha\n{scans / 'case2.nii.gz'},beta.nrrd\n"
                   f"{scans / 'case3.nii.gz'},\n")
    (tmp_path / "more.txt").write_text("# relative to the list's folder\nsub/case1.nii.gz\n\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "case1.nii.gz").write_bytes((scans / "case1.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert batch(small_artifact, lst, tmp_path / "more.txt", "-o", out, "-q", "--device", "cpu") == 0
    for name in ("alpha.nii.gz", "beta.nrrd", "case3.nii.gz", "case1.nii.gz"):
        assert (out / name).is_file() and (out / (name + ".segrt.json")).is_file(), name
    assert set(_summary(out)) == {"alpha", "beta", "case3", "case1"}


def test_usage_errors(small_artifact, scans, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "ct.nii.gz").write_bytes((scans / "case0.nii.gz").read_bytes())
    assert batch(small_artifact, tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("segrt: error:") == 1 and "ct.nii.gz" in err and "a/ct.nii.gz" in err and "b/ct.nii.gz" in err
    assert batch(small_artifact, tmp_path / "nope.nii.gz", "-o", tmp_path / "out") == 2
    assert "nope.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sigterm_leaves_no_partial_file_and_rerun_completes_the_rest(small_artifact, scans, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    n = 8
    for i in range(n):
        _phantom(src / f"c{i}.nii.gz", i, seed=10 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "segrt.cli", "batch", str(small_artifact), str(src), "-o", str(out), "-q",
           "--device", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if out.exists() and list(out.glob("*.segrt.json")):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=240)
    done = sorted(p.name for p in out.glob("*.segrt.json"))
    assert done, err
    if len(done) < n:
        assert p.returncode == 128 + signal.SIGTERM, err
    assert not _temps(out), _temps(out)
    outputs = sorted(x.name for x in out.glob("c*.nii.gz"))
    assert [o + ".segrt.json" for o in outputs] == done  # every output is complete (it has its sidecar)
    assert {r["status"] for r in _summary(out).values()} <= {"ok", "pending"}
    assert batch(small_artifact, src, "-o", out, "-q", "--device", "cpu") == 0
    statuses = [r["status"] for r in _summary(out).values()]
    assert statuses.count("skipped") == len(done) and statuses.count("ok") == n - len(done)


# ---- Ray ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_local_same_outputs_one_error(local_ray, first_run, small_artifact, scans, tmp_path):
    _, out = first_run
    out3 = tmp_path / "ray"
    rc = batch(small_artifact, scans, "-o", out3, "-q", "--ray", "local", "--workers", "2", "--threads", "1",
               "--device", "cpu")
    assert rc == 1
    for i in range(4):
        assert np.array_equal(_labels(out3 / f"case{i}.nii.gz"), _labels(out / f"case{i}.nii.gz"))
    errs = _errors(out3)
    assert len(errs) == 1 and errs[0]["case"] == "corrupt"
    assert not _temps(out3)
    assert batch(small_artifact, scans, "-o", out3, "-q", "--ray", "local", "--workers", "2", "--threads", "1",
                 "--device", "cpu") == 1
    assert [r["status"] for r in _summary(out3).values()].count("skipped") == 4


def test_ray_missing_is_a_usage_error(small_artifact, scans, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert batch(small_artifact, scans, "-o", tmp_path / "o", "--ray", "local") == 2
    assert "pip install 'segrt[ray]'" in capsys.readouterr().err


def test_dicom_folder_is_one_case(small_artifact, scans, tmp_path):
    pytest.importorskip("pydicom")
    from test_dicom_input import write_series

    from segrt.engine.engine import Engine

    root = tmp_path / "in"
    stored = np.clip(np.round(ct_like((30, 28, 12), seed=5) + 1024), 0, 4000).astype(np.int16)
    write_series(root / "patientA" / "series1", stored, pixel_spacing=(1.9, 2.1), slice_spacing=3.1,
                 intercept=-1024.0)
    (root / "case0.nii.gz").write_bytes((scans / "case0.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert batch(small_artifact, root, "-o", out, "-q", "--device", "cpu") == 0
    assert set(_summary(out)) == {"series1", "case0"}
    with Engine.load(small_artifact, device="cpu") as eng:
        ref = eng.segment(str(root / "patientA" / "series1"), progress=False).labels
    assert np.array_equal(_labels(out / "series1.nii.gz"), ref)
    assert batch(small_artifact, root, "-o", out, "-q", "--device", "cpu") == 0
    assert {r["status"] for r in _summary(out).values()} == {"skipped"}
