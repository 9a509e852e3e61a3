"""The hostile-input suite: malformed, hostile and odd inputs, outputs and artifacts, all made here from scratch.

Every case asserts what a user must be able to rely on: exit status 2, exactly one ``segrt: error:`` line naming the
problem (no traceback), no output file or temporary file left behind (an older output survives untouched), and the
input byte-identical afterwards. Most cases call ``segrt.cli.main`` in the test process (fast); the ones about
processes (file-size limits, SIGKILL, concurrent writers, a Python without torch) run ``python -m segrt.cli``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segrt.cli import main

ROI = 8
SPEC = {
    "in_channels": 1, "num_classes": 2, "class_names": {"0": "background", "1": "bright"},
    "preprocessing": {"orientation": "RAS", "spacing": {"pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
                      "intensity": [{"op": "scale_intensity_range", "a_min": -100, "a_max": 100, "b_min": 0,
                                     "b_max": 1, "clip": True}]},
    "inference": {"roi_size": [ROI] * 3, "sw_batch_size": 1, "overlap": [0.25] * 3, "blend_mode": "gaussian",
                  "sigma_scale": [0.125] * 3, "padding_mode": "constant", "cval": 0.0},
    "postprocessing": {"softmax": True, "order": "argmax_then_invert", "invert_interp": "nearest"},
}


# ---- fixtures ---------------------------------------------------------------------------------------------------
def _tiny_onnx(path: Path, roi=ROI) -> Path:
    """A 1x1x1 Conv3d, 1 → 2 channels: class 1 where the (scaled) intensity is above 0.5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([-1.0, 1.0], np.float32).reshape(2, 1, 1, 1, 1), "W")
    b = numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "W", "B"], ["output"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, roi, roi, roi])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2, roi, roi, roi])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(artifact dir, onnx source, spec file) of a tiny exported artifact."""
    from segrt.export import export

    d = tmp_path_factory.mktemp("tiny")
    src = _tiny_onnx(d / "tiny.onnx")
    spec = d / "spec.json"
    spec.write_text(json.dumps(SPEC))
    art = Path(export(src, d / "art", spec=str(spec)))
    return art, src, spec


def _ct(path: Path, shape=(20, 18, 12), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(-200, 200, size=shape).astype(np.int16)
    aff = np.diag([-1.5, -1.5, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, aff), str(path))
    return path


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    return d


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict:
    return {p.name: _digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error(err: str, *words) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("segrt: error:")]
    assert len(errors) == 1 and len(lines) == len(errors) + sum("warning" in ln for ln in lines), err
    for w in words:
        assert w.lower() in errors[0].lower(), (w, errors[0])
    return errors[0]


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def expect_refused(capsys, folder: Path, args, *words):
    """Run the CLI in-process; assert the error contract and that ``folder`` is byte-for-byte as before."""
    before = _snapshot(folder)
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (rc, out, err)
    line = _one_error(err, *words)
    assert _snapshot(folder) == before, "files in the working folder were created, changed or removed"
    return line


# ---- hostile NIfTI headers and payloads -------------------------------------------------------------------------
def _nifti_bytes(img) -> bytearray:
    bio = io.BytesIO()
    img.to_file_map(img.make_file_map({"image": bio, "header": bio}))
    return bytearray(bio.getvalue())


def _base(dtype=np.int16, shape=(12, 10, 8)):
    return nib.Nifti1Image((np.arange(np.prod(shape)).reshape(shape) % 100).astype(dtype), np.diag([1.5, 1.5, 2, 1]))


def _patched(fmt: str, offset: int, value, base=None) -> bytearray:
    b = _nifti_bytes(base if base is not None else _base())
    struct.pack_into("<" + fmt, b, offset, *(value if isinstance(value, tuple) else (value,)))
    return b


def _singular_sform():
    img = _base()
    aff = np.array([[1.5, 1.5, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], float)  # x and y collinear
    img.header.set_sform(aff, code=1)
    img.header.set_qform(aff, code=0)
    b = _nifti_bytes(img)
    # zooms as the sform's column norms, so that MONAI's header correction keeps the singular sform
    struct.pack_into("<3f", b, 80, 1.5, 1.5, 2.0)
    struct.pack_into("<8f", b, 280, *aff[:2].ravel())
    return b


def _nan_voxels():
    d = np.zeros((12, 10, 8), np.float32)
    d[3, 4, 5] = np.nan
    return _nifti_bytes(nib.Nifti1Image(d, np.diag([1.5, 1.5, 2, 1])))


HEADERS = {
    "dim0_is_8": (lambda: _patched("h", 40, 8), "dim[0]"),
    "dim0_is_0": (lambda: _patched("h", 40, 0), "dim[0]"),
    "unknown_datatype": (lambda: _patched("h", 70, 1234), "datatype code 1234"),
    "dims_10000_cubed": (lambda: _patched("4h", 40, (3, 10000, 10000, 10000)), "10000x10000x10000"),
    "negative_dim": (lambda: _patched("4h", 40, (3, -5, 10, 8)), "-5"),
    "zero_dim": (lambda: _patched("4h", 40, (3, 0, 10, 8)), "size 0"),
    "pixdim_zero": (lambda: _patched("f", 80, 0.0), "pixdim"),
    "pixdim_negative": (lambda: _patched("f", 84, -1.5), "pixdim"),
    "pixdim_nan": (lambda: _patched("f", 88, float("nan")), "pixdim"),
    "pixdim_inf": (lambda: _patched("f", 80, float("inf")), "pixdim"),
    "complex_voxels": (lambda: _nifti_bytes(_base(np.complex64)), "complex"),
    "rgb_voxels": (lambda: _nifti_bytes(nib.Nifti1Image(np.zeros((6, 6, 6), [("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                                         np.eye(4))), "rgb"),
    "six_dimensions": (lambda: _nifti_bytes(_base(shape=(6, 5, 4, 1, 1, 2))), "6-d"),
    "two_dimensions": (lambda: _nifti_bytes(_base(shape=(12, 10))), "2-d"),
    "two_channels": (lambda: _nifti_bytes(_base(shape=(12, 10, 8, 2))), "channel"),
    "bad_magic": (lambda: _patched("4s", 344, b"xx1\0"), "nifti"),
    "vox_offset_past_end": (lambda: _patched("f", 108, 1e6), "truncated"),
    "vox_offset_negative": (lambda: _patched("f", 108, -4.0), "vox_offset"),
    "sform_singular": (_singular_sform, "singular"),
    "sform_infinite": (lambda: _patched("f", 292, float("inf"), base=_base()), "affine"),
    "nan_voxels": (_nan_voxels, "nan"),
    "empty_file": (lambda: bytearray(), "cannot read"),
    "random_bytes": (lambda: bytearray(np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes()),
                     "cannot read"),
    "truncated_payload": (lambda: _nifti_bytes(_base())[:600], "truncated"),
}


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("case", sorted(HEADERS))
def test_hostile_input_image_is_refused(tiny, work, capsys, case, ext):
    make, word = HEADERS[case]
    data = bytes(make())
    if case == "sform_infinite":  # the sform code must be set for the sform to be used
        b = bytearray(data)
        struct.pack_into("<h", b, 254, 1)
        data = bytes(b)
    src = work / f"in{ext}"
    src.write_bytes(gzip.compress(data) if ext == ".nii.gz" and data else data)
    old = work / "labels.nii.gz"
    old.write_bytes(b"an older output that must survive")
    expect_refused(capsys, work, ["run", tiny[0], src, "-o", old, "--device", "cpu"], word)


@pytest.mark.parametrize("damage", ["flip_payload_byte", "flip_crc", "cut_trailer", "cut_half", "garbage_gzip"])
def test_corrupt_gzip_is_refused(tiny, work, capsys, damage):
    good = work / "good.nii.gz"
    _ct(good)
    b = bytearray(good.read_bytes())
    if damage == "flip_payload_byte":
        b[len(b) // 2] ^= 0x40
    elif damage == "flip_crc":
        b[-6] ^= 0xFF
    elif damage == "cut_trailer":
        b = b[:-8]
    elif damage == "cut_half":
        b = b[:len(b) // 2]
    else:
        b = bytearray(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    bad = work / "bad.nii.gz"
    bad.write_bytes(bytes(b))
    expect_refused(capsys, work, ["run", tiny[0], bad, "-o", work / "o.nii.gz", "--device", "cpu"], "bad.nii.gz")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_input_that_is_not_a_file(tiny, work, capsys, kind):
    src = work / "ct.nii.gz"
    if kind == "directory":
        src.mkdir()
    expect_refused(capsys, work, ["run", tiny[0], src, "-o", work / "o.nii.gz"], "ct.nii.gz")


# ---- outputs: never the input, checked before the model is loaded -----------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the engine loads the artifact: output problems must be found before that."""
    from segrt.engine import engine as eng

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(eng.Engine, "load", classmethod(refuse))


