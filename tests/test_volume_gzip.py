"""segrt.volume's fast gzip codecs (ISA-L / zlib-ng): same files and same images as nibabel + stdlib gzip."""

from __future__ import annotations

import dataclasses
import gzip
import os
import sys

import nibabel as nib
import numpy as np
import pytest

import segrt.gzipio as gz
from segrt.errors import VolumeError
from segrt.volume import Volume, load_nifti, save_labels, save_volume

FAST = [n for n in ("isal", "zlib-ng") if gz.load_codec(n) is not None]


class _Spy:
    """Delegates to a gzip-compatible module and records which entry points segrt used."""

    def __init__(self, module, wrap=None):
        self._module, self._wrap, self.calls, self.types = module, wrap, [], []

    def __getattr__(self, name):
        return getattr(self._module, name)

    def open(self, *a, **k):
        self.calls.append("open")
        f = self._module.open(*a, **k)
        self.types.append(type(f))
        return f

    def GzipFile(self, *a, **k):  # noqa: N802 - gzip's own name
        self.calls.append("GzipFile")
        gz = self._module.GzipFile(*a, **k)
        self.types.append(type(gz))
        return gz if self._wrap is None else self._wrap(gz)


@pytest.fixture
def use_codec(monkeypatch):
    """use_codec(name, wrap=None) -> the spy: segrt.volume then reads/writes through that codec."""

    def select(name, wrap=None):
        codec = gz.load_codec(name)
        if codec is None:
            pytest.skip(f"{name} is not installed")
        spy = _Spy(codec.module, wrap)
        monkeypatch.setattr(gz, "CODEC", [dataclasses.replace(codec, module=spy)])
        return spy

    return select


def _affine():  # exact in float32 (the header's precision), so affines compare exactly
    a = np.diag([-0.75, 0.875, 2.5, 1.0])
    a[:3, 3] = [100.5, -80.25, 40.0]
    return a


def _labels(rng, shape=(23, 19, 11)):
    lab = np.zeros(shape, np.uint8)
    lab[4:15, 3:12, 2:9] = 1
    lab[rng.random(shape) < 0.05] = 3
    return lab


def _same_header(a, b):
    assert type(a) is type(b)
    assert a.binaryblock == b.binaryblock  # every field, byte for byte
    assert [(e.get_code(), e.get_content()) for e in a.extensions] == \
        [(e.get_code(), e.get_content()) for e in b.extensions]


@pytest.mark.parametrize("name", FAST or ["isal"])
def test_fast_write_is_nibabels_bytes_in_a_standard_gzip(tmp_path, name, use_codec):
    rng = np.random.default_rng(0)
    lab = _labels(rng)
    like = Volume.from_array(rng.normal(size=lab.shape).astype(np.float32), _affine())
    like.header = nib.Nifti1Header()
    like.header.set_sform(_affine(), code=2)
    like.header.set_qform(_affine(), code=1)
    ref = save_labels(lab, _affine(), tmp_path / "ref.nii", like=like, descrip="segrt test")  # nibabel.save
    spy = use_codec(name)
    out = save_labels(lab, _affine(), tmp_path / "fast.nii.gz", like=like, descrip="segrt test")
    assert spy.calls == ["GzipFile"]
    assert issubclass(spy.types[0], gzip.GzipFile) and spy.types[0] is not gzip.GzipFile  # the codec's own
    blob = out.read_bytes()
    assert blob[:3] == b"\x1f\x8b\x08" and not blob[3] & 0x08, "gzip magic, deflate, no file name"
    assert blob[4:8] == b"\0\0\0\0", "mtime 0, like nibabel"
    assert gzip.decompress(blob) == ref.read_bytes()  # stdlib checks the CRC: same NIfTI bytes as nibabel's
    img = nib.load(str(out))  # nibabel + stdlib gzip
    assert np.array_equal(np.asanyarray(img.dataobj), lab) and img.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, _affine())
    _same_header(img.header, nib.load(str(ref)).header)
    assert img.header["descrip"].item() == b"segrt test"


@pytest.mark.parametrize("name", FAST or ["isal"])
def test_fast_write_then_stdlib_read_round_trip(tmp_path, name, use_codec):
    rng = np.random.default_rng(1)
    v = Volume(rng.normal(size=(2, 7, 6, 5)).astype(np.float32), _affine())
    use_codec(name)
    pv = save_volume(v, tmp_path / "v.nii.gz")
    pl = save_labels(_labels(rng).astype(np.uint16), _affine(), tmp_path / "l.nii.gz")
    use_codec("stdlib")
    back = load_nifti(pv)
    assert np.array_equal(back.array, v.array) and np.array_equal(back.affine, v.affine)
    img = nib.load(str(pl))
    assert img.get_data_dtype() == np.uint16 and np.array_equal(img.affine, _affine())


