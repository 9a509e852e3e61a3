"""gzip cost of file-to-file segmentation: decoding the input ``.nii.gz`` and encoding the label map.

    python benchmarks/bench_io.py                      # 512x512x397 int16 CT-like volume, 3 repeats
    python benchmarks/bench_io.py --shape 128 128 64   # quick look
    python benchmarks/bench_io.py --source phantom     # segrt.phantom.make_phantom (about a minute longer)

Codecs: the standard library's ``gzip`` (what nibabel uses), ISA-L (``isal.igzip``) and zlib-ng
(``zlib_ng.gzip_ng``), each where importable. Measured, median of ``--repeats`` runs, codecs interleaved:

* decode: ``module.decompress`` of the whole CT file as nibabel writes it (``nibabel.save``: zlib level 1);
  a streamed read of it (``module.open`` + ``readinto`` one buffer: what nibabel does, and what segrt does
  with a fast codec, so that no compressed or second uncompressed copy is held); and
  ``segrt.volume.load_nifti`` end to end with that codec (adds the float32 cast and finite check);
* encode: ``module.compress`` of the uint8 label volume's raw bytes at each level listed in ``LEVELS``
  (with the compressed size), and ``segrt.volume.save_labels`` end to end with that codec at segrt's level.

Readers (``results.readers``): ``segrt.volume.read_nifti`` single-threaded and with rapidgzip's parallel decoding
(2..N threads), ``load_nifti``, the GPU path's former host-side input work, and ``save_labels`` of C- and
Fortran-ordered labels (see :func:`run_readers`).

Every fast codec's label output is checked to decompress (standard library) to the same bytes.
Writes ``benchmarks/results/io_<date>.json`` and prints a table. Single-threaded throughout. The
end-to-end ``save_labels`` time also holds nibabel's serialisation (it gathers the C-ordered label
array slice by slice into NIfTI's Fortran order), which no codec changes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from segrt import gzipio as gz  # noqa: E402
from segrt import volume as sv  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
#: compression levels measured per codec (stdlib 1 = nibabel.save's default; ISA-L has 0-3 only)
LEVELS = {"stdlib": (1, 6), "isal": (0, 1, 2), "zlib-ng": (1, 2)}


def machine_info() -> dict:
    import zlib

    from benchmarks._machine import machine_info as base

    info = base(("numpy", "nibabel", "isal", "zlib-ng", "rapidgzip", "segrt"))
    info["versions"]["zlib_runtime"] = zlib.ZLIB_RUNTIME_VERSION
    info["loadavg_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def ct_like_int16(shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume (HU) and a uint8 label map of the same shape.

    Scanner-like: -1024 padding outside the reconstruction circle; inside it air, a body ellipse
    (fat rim, soft tissue, two lungs, spine, liver-like organ), white noise of 15 HU everywhere inside
    the circle (real scans are noisy in the air too), rounded to integers.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :]
    circle = x ** 2 + y ** 2 < 0.98
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1.0
    inner = (x / 0.74) ** 2 + (y / 0.54) ** 2 < 1.0
    lungs = ((np.abs(x) - 0.35) / 0.25) ** 2 + ((y + 0.05) / 0.35) ** 2 < 1.0
    spine = x ** 2 + ((y - 0.4) / 0.8) ** 2 < 0.01
    ct = np.empty(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    for k in range(nz):
        z = -1 + 2 * k / max(nz - 1, 1)
        sl = np.full((nx, ny), -1000.0, np.float32)
        sl[body] = -100.0
        sl[inner] = 40.0
        lab = np.zeros((nx, ny), np.uint8)
        lab[body] = 1
        if z > -0.2:
            sl[lungs & inner] = -850.0
            lab[lungs & inner] = 2
        liver = ((x + 0.3) / 0.3) ** 2 + ((y + 0.1) / 0.3) ** 2 + ((z + 0.4) / 0.3) ** 2 < 1.0
        sl[liver & inner] = 60.0
        lab[liver & inner] = 3
        sl[spine] = 700.0
        lab[spine] = 4
        sl += rng.standard_normal((nx, ny), dtype=np.float32) * 15.0
        sl[~circle] = -1024.0
        ct[:, :, k] = np.round(sl).astype(np.int16)
        labels[:, :, k] = lab
    return ct, labels


def _codecs() -> dict:
    out = {}
    for name in ("stdlib", "isal", "zlib-ng"):
        codec = gz.load_codec(name)
        if codec is not None:
            out[name] = codec
    return out


class _use_codec:
    """Make segrt.volume read/write through ``codec`` (segrt.gzipio caches its choice in ``CODEC``)."""

    def __init__(self, codec):
        self.codec = codec

    def __enter__(self):
        self.saved = list(gz.CODEC)
        gz.CODEC[:] = [self.codec]

    def __exit__(self, *exc):
        gz.CODEC[:] = self.saved


def _stream_read(codec, path: Path, n: int) -> None:
    buf = bytearray(n)
    with codec.module.open(str(path), "rb") as f:
        if f.readinto(buf) != n:
            raise RuntimeError(f"{codec.name}: short read of {path}")


class _Parallel:
    """Switch rapidgzip's parallel decoding on (at ``threads``) or off, and make it apply to any file size."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self):
        self.saved = (os.environ.get("SEGRT_PARALLEL_GZIP"), gz.PARALLEL_MIN_BYTES, gz.decode_threads)
        if self.threads == "default":  # segrt's own choice for this machine
            pass
        elif self.threads is None:
            os.environ["SEGRT_PARALLEL_GZIP"] = "0"
        else:
            os.environ["SEGRT_PARALLEL_GZIP"] = "1"
            gz.PARALLEL_MIN_BYTES = 0
            gz.decode_threads = lambda: self.threads
        return self

    def __exit__(self, *exc):
        env, gz.PARALLEL_MIN_BYTES, gz.decode_threads = self.saved
        if env is None:
            os.environ.pop("SEGRT_PARALLEL_GZIP", None)
        else:
            os.environ["SEGRT_PARALLEL_GZIP"] = env
        return False