def _link(kind: str, ct: Path, work: Path) -> Path:
    if kind == "same_path":
        return ct
    if kind == "dot_path":
        return work / "." / ct.name
    if kind == "dotdot_path":
        return work / "sub" / ".." / ct.name
    if kind == "hard_link":
        os.link(ct, work / "hard.nii.gz")
        return work / "hard.nii.gz"
    if kind == "symlink":
        os.symlink(ct, work / "soft.nii.gz")
        return work / "soft.nii.gz"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["same_path", "dot_path", "dotdot_path", "hard_link", "symlink"])
def test_output_equal_to_input_is_refused(tiny, work, capsys, no_model_load, kind):
    ct = _ct(work / "ct.nii.gz")
    (work / "sub").mkdir()
    out = _link(kind, ct, work)
    expect_refused(capsys, work, ["run", tiny[0], ct, "-o", out], "input", "refusing")


def test_output_equal_to_input_is_refused_from_the_api(tiny, work):
    from segrt import Engine, OutputError

    ct = _ct(work / "ct.nii.gz")
    before = _digest(ct)
    with Engine.load(tiny[0], device="cpu") as eng:
        with pytest.raises(OutputError, match="input"):
            eng.segment(str(ct), output=ct)
        seg = eng.segment(str(ct))
        with pytest.raises(OutputError, match="input"):
            seg.save(ct)
    assert _digest(ct) == before