def _stdlib_files(tmp_path, rng):
    """Files written by nibabel.save (stdlib gzip): scaled int16, 4-D, a sform that MONAI replaces."""
    files = {}
    img = nib.Nifti1Image(rng.integers(-1000, 1000, (9, 8, 7)).astype(np.int16), _affine())
    img.header.set_slope_inter(0.5, -3.0)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment extension"))  # shifts vox_offset
    files["scaled"] = img
    files["4d"] = nib.Nifti1Image(rng.normal(size=(6, 5, 4, 3)).astype(np.float32), _affine())
    bad = nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), None)
    bad.header.set_qform(_affine(), code=1)
    bad.header.set_sform(np.diag([3.0, 3.0, 3.0, 1.0]), code=1)  # disagrees with pixdim: MONAI takes the qform
    bad.header.set_zooms((0.75, 0.875, 2.5))
    files["sform"] = bad
    paths = {}
    for k, im in files.items():
        paths[k] = tmp_path / f"{k}.nii.gz"
        nib.save(im, str(paths[k]))
    return paths


@pytest.mark.parametrize("name", FAST or ["isal"])
def test_stdlib_write_then_fast_read_is_identical(tmp_path, name, use_codec):
    paths = _stdlib_files(tmp_path, np.random.default_rng(2))
    use_codec("stdlib")
    ref = {k: load_nifti(p) for k, p in paths.items()}
    spy = use_codec(name)
    for k, p in paths.items():
        got = load_nifti(p)
        assert got.array.dtype == np.float32 and np.array_equal(got.array, ref[k].array), k
        assert np.array_equal(got.affine, ref[k].affine), k
        _same_header(got.header, ref[k].header)
        assert got.path == str(p)
    assert len(ref["scaled"].header.extensions) == 1 and nib.load(str(paths["scaled"])).dataobj.offset > 352
    assert spy.calls == ["open"] * len(paths)
    assert all(issubclass(t, gzip.GzipFile) and t is not gzip.GzipFile for t in spy.types)
    assert not np.allclose(ref["sform"].affine, np.diag([3.0, 3.0, 3.0, 1.0]))  # header correction happened


@pytest.mark.parametrize("name", FAST or ["isal"])
def test_fast_read_errors_are_the_standard_ones(tmp_path, name, use_codec):
    rng = np.random.default_rng(3)
    p = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(30, 30, 30)).astype(np.float32), np.eye(4)), str(p))
    cases = {"truncated.nii.gz": p.read_bytes()[: p.stat().st_size // 2],
             "garbage.nii.gz": b"\x1f\x8b garbage", "plain.nii.gz": b"not gzip at all" * 40,
             "empty.nii.gz": b""}
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped bit inside the deflate stream
    cases["flipped.nii.gz"] = bytes(blob)
    for fname, payload in cases.items():
        (tmp_path / fname).write_bytes(payload)
    messages = {}
    for codec in ("stdlib", name):
        use_codec(codec)
        for fname in cases:
            try:
                load_nifti(tmp_path / fname)
            except Exception as exc:  # noqa: BLE001 - compared across codecs below
                messages[codec, fname] = (type(exc), str(exc))
            else:
                messages[codec, fname] = None
    # flipped: nibabel alone would return the corrupted voxels (it stops reading before the gzip trailer)
    for fname in ("truncated.nii.gz", "garbage.nii.gz", "plain.nii.gz", "empty.nii.gz", "flipped.nii.gz"):
        assert messages["stdlib", fname] is not None and messages["stdlib", fname][0] is VolumeError, fname
        assert "cannot read" in messages["stdlib", fname][1]
    for fname in cases:
        assert messages[name, fname] == messages["stdlib", fname], fname


@pytest.mark.parametrize("name", FAST or ["isal"])
def test_fast_codec_leaves_nifti2_and_plain_nii_to_nibabel(tmp_path, name, use_codec, monkeypatch):
    rng = np.random.default_rng(4)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    p2 = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(arr, _affine()), str(p2))
    spy = use_codec(name)
    v = load_nifti(p2)  # sniffed as not NIfTI-1: read again by nib.load
    assert np.array_equal(v.array[0], arr) and isinstance(v.header, nib.Nifti2Header)
    assert spy.calls == ["open"]
    saved = []
    real_save = nib.save
    monkeypatch.setattr(nib, "save", lambda img, fn: (saved.append(fn), real_save(img, fn)))
    out = save_labels(np.ones((3, 3, 3), np.uint8), np.eye(4), tmp_path / "plain.nii")
    assert len(saved) == 1 and spy.calls == ["open"]  # plain .nii: nibabel.save, no codec
    assert out.read_bytes()[344:348] == b"n+1\0"


