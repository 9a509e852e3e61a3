"""CLI behaviour: run/info work, and every bad input gives one clear line, exit 2, no traceback, no output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from parity_util import ct_like, lps_affine, write_volume


def segrt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "segrt.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    return write_volume(d / "ct.nii.gz", ct_like((61, 47, 29), seed=1), lps_affine((1.6, 1.7, 3.2)))


def test_run_writes_labels_on_input_grid(small_artifact, ct, tmp_path):
    out = tmp_path / "labels.nii.gz"
    r = segrt("run", small_artifact, ct, "-o", out, "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary["timings"]) == {"load", "preprocess", "infer", "stitch", "invert", "write"}
    img, src = nib.load(str(out)), nib.load(str(ct))
    assert img.shape == src.shape
    assert np.allclose(img.affine, src.affine)
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["sform_code"]) == int(src.header["sform_code"])
    assert "RANDOM" in r.stderr or "random" in r.stderr.lower()


def test_info_prints_table(small_artifact):
    r = segrt("info", small_artifact)
    assert r.returncode == 0, r.stderr
    for word in ("orientation", "spacing", "gaussian", "replicate", "gate fp32", "classes", "RANDOM"):
        assert word in r.stdout, (word, r.stdout)


def _expect_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("segrt: error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w.lower() in r.stderr.lower(), (w, r.stderr)


def test_missing_input(small_artifact, tmp_path):
    out = tmp_path / "o.nii.gz"
    _expect_error(segrt("run", small_artifact, tmp_path / "nope.nii.gz", "-o", out), "nope.nii.gz")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_not_an_image(small_artifact, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    out = tmp_path / "o.nii.gz"
    _expect_error(segrt("run", small_artifact, bad, "-o", out), "bad.nii.gz")
    assert not out.exists()


@pytest.mark.parametrize("shape,word", [((40, 30), "2"), ((20, 20, 10, 3), "channel")])
def test_wrong_dimensionality(small_artifact, tmp_path, shape, word):
    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(p))
    out = tmp_path / "o.nii.gz"
    _expect_error(segrt("run", small_artifact, p, "-o", out), word)
    assert not out.exists()


def test_nan_voxels(small_artifact, tmp_path):
    a = ct_like((30, 30, 20))
    a[3, 4, 5] = np.nan
    a[1, 1, 1] = np.inf
    p = write_volume(tmp_path / "nan.nii.gz", a, np.eye(4))
    out = tmp_path / "o.nii.gz"
    _expect_error(segrt("run", small_artifact, p, "-o", out), "nan")
    assert not out.exists()


def test_missing_artifact(ct, tmp_path):
    _expect_error(segrt("run", tmp_path / "no_artifact", ct, "-o", tmp_path / "o.nii.gz"), "no_artifact")
    _expect_error(segrt("info", tmp_path), "manifest")


def test_tampered_artifact(small_artifact, ct, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(small_artifact, art)
    model = art / "model_fp32.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    out = tmp_path / "o.nii.gz"
    _expect_error(segrt("run", art, ct, "-o", out), "sha256")
    assert not out.exists()


def test_wrong_onnx_input_shape(small_artifact):
    from segrt.artifact import Artifact
    from segrt.engine.backends import OrtCpuBackend
    from segrt.errors import InferenceError

    be = OrtCpuBackend.from_artifact(Artifact.load(small_artifact))
    with pytest.raises(InferenceError, match=r"shape \(B, 1, 96, 96, 96\)"):
        be.infer(np.zeros((1, 1, 64, 96, 96), np.float32))
    with pytest.raises(InferenceError, match="shape"):
        be.infer(np.zeros((1, 2, 96, 96, 96), np.float32))


def test_no_partial_output_on_failure(small_artifact, ct, tmp_path, monkeypatch):
    """A crash while writing leaves neither the output nor a temporary file."""
    from segrt.engine.engine import Engine
    from segrt.errors import VolumeError

    eng = Engine.load(small_artifact, device="cpu")
    seg = eng.segment(ct, progress=False)

    def boom(img, filename, *a, **k):  # half-write the file, then fail
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (simulated)")

    import segrt.volume

    monkeypatch.setattr(segrt.volume, "_write_image", boom)  # nibabel.save's signature, any gzip codec
    with pytest.raises(VolumeError, match="disk full"):
        seg.save(tmp_path / "o.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-2", "four"])
def test_gpu_batch_must_be_positive(small_artifact, ct, tmp_path, value):
    out = tmp_path / "x.nii.gz"
    r = segrt("run", small_artifact, ct, "-o", out, "--gpu-batch", value)
    assert r.returncode == 2 and "expected a positive integer" in r.stderr and not out.exists()


def test_gpu_batch_torch_cuda_without_gpu_is_refused(small_artifact, ct, tmp_path):
    out = tmp_path / "x.nii.gz"
    r = segrt("run", small_artifact, ct, "-o", out, "--device", "torch-cuda", "--gpu-batch", "8")
    assert r.returncode == 2 and "torch" in r.stderr and "Traceback" not in r.stderr and not out.exists()