def _ro_dir(work: Path) -> Path:
    """A directory this process cannot create files in: chmod 555 for a normal user; as root (which ignores mode
    bits) /sys, where the kernel refuses new files."""
    if os.geteuid() != 0:
        d = work / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK) or os.path.isdir("/sys"):
        import tempfile

        try:
            fd, p = tempfile.mkstemp(dir="/sys")
        except OSError:
            return Path("/sys")
        os.close(fd)
        os.unlink(p)
    pytest.skip("no read-only directory available to this root process")


@pytest.mark.parametrize("kind,word", [
    ("missing_dir", "does not exist"), ("png", "extension"), ("no_extension", "extension"),
    ("long_name", "long"), ("is_directory", "directory"), ("read_only_dir", "writable"),
    ("empty", "empty"), ("artifact_manifest", "extension"), ("trailing_dot_gz", "extension"),
])
def test_bad_output_is_refused_before_the_model_loads(tiny, work, capsys, no_model_load, kind, word):
    ct = _ct(work / "ct.nii.gz")
    out = {
        "missing_dir": lambda: work / "missing_dir" / "x.nii.gz",
        "png": lambda: work / "preview.png",
        "no_extension": lambda: work / "labels",
        "long_name": lambda: work / ("x" * 300 + ".nii.gz"),
        "is_directory": lambda: (work / "d.nii.gz").mkdir() or work / "d.nii.gz",
        "read_only_dir": lambda: _ro_dir(work) / "x.nii.gz",
        "empty": lambda: "",
        "artifact_manifest": lambda: tiny[0] / "manifest.json",
        "trailing_dot_gz": lambda: work / ".gz",
    }[kind]()
    art_before = _snapshot(tiny[0])
    expect_refused(capsys, work, ["run", tiny[0], ct, "-o", out], word)
    assert _snapshot(tiny[0]) == art_before