def test_fallback_to_stdlib_when_no_fast_codec_imports(tmp_path, monkeypatch):
    for mod in ("isal", "isal.igzip", "zlib_ng", "zlib_ng.gzip_ng"):
        monkeypatch.setitem(sys.modules, mod, None)  # 'import isal' now raises ImportError
    monkeypatch.setattr(gz, "CODEC", [])
    assert gz.load_codec("isal") is None and gz.load_codec("zlib-ng") is None
    codec = gz.gzip_codec()
    assert codec.name == "stdlib" and not codec.fast and codec.module is gzip
    saved = []
    real_save = nib.save
    monkeypatch.setattr(nib, "save", lambda img, fn: (saved.append(fn), real_save(img, fn)))
    lab = _labels(np.random.default_rng(5))
    out = save_labels(lab, _affine(), tmp_path / "l.nii.gz")
    assert len(saved) == 1 and saved[0] != str(out)  # written under a temporary name, then renamed
    back = load_nifti(out)
    assert np.array_equal(back.array[0], lab) and np.array_equal(back.affine, _affine())
    assert sorted(os.listdir(tmp_path)) == ["l.nii.gz"]


def test_codec_preference_order(monkeypatch):
    monkeypatch.setattr(gz, "CODEC", [])
    expected = FAST[0] if FAST else "stdlib"
    assert gz.gzip_codec().name == expected
    assert gz.gzip_codec() is gz.gzip_codec()  # chosen once
    if "zlib-ng" in FAST:
        monkeypatch.setitem(sys.modules, "isal", None)
        monkeypatch.setitem(sys.modules, "isal.igzip", None)
        monkeypatch.setattr(gz, "CODEC", [])
        assert gz.gzip_codec().name == "zlib-ng"
    with pytest.raises(ValueError, match="unknown gzip codec 'brotli'"):
        gz.load_codec("brotli")


class _DiskFull:
    """A gzip writer that accepts ``limit`` uncompressed bytes, writes them out, then fails."""

    def __init__(self, gz, limit=300, exc=None):
        self._gz, self._left, self._exc = gz, limit, exc or OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._gz, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._gz.__exit__(*exc)

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self._left:
            self._gz.write(data[: self._left])
            self._gz.flush()  # a partial gzip member reaches the disk
            raise self._exc
        self._left -= len(data)
        return self._gz.write(data)


@pytest.mark.parametrize("name", FAST or ["isal"])
@pytest.mark.parametrize("exc", [None, KeyboardInterrupt()])
def test_fast_write_failure_leaves_no_partial_file(tmp_path, name, exc, use_codec):
    target = tmp_path / "lab.nii.gz"
    target.write_bytes(b"previous result")
    spy = use_codec(name, wrap=lambda gz: _DiskFull(gz, exc=exc))
    lab = _labels(np.random.default_rng(6))
    if exc is None:
        with pytest.raises(VolumeError, match="No space left on device"):
            save_labels(lab, _affine(), target)
    else:
        with pytest.raises(KeyboardInterrupt):
            save_labels(lab, _affine(), target)
    assert spy.calls == ["GzipFile"]
    assert sorted(os.listdir(tmp_path)) == ["lab.nii.gz"]
    assert target.read_bytes() == b"previous result"
    use_codec(name)  # the same codec without the failure writes the file
    save_labels(lab, _affine(), target)
    assert np.array_equal(np.asanyarray(nib.load(str(target)).dataobj), lab)
    assert sorted(os.listdir(tmp_path)) == ["lab.nii.gz"]


def test_bench_io_smoke(capsys):
    """benchmarks/bench_io.py on a tiny volume: every codec's output round-trips (the script checks)."""
    from benchmarks import bench_io

    r = bench_io.run((16, 12, 6), 1, "numpy", log=lambda msg: None)
    assert set(r["decode_ct_s"]) == {"stdlib", *FAST}
    assert {(e["codec"], e["level"]) for e in r["encode_labels"]} >= {("stdlib", 1)}
    assert all(e["bytes"] > 0 for e in r["encode_labels"]) and r["ct_raw_bytes"] == 16 * 12 * 6 * 2 + 352
    rd = r["readers"]["median_s"]
    assert {"read_nifti_1thread", "read_nifti_default", "load_nifti_default", "old_gpu_host_input", "save_labels_C",
            "save_labels_F"} <= set(rd)
    assert all(v > 0 for v in rd.values())
    bench_io.print_table({"machine": {**bench_io.machine_info(), "loadavg_start": [0.0]}, "results": r})
    text = capsys.readouterr().out
    assert "save_labels" in text and "read_nifti_1thread" in text