def _old_device_input(path: Path):
    """What the GPU path did with a file before read_nifti: float32 Volume, finite check, C-order copy for
    the upload (the file's Fortran order transposed on the host)."""
    vol = sv.load_nifti(path)
    if not np.isfinite(vol.array).all():
        raise RuntimeError("non-finite")
    return np.ascontiguousarray(vol.array)


def run_readers(ct_path: Path, labels: np.ndarray, affine: np.ndarray, repeats: int, log) -> dict:
    """The readers and the writer of the file-to-file path, with segrt's codec choice (ISA-L first).

    ``read_nifti`` (voxels as stored: what the GPU path uploads) single-threaded and with rapidgzip on 2..N
    threads, and with segrt's default choice for this machine; ``load_nifti`` (MONAI's float32 Volume: what the CPU
    path uses); the GPU path's former host work (``load_nifti`` + finite check + C-order copy); ``save_labels`` of a C-ordered and of a Fortran-ordered label
    map (the GPU path returns Fortran order).
    """
    try:
        import rapidgzip  # noqa: F401

        have_rg = True
    except ImportError:
        have_rg = False
    ncpu = gz.decode_threads()
    thread_counts = sorted({t for t in (2, 4, 8, ncpu) if 2 <= t <= ncpu}) if have_rg else []
    cases = {"read_nifti_1thread": (None, lambda: sv.read_nifti(ct_path))}
    for t in thread_counts:
        cases[f"read_nifti_{t}threads"] = (t, lambda: sv.read_nifti(ct_path))
    cases["read_nifti_default"] = ("default", lambda: sv.read_nifti(ct_path))
    cases["load_nifti_default"] = ("default", lambda: sv.load_nifti(ct_path))
    cases["old_gpu_host_input"] = ("default", lambda: _old_device_input(ct_path))
    out = ct_path.parent / "readers_labels.nii.gz"
    lab_c = np.ascontiguousarray(labels)
    lab_f = np.asfortranarray(labels)
    cases["save_labels_C"] = (None, lambda: sv.save_labels(lab_c, affine, out))
    cases["save_labels_F"] = (None, lambda: sv.save_labels(lab_f, affine, out))
    times = {k: [] for k in cases}
    for rep in range(repeats):
        for name, (threads, fn) in (cases.items() if rep % 2 == 0 else reversed(cases.items())):
            with _Parallel(threads):
                times[name].append(_timed(fn))
        log(f"readers: repeat {rep + 1}/{repeats} done")
    ref = sv.load_nifti(ct_path).array
    for t in thread_counts:
        with _Parallel(t):
            if not np.array_equal(sv.read_nifti(ct_path).array.astype(np.float32), ref):
                raise RuntimeError(f"read_nifti with {t} threads differs from load_nifti")
    with _Parallel("default"):
        f = gz.open_parallel(ct_path) if have_rg else None
        default_parallel = f is not None
        if f is not None:
            f.close()
    return {"rapidgzip": have_rg, "thread_counts": [1] + thread_counts, "default_uses_rapidgzip": default_parallel,
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "runs_s": times}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(shape, repeats: int, source: str, log) -> dict:
    import nibabel as nib

    codecs = _codecs()
    log(f"codecs: {', '.join(f'{c.name} {c.version}' for c in codecs.values())}")
    spacing = (0.84, 0.84, 1.5)
    if source == "phantom":
        from segrt.phantom import make_phantom

        img, labels, affine, _ = make_phantom(shape, spacing)
        ct = np.round(img).astype(np.int16)
        labels = labels.astype(np.uint8)
        del img
    else:
        ct, labels = ct_like_int16(shape)
        affine = np.diag([*spacing, 1.0])
    log(f"volume {shape} int16 CT ({ct.nbytes / 2**20:.0f} MiB raw), uint8 labels ({labels.nbytes / 2**20:.0f} MiB)")

    work = Path(tempfile.mkdtemp(prefix="segrt_bench_io_"))
    try:
        ct_path = work / "ct.nii.gz"
        nib.save(nib.Nifti1Image(ct, affine), str(ct_path))  # nibabel's default: zlib level 1
        ct_gz = ct_path.read_bytes()
        ct_raw_len = len(gzip.decompress(ct_gz))
        raw_labels = np.asfortranarray(labels).tobytes(order="F")
        del ct

        t_decode = {n: [] for n in codecs}
        t_stream = {n: [] for n in codecs}
        t_load = {n: [] for n in codecs}
        t_encode = {(n, lv): [] for n in codecs for lv in LEVELS[n]}
        size_encode = {}
        t_save = {n: [] for n in codecs}
        size_save = {}
        for rep in range(repeats):
            order = list(codecs) if rep % 2 == 0 else list(reversed(codecs))
            for n in order:
                c = codecs[n]
                t_decode[n].append(_timed(lambda: c.module.decompress(ct_gz)))
                t_stream[n].append(_timed(lambda: _stream_read(c, ct_path, ct_raw_len)))
                with _use_codec(c):
                    t_load[n].append(_timed(lambda: sv.load_nifti(ct_path)))
                for lv in LEVELS[n]:
                    box = []
                    t_encode[(n, lv)].append(_timed(lambda: box.append(c.module.compress(raw_labels, lv, mtime=0))))
                    size_encode[(n, lv)] = len(box[0])
                    if rep == 0 and gzip.decompress(box[0]) != raw_labels:
                        raise RuntimeError(f"{n} level {lv}: output does not decompress to the input")
                out = work / f"labels_{n}.nii.gz"
                with _use_codec(c):
                    t_save[n].append(_timed(lambda: sv.save_labels(labels, affine, out)))
                size_save[n] = out.stat().st_size
                if rep == 0:
                    back = np.asanyarray(nib.load(str(out)).dataobj)  # nibabel + stdlib gzip
                    if not np.array_equal(back, labels):
                        raise RuntimeError(f"{n}: save_labels output differs when read back by nibabel")
            log(f"repeat {rep + 1}/{repeats} done")
        readers = run_readers(ct_path, labels, affine, repeats, log)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    med = statistics.median
    return {
        "shape": list(shape), "source": source, "repeats": repeats,
        "ct_gz_bytes": len(ct_gz), "ct_raw_bytes": ct_raw_len, "labels_raw_bytes": len(raw_labels),
        "codecs": {n: {"version": c.version, "segrt_level": c.level} for n, c in codecs.items()},
        "decode_ct_s": {n: med(v) for n, v in t_decode.items()},
        "stream_ct_s": {n: med(v) for n, v in t_stream.items()},
        "load_nifti_ct_s": {n: med(v) for n, v in t_load.items()},
        "encode_labels": [{"codec": n, "level": lv, "s": med(v), "bytes": size_encode[(n, lv)]}
                          for (n, lv), v in t_encode.items()],
        "save_labels_s": {n: med(v) for n, v in t_save.items()},
        "save_labels_bytes": size_save,
        "readers": readers,
        "all_runs": {"decode_ct_s": t_decode, "stream_ct_s": t_stream, "load_nifti_ct_s": t_load,
                     "save_labels_s": t_save, "encode_labels_s": {f"{n}@{lv}": v for (n, lv), v in t_encode.items()}},
    }