def test_failed_run_keeps_the_old_output(tiny, work, capsys):
    ct = _ct(work / "ct.nii.gz")
    out = work / "labels.nii.gz"
    rc, _, err = run_cli(capsys, "run", tiny[0], ct, "-o", out, "--device", "cpu", "--quiet")
    assert rc == 0, err
    good = _digest(out)
    bad = work / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    expect_refused(capsys, work, ["run", tiny[0], bad, "-o", out], "bad.nii.gz")
    assert _digest(out) == good


def _segrt_proc(*args, **kw):
    return subprocess.run([sys.executable, "-m", "segrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def test_file_size_limit_leaves_nothing(tiny, work):
    ct = _ct(work / "ct.nii", shape=(60, 50, 40))
    out = work / "labels.nii"  # uncompressed: 120 kB of labels, over the 64 kB limit below
    before = _snapshot(work)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = _segrt_proc("run", tiny[0], ct, "-o", out, "--device", "cpu", "--quiet", preexec_fn=limit)
    assert r.returncode == 2, (r.returncode, r.stderr)
    _one_error(r.stderr, "labels.nii")
    assert _snapshot(work) == before


def test_sigkill_mid_run_leaves_no_output(tiny, work):
    ct = _ct(work / "ct.nii.gz", shape=(90, 80, 60))
    out = work / "labels.nii.gz"
    out.write_bytes(b"old")
    p = subprocess.Popen([sys.executable, "-m", "segrt.cli", "run", str(tiny[0]), str(ct), "-o", str(out),
                          "--device", "cpu", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:  # kill it once it writes, or while it runs
        if any(n.name.startswith(".labels") for n in work.iterdir()):
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert out.read_bytes() in (b"old",) or nib.load(str(out)).shape == (90, 80, 60)
    # a killed process may leave its hidden temporary file, never a partial file at the final name
    assert not [n for n in work.iterdir() if not n.name.startswith(".") and n.name not in ("ct.nii.gz",
                                                                                           "labels.nii.gz")]


def test_concurrent_writers_give_one_complete_result(tiny, work):
    ct = _ct(work / "ct.nii.gz", shape=(40, 36, 30))
    out = work / "labels.nii.gz"
    procs = [subprocess.Popen([sys.executable, "-m", "segrt.cli", "run", str(tiny[0]), str(ct), "-o", str(out),
                               "--device", "cpu", "--quiet", "--threads", "1"], stderr=subprocess.PIPE)
             for _ in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    img = nib.load(str(out))
    assert img.shape == (40, 36, 30)
    np.asanyarray(img.dataobj)  # complete and readable (gzip trailer checked by nibabel's reader of the whole)
    assert sorted(n.name for n in work.iterdir()) == ["ct.nii.gz", "labels.nii.gz"]


# ---- artifact containment and tampering -------------------------------------------------------------------------
@pytest.fixture
def art_copy(tiny, tmp_path):
    d = tmp_path / "artcopy"
    shutil.copytree(tiny[0], d)
    return d


def _edit_manifest(art: Path, fn) -> None:
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _secret(tmp_path: Path) -> tuple[Path, str]:
    s = tmp_path / "secret.onnx"
    s.write_bytes(b"top secret bytes")
    return s, hashlib.sha256(b"top secret bytes").hexdigest()


@pytest.mark.parametrize("path_kind", ["absolute", "dotdot", "nested_dotdot", "non_normalised", "backslash",
                                       "empty", "not_a_string", "dot"])
def test_manifest_paths_outside_the_artifact_are_refused(art_copy, tmp_path, work, capsys, path_kind):
    secret, digest = _secret(tmp_path)
    rel = {
        "absolute": str(secret), "dotdot": "../secret.onnx", "nested_dotdot": "sub/../../secret.onnx",
        "non_normalised": "./model_fp32.onnx", "backslash": "..\\secret.onnx", "empty": "", "not_a_string": 7,
        "dot": ".",
    }[path_kind]

    def edit(m):
        m["models"]["fp32"]["path"] = rel
        m["models"]["fp32"]["sha256"] = digest

    _edit_manifest(art_copy, edit)
    ct = _ct(work / "ct.nii.gz")
    line = expect_refused(capsys, work, ["run", art_copy, ct, "-o", work / "o.nii.gz"], "artifact")
    assert digest not in line and "top secret" not in line  # nothing about the outside file leaks


def test_symlink_out_of_the_artifact_is_refused_even_with_a_matching_hash(art_copy, tmp_path, work, capsys):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(art_copy / "model_fp32.onnx", outside)  # a valid model, its hash matches the manifest
    (art_copy / "model_fp32.onnx").unlink()
    os.symlink(outside, art_copy / "model_fp32.onnx")
    ct = _ct(work / "ct.nii.gz")
    expect_refused(capsys, work, ["run", art_copy, ct, "-o", work / "o.nii.gz"], "outside")


def test_absolute_path_to_a_model_copy_with_matching_hash_is_refused(art_copy, tmp_path, work, capsys):
    outside = tmp_path / "copy.onnx"
    shutil.copyfile(art_copy / "model_fp32.onnx", outside)
    _edit_manifest(art_copy, lambda m: m["models"]["fp32"].__setitem__("path", str(outside)))
    ct = _ct(work / "ct.nii.gz")
    expect_refused(capsys, work, ["run", art_copy, ct, "-o", work / "o.nii.gz"], "not allowed")


def test_manifest_symlink_out_of_the_artifact_is_refused(art_copy, tmp_path, work, capsys):
    outside = tmp_path / "manifest.json"
    shutil.move(art_copy / "manifest.json", outside)
    os.symlink(outside, art_copy / "manifest.json")
    expect_refused(capsys, work, ["info", art_copy], "outside")


def test_onnx_external_data_in_an_artifact_is_refused(art_copy, tmp_path, work, capsys):
    import onnx

    from segrt.artifact import sha256_file

    (tmp_path / "w.bin").write_bytes(np.array([-1, 1, 0.5, -0.5], np.float32).tobytes())
    m = onnx.load(str(art_copy / "model_fp32.onnx"))
    for t in m.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", "../w.bin"), ("offset", "0"), ("length", "8")):
            e = t.external_data.add()
            e.key, e.value = k, v
    (art_copy / "model_fp32.onnx").write_bytes(m.SerializeToString())
    _edit_manifest(art_copy, lambda mf: mf["models"]["fp32"].__setitem__(
        "sha256", sha256_file(art_copy / "model_fp32.onnx")))
    ct = _ct(work / "ct.nii.gz")
    expect_refused(capsys, work, ["run", art_copy, ct, "-o", work / "o.nii.gz"], "external data")


def test_onnx_field_numbers_match_the_onnx_package():
    import onnx

    from segrt import onnxproto

    f = lambda msg, name: msg.DESCRIPTOR.fields_by_name[name].number  # noqa: E731
    assert onnxproto._CHILDREN["model"] == {f(onnx.ModelProto, "graph"): "graph",
                                            f(onnx.ModelProto, "functions"): "function"}
    assert onnxproto._CHILDREN["graph"] == {f(onnx.GraphProto, "node"): "node",
                                            f(onnx.GraphProto, "initializer"): "tensor",
                                            f(onnx.GraphProto, "sparse_initializer"): "sparse"}
    assert onnxproto._CHILDREN["attribute"] == {f(onnx.AttributeProto, n): k for n, k in (
        ("t", "tensor"), ("g", "graph"), ("tensors", "tensor"), ("graphs", "graph"), ("sparse_tensor", "sparse"),
        ("sparse_tensors", "sparse"))}
    assert f(onnx.TensorProto, "external_data") == 13 and f(onnx.TensorProto, "data_location") == 14
    assert f(onnx.FunctionProto, "node") == 7 and f(onnx.NodeProto, "attribute") == 5


@pytest.mark.parametrize("tamper,word", [
    ("flip_model_byte", "does not match its manifest hash"),
    ("manifest_not_json", "not valid json"),
    ("schema_version_99", "schema_version"),
    ("schema_other", "schema"),
    ("typo_models", "did you mean 'models'"),
    ("unknown_top_key", "unknown key"),
    ("missing_model", "missing"),
    ("roi_100000", "roi_size"),
    ("spec_typo_overlaps", "did you mean 'overlap'"),
    ("sha256_not_string", "sha256"),
    ("unknown_format", "format"),
    ("input_shape_channels", "channels"),
    ("manifest_is_list", "schema"),
    ("artifact_is_a_file", "not a directory"),
])
def test_tampered_artifact_is_refused(art_copy, work, capsys, tamper, word):
    m = art_copy / "manifest.json"
    if tamper == "flip_model_byte":
        p = art_copy / "model_fp32.onnx"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 1
        p.write_bytes(bytes(b))
    elif tamper == "manifest_not_json":
        m.write_text("{not json")
    elif tamper == "manifest_is_list":
        m.write_text("[1, 2]")
    elif tamper == "missing_model":
        (art_copy / "model_fp32.onnx").unlink()
    elif tamper == "artifact_is_a_file":
        shutil.rmtree(art_copy)
        art_copy.write_text("x")
    else:
        def edit(d):
            if tamper == "schema_version_99":
                d["schema_version"] = 99
            elif tamper == "schema_other":
                d["schema"] = "other.tool"
            elif tamper == "typo_models":
                d["model"] = d.pop("models")
            elif tamper == "unknown_top_key":
                d["payload"] = "x"
            elif tamper == "roi_100000":
                d["spec"]["inference"]["roi_size"] = [100000] * 3
                d["spec"]["inference"]["importance_profiles"] = None
            elif tamper == "spec_typo_overlaps":
                d["spec"]["inference"]["overlaps"] = d["spec"]["inference"].pop("overlap")
            elif tamper == "sha256_not_string":
                d["models"]["fp32"]["sha256"] = 1
            elif tamper == "unknown_format":
                d["models"]["fp32"]["format"] = "pickle"
            elif tamper == "input_shape_channels":
                d["models"]["fp32"]["input_shape"][1] = 3
        _edit_manifest(art_copy, edit)
    ct = _ct(work / "ct.nii.gz")
    expect_refused(capsys, work, ["run", art_copy, ct, "-o", work / "o.nii.gz", "--device", "cpu"], word)


# ---- specs, overrides and options -------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,word", [
    (lambda s: s.__setitem__("class_name", s.pop("class_names")), "did you mean 'class_names'"),
    (lambda s: s["inference"].__setitem__("overlaps", s["inference"].pop("overlap")), "did you mean 'overlap'"),
    (lambda s: s["postprocessing"].__setitem__("softmax", "false"), "softmax"),
    (lambda s: s["inference"].__setitem__("roi_size", [ROI, ROI]), "roi_size"),
    (lambda s: s["preprocessing"]["spacing"].__setitem__("pixdim", [0, 1, 1]), "pixdim"),
    (lambda s: s.__setitem__("num_classes", "2"), "num_classes"),
])
def test_spec_typos_fail_before_export(tiny, work, capsys, edit, word):
    spec = json.loads(json.dumps(SPEC))
    edit(spec)
    sp = work / "spec.json"
    sp.write_text(json.dumps(spec))
    expect_refused(capsys, work, ["export", tiny[1], "-o", work / "art", "--spec", sp], word)


def test_spec_roi_that_is_not_the_models_input_is_refused(tiny, work, capsys):
    spec = json.loads(json.dumps(SPEC))
    spec["inference"]["roi_size"] = [16, 16, 16]
    sp = work / "spec.json"
    sp.write_text(json.dumps(spec))
    expect_refused(capsys, work, ["export", tiny[1], "-o", work / "art", "--spec", sp], "roi_size")


def test_override_typo_is_an_error(work, capsys):
    pytest.importorskip("monai")
    from parity_util import FIXTURES

    expect_refused(capsys, work, ["export", FIXTURES / "bundles" / "wholebody_small", "-o", work / "art",
                                  "--random-init", "--override", "displayable_configs#hires=false"],
                   "displayable_configs#hires", "did you mean")


@pytest.mark.parametrize("case,word", [
    ("output_is_source", "source"), ("output_holds_source", "source"), ("output_is_a_file", "not a directory"),
    ("onnx_external_outside", "external data"), ("missing_parent", "does not exist"),
])
def test_export_output_hazards(tiny, work, capsys, case, word):
    src = work / "m.onnx"
    shutil.copyfile(tiny[1], src)
    out = work / "art"
    if case == "output_is_source":
        out = src
    elif case == "output_holds_source":
        out = work
    elif case == "output_is_a_file":
        out = work / "file"
        out.write_text("x")
    elif case == "missing_parent":
        out = work / "a" / "b" / "art"
    elif case == "onnx_external_outside":
        import onnx

        m = onnx.load(str(tiny[1]))
        t = m.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "8")):
            e = t.external_data.add()
            e.key, e.value = k, v
        src.write_bytes(m.SerializeToString())
    expect_refused(capsys, work, ["export", src, "-o", out, "--spec", tiny[2]], word)


@pytest.mark.parametrize("args,word", [
    (["--threads", "0"], "positive integer"), (["--threads", "-3"], "positive integer"),
    (["--threads", "many"], "positive integer"), (["--overlap", "1.5"], "overlap"),
    (["--gpu-batch", "0"], "positive integer"), (["--max-memory", "1K"], "budget"),
    (["--max-memory", "lots"], "size"), (["--device", "quantum"], "device"),
    (["--variant", "int3"], "variant"), (["--accum-dtype", "float8"], "accum-dtype"),
    (["--unknown-flag"], "unrecognized"),
])
def test_bad_options_are_one_line_errors(tiny, work, capsys, args, word):
    ct = _ct(work / "ct.nii.gz")
    expect_refused(capsys, work, ["run", tiny[0], ct, "-o", work / "o.nii.gz", *args], word)


def test_absurd_thread_count_is_reduced_with_a_warning(tiny, work, capsys, caplog):
    ct = _ct(work / "ct.nii.gz")
    rc, out, err = run_cli(capsys, "run", tiny[0], ct, "-o", work / "o.nii.gz", "--device", "cpu",
                           "--threads", "100000", "--json")
    assert rc == 0, err
    assert "100000 threads asked for" in caplog.text
    assert json.loads(out)["stitch_threads"] <= os.cpu_count()
    assert nib.load(str(work / "o.nii.gz")).shape == (20, 18, 12)


def test_verbose_error_shows_the_traceback_and_still_one_error_line(tiny, work, capsys):
    rc, _, err = run_cli(capsys, "run", tiny[0], work / "nope.nii.gz", "-o", work / "o.nii.gz", "-v")
    assert rc == 2
    assert "Traceback" in err and sum(ln.startswith("segrt: error:") for ln in err.splitlines()) == 1


def test_export_without_torch_names_the_extra(work, capsys, monkeypatch):
    from parity_util import FIXTURES

    for name in ("torch", "monai"):
        monkeypatch.setitem(sys.modules, name, None)  # as in a runtime-only install
    expect_refused(capsys, work, ["export", FIXTURES / "bundles" / "wholebody_small", "-o", work / "art",
                                  "--random-init"], "segrt[export]")