def print_table(report: dict, out=sys.stdout) -> None:
    m = report["machine"]
    r = report["results"]
    mib = 2 ** 20
    print(f"gzip I/O, {tuple(r['shape'])} ({r['source']}), median of {r['repeats']}; {m['cpu_model']}, "
          f"{m['cpus_allowed']} CPUs allowed, load avg {m['loadavg_start'][0]:.2f}", file=out)
    print(f"CT int16: {r['ct_raw_bytes'] / mib:.0f} MiB raw, {r['ct_gz_bytes'] / mib:.1f} MiB .nii.gz "
          f"(nibabel.save, zlib level 1)", file=out)
    base = {k: r[k]["stdlib"] for k in ("decode_ct_s", "stream_ct_s", "load_nifti_ct_s")}
    print(f"{'decode CT':<12}{'decompress s':>14}{'speed-up':>10}{'streamed s':>12}{'speed-up':>10}"
          f"{'load_nifti s':>14}{'speed-up':>10}", file=out)
    for n in r["decode_ct_s"]:
        d, st, ld = r["decode_ct_s"][n], r["stream_ct_s"][n], r["load_nifti_ct_s"][n]
        print(f"{n:<12}{d:>14.3f}{base['decode_ct_s'] / d:>9.2f}x{st:>12.3f}{base['stream_ct_s'] / st:>9.2f}x"
              f"{ld:>14.3f}{base['load_nifti_ct_s'] / ld:>9.2f}x", file=out)
    print(f"labels uint8: {r['labels_raw_bytes'] / mib:.0f} MiB raw", file=out)
    base_e = next(e["s"] for e in r["encode_labels"] if e["codec"] == "stdlib" and e["level"] == 1)
    print(f"{'encode':<12}{'level':>6}{'compress s':>12}{'speed-up':>10}{'MiB':>9}", file=out)
    for e in r["encode_labels"]:
        print(f"{e['codec']:<12}{e['level']:>6}{e['s']:>12.3f}{base_e / e['s']:>9.2f}x{e['bytes'] / mib:>9.2f}",
              file=out)
    rd = r.get("readers")
    if rd:
        print(f"file-to-file readers/writer (segrt's codec choice; rapidgzip {'yes' if rd['rapidgzip'] else 'no'})",
              file=out)
        for k, v in rd["median_s"].items():
            print(f"  {k:<28}{v:>8.3f} s", file=out)
    base_s = r["save_labels_s"]["stdlib"]
    print(f"{'save_labels':<12}{'level':>6}{'s':>12}{'speed-up':>10}{'MiB':>9}", file=out)
    for n, s in r["save_labels_s"].items():
        lv = r["codecs"][n]["segrt_level"]
        print(f"{n:<12}{lv:>6}{s:>12.3f}{base_s / s:>9.2f}x{r['save_labels_bytes'][n] / mib:>9.2f}", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", choices=("numpy", "phantom"), default="numpy")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default benchmarks/results/io_<date>.json; '-' to skip)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or min(args.shape) < 1:
        ap.error(f"--repeats and --shape must be positive, received {args.repeats} and {args.shape}")

    def log(msg):
        print(f"[bench_io] {msg}", file=sys.stderr, flush=True)

    report = {"date": dt.date.today().isoformat(), "machine": machine_info()}
    report["results"] = run(tuple(args.shape), args.repeats, args.source, log)
    report["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print_table(report)
    if str(args.out) != "-":
        out = args.out or RESULTS / f"io_{report['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
