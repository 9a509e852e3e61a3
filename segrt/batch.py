"""``segrt batch ARTIFACT INPUTS... -o OUT_DIR`` (issue 13): many scans, resumable, exactly once.

Inputs (:func:`collect_cases`): NIfTI/NRRD files; folders, walked for those (hidden entries and OUT_DIR left out; a
folder holding DICOM files is one DICOM case and is not walked further); ``.csv``/``.txt`` lists, one input per line
(relative paths are relative to the list's folder; a CSV may have the header ``input,output`` where ``output`` names
the case's output file in OUT_DIR). A case is named after its file (``ct.nii.gz`` → ``ct``) or DICOM folder; two cases
with the same output name are refused, listing them.

Per case: ``OUT_DIR/<case>.nii.gz`` (``--format nrrd``: ``.nrrd``) written atomically, then — only after it — the
sidecar ``OUT_DIR/<case>.nii.gz.segrt.json`` (atomically too) recording status ``ok``, the input's content sha256
(a DICOM folder: a hash over its files' names and hashes), the artifact's manifest sha256 (the manifest holds every
model file's hash), the output's sha256, segrt's version, seconds and windows. A case is **done** when both files
exist and the recorded input, artifact and output hashes (and the options that change labels: ``--no-skip``) match
what is on disk: a rerun skips done cases and redoes changed inputs, a changed artifact, or a missing/edited output
(a case to redo loses its sidecar first, so an older output is never taken for a current one). One ``segrt batch`` at a time may write an OUT_DIR
(a lock file), and stale temporary files of an interrupted run are removed when the next run starts.

Workers:

* local pool (default): ``--workers N`` processes (spawn), each loading the engine once, ``--threads`` per worker
  (default: usable CPUs // N). One worker runs in this process and reads the next input in a thread while the
  current one computes.
* ``--ray ADDRESS|local``: one Ray actor per worker (``num_cpus`` = threads; ``num_gpus=1`` when the cluster has GPUs
  and ``--device`` is not cpu — that path is untested here). The artifact's files are read once, put in the object
  store and written to a temporary folder once per actor; at most 2 cases are in flight per actor. Actors write the
  outputs themselves: on a multi-node cluster OUT_DIR (and the inputs) must be on storage every node sees.

A failing case never stops the others: it goes to ``OUT_DIR/errors.jsonl`` (this run's failures: case, input, error
type, message) and the summary. At the end ``OUT_DIR/summary.csv`` lists every case (status ok, failed, skipped or
pending). SIGINT/SIGTERM: no new case is started, the running ones finish (a second signal abandons them: outputs
are atomic, nothing partial is left), the summary is written and the exit status is 130 (SIGINT) / 143 (SIGTERM).

Exit status: 0 when every case is ok or skipped, 1 when any case failed, 2 for a usage error (one ``segrt: error:``
line, nothing run).

Size: over 400 lines because three ways of running cases (in process with a read-ahead thread, a process pool,
Ray actors) share one case function, one done-check and one signal handler; input discovery (files, walked folders,
DICOM folders, CSV/text lists) is the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from segrt.errors import SegrtError, UsageError

__all__ = ["add_arguments", "run_cli", "collect_cases", "Case", "input_sha256", "artifact_sha256", "is_done",
           "EXIT_FAILED", "SIDECAR_SUFFIX"]

EXIT_FAILED = 1
SIDECAR_SUFFIX = ".segrt.json"
SIDECAR_SCHEMA = "segrt-batch-case/1"
_IMAGE_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr")
_DICOM_EXTS = (".dcm", ".dicom")
_OUT_EXTS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
_LOCK = ".segrt-batch.lock"
_TEMP_RE = re.compile(r"^\.(?P<prefix>.+)\.[A-Za-z0-9_]{8}\.tmp")  # safety.temp_name + mkstemp's 8 random chars


def _positive_int(text: str) -> int:
    from segrt.cliargs import positive_int as p

    return p(text)


def add_arguments(parser) -> None:
    """The subcommand's arguments (called by :func:`segrt.cli.build_parser`)."""
    parser.add_argument("artifact", help="artifact directory written by 'segrt export'")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="NIfTI / NRRD files, folders (walked; a folder of DICOM files is one case), or .csv/.txt "
                             "lists (one input per line; CSV header 'input,output' names the outputs)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                        help="folder for <case>.nii.gz, its .segrt.json sidecar, errors.jsonl and summary.csv")
    parser.add_argument("--format", default="nifti", choices=["nifti", "nrrd"], help="output format (default nifti)")
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="worker processes / Ray actors, each with its own engine (default: 1; with --ray: "
                             "cluster CPUs // threads)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads per worker (default: usable CPUs // workers)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS|local",
                        help="run the workers as Ray actors on a cluster (ADDRESS, e.g. auto or ray://host:10001) "
                             "or on this machine (local); needs pip install 'segrt[ray]'")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "ort-cpu", "openvino", "cuda"],
                        help="where each worker runs (as 'segrt run --device')")
    parser.add_argument("--max-memory", default=None, metavar="SIZE", help="RAM budget per worker, like 1.5G")
    parser.add_argument("--no-skip", action="store_true", help="run every window (as 'segrt run --no-skip')")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


# ---- cases ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str           # the output file's name without its extension
    source: str         # a NIfTI/NRRD file or a DICOM folder
    output: Path        # OUT_DIR/<name><ext>
    fmt: str            # nifti | nrrd

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(self.output.name + SIDECAR_SUFFIX)


def _strip_ext(name: str, exts=_IMAGE_EXTS + _DICOM_EXTS) -> str:
    low = name.lower()
    for e in exts:
        if low.endswith(e) and len(low) > len(e):
            return name[: -len(e)]
    return name


def _has_ext(name: str, exts) -> bool:
    low = name.lower()
    return any(low.endswith(e) and len(low) > len(e) for e in exts)


def _is_dicom_file(p: Path) -> bool:
    if _has_ext(p.name, _DICOM_EXTS):
        return True
    if _has_ext(p.name, _IMAGE_EXTS):
        return False
    from segrt.imageio import _has_dicm_magic

    return _has_dicm_magic(p)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _walk(folder: Path, out_dir: Path) -> list[str]:
    """Image files and DICOM folders below ``folder`` (sorted; hidden entries and ``out_dir`` left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(here / d) != os.path.realpath(out_dir))
        visible = [here / f for f in sorted(files) if not f.startswith(".") and (here / f).is_file()]
        if any(_is_dicom_file(p) for p in visible):
            found.append(str(here))
            dirs[:] = []  # a DICOM folder is one case
            continue
        found += [str(p) for p in visible if _has_ext(p.name, _IMAGE_EXTS)]
    return found


def _expand(entry: str, out_dir: Path, where: str) -> list[str]:
    p = Path(entry)
    if p.is_dir():
        found = _walk(p, out_dir)
        if not found:
            raise UsageError(f"{where}folder {entry!r} holds no NIfTI, NRRD or DICOM input")
        return found
    if not p.exists():
        raise UsageError(f"{where}input {entry!r} does not exist")
    if _has_ext(p.name, _IMAGE_EXTS):
        return [str(p)]
    if _is_dicom_file(p):
        raise UsageError(f"{where}input {entry!r} is a DICOM file: give the series' folder (one case per folder)")
    raise UsageError(f"{where}input {entry!r} is not a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), a folder or a "
                     ".csv/.txt list")


def _read_list(path: Path) -> list[tuple[str, str | None]]:
    """``[(input, output name or None)]`` of a .txt (one path a line, # comments) or .csv (input[,output]) list."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the input list {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    rows: list[tuple[str, str | None]] = []
    if path.name.lower().endswith(".txt"):
        lines = [ln.strip() for ln in text.splitlines()]
        return [(ln, None) for ln in lines if ln and not ln.startswith("#")]
    table = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if table and table[0][0].strip().lower() == "input":
        head = [c.strip().lower() for c in table[0]]
        if head[1:] not in ([], ["output"]):
            raise UsageError(f"{str(path)!r}: expected the header 'input' or 'input,output', got {','.join(head)!r}")
        table = table[1:]
    for i, r in enumerate(table):
        if len(r) > 2:
            raise UsageError(f"{str(path)!r} row {i + 1}: expected input[,output], got {len(r)} columns")
        out = r[1].strip() if len(r) == 2 and r[1].strip() else None
        rows.append((r[0].strip(), out))
    return rows


def _output_for(name: str | None, source: str, out_dir: Path, fmt: str, where: str) -> Case:
    if name is None:
        stem = Path(source).name if Path(source).is_dir() else _strip_ext(Path(source).name)
        return Case(stem, source, out_dir / (stem + _OUT_EXTS[fmt]), fmt)
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise UsageError(f"{where}output name {name!r} must be a plain file name (it is written in OUT_DIR)")
    for kind, ext in (("nifti", ".nii.gz"), ("nifti", ".nii"), ("nrrd", ".nrrd")):
        if _has_ext(name, (ext,)):
            return Case(name[: -len(ext)], source, out_dir / name, kind)
    return Case(name, source, out_dir / (name + _OUT_EXTS[fmt]), fmt)


def collect_cases(inputs, out_dir, fmt: str = "nifti") -> list[Case]:
    """The batch's cases, in the order given (see the module); raises UsageError for a missing or unknown input,
    an empty folder, a bad list, or two cases writing the same output (listing them)."""
    out_dir = Path(out_dir)
    cases: list[Case] = []
    for entry in inputs:
        p = Path(entry)
        if p.is_file() and _has_ext(p.name, (".csv", ".txt")):
            for i, (inp, name) in enumerate(_read_list(p)):
                where = f"{p.name} line {i + 1}: "
                full = inp if os.path.isabs(inp) else str(p.parent / inp)
                found = _expand(full, out_dir, where)
                if name is not None and len(found) != 1:
                    raise UsageError(f"{where}{inp!r} holds {len(found)} inputs; an output name needs exactly one")
                cases += [_output_for(name, s, out_dir, fmt, where) for s in found]
        else:
            cases += [_output_for(None, s, out_dir, fmt, "") for s in _expand(str(entry), out_dir, "")]
    by_out: dict[str, list[Case]] = {}
    for c in cases:
        by_out.setdefault(c.output.name.lower(), []).append(c)
    dups = {k: v for k, v in by_out.items() if len(v) > 1}
    if dups:
        listing = "; ".join(f"{v[0].output.name}: " + ", ".join(c.source for c in v) for v in dups.values())
        raise UsageError(f"{len(dups)} output name(s) would be written by several inputs ({listing}); rename them "
                         "or give output names in a CSV list (input,output)")
    if not cases:
        raise UsageError("no input to segment")
    return cases


# ---- hashes and the done-check ------------------------------------------------------------------------------------
def _nhdr_data_files(path: Path) -> list[Path]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip().lower() in ("data file", "datafile") and val.strip() and not val.strip().upper().startswith(
                ("LIST", "%")):
            return [path.parent / val.strip().split()[0]]
    return []


def input_sha256(source: str) -> str:
    """Content hash of a case's input: the file's sha256 (a detached .nhdr: with its data file), or for a DICOM
    folder a sha256 over its visible files' sorted names and sha256s."""
    from segrt.artifact import sha256_file

    p = Path(source)
    if p.is_dir():
        h = hashlib.sha256(b"segrt-dicom-folder\0")
        for f in _visible_files(p):
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
        return h.hexdigest()
    if _has_ext(p.name, (".nhdr",)):
        h = hashlib.sha256(sha256_file(p).encode())
        for f in _nhdr_data_files(p):
            if f.is_file():
                h.update(sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(p)


def artifact_sha256(artifact) -> str:
    """sha256 of the artifact's manifest (which records every model file's sha256, verified at load)."""
    from segrt.artifact import MANIFEST, sha256_file

    return sha256_file(Path(artifact) / MANIFEST)


def is_done(case: Case, in_sha: str, art_sha: str, options: dict) -> bool:
    """True when the case's output and sidecar exist, the sidecar says ok, and the input, artifact, options and
    output hashes it records match."""
    from segrt.artifact import sha256_file

    try:
        side = json.loads(case.sidecar.read_text())
        return (isinstance(side, dict) and side.get("schema") == SIDECAR_SCHEMA and side.get("status") == "ok"
                and side.get("input_sha256") == in_sha and side.get("artifact_sha256") == art_sha
                and side.get("options") == options and case.output.is_file()
                and side.get("output_sha256") == sha256_file(case.output))
    except (OSError, ValueError):
        return False


# ---- one case (shared by every kind of worker) -------------------------------------------------------------------
def process_case(eng, case: Case, art_sha: str, artifact: str, options: dict) -> dict:
    """Segment one case with a loaded engine; write its output, then its sidecar. Returns the result row."""
    from segrt import __version__
    from segrt.artifact import sha256_file
    from segrt.safety import atomic_write

    t0 = time.perf_counter()
    try:
        in_sha = input_sha256(case.source)
        seg = eng.segment(case.source, progress=False)
        seg.save(case.output, case.fmt)
        m = seg.metadata
        side = {"schema": SIDECAR_SCHEMA, "status": "ok", "case": case.name, "input": os.path.abspath(case.source),
                "input_sha256": in_sha, "artifact": os.path.abspath(artifact), "artifact_sha256": art_sha,
                "output": case.output.name, "output_sha256": sha256_file(case.output), "options": options,
                "segrt_version": __version__, "seconds": round(time.perf_counter() - t0, 3),
                "windows": m.get("windows"), "windows_run": m.get("windows_run"), "backend": m.get("backend"),
                "timings": {k: round(v, 4) for k, v in seg.timings.items()},
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(case.sidecar, lambda f: f.write(json.dumps(side, indent=2)), mode="w", encoding="utf-8")
        return {"case": case.name, "status": "ok", "seconds": side["seconds"], "windows": m.get("windows"),
                "output": str(case.output), "error": ""}
    except Exception as exc:  # noqa: BLE001 - one bad scan never stops the others: recorded, reported
        from segrt.cliargs import error_line

        return {"case": case.name, "status": "failed", "seconds": round(time.perf_counter() - t0, 3),
                "windows": None, "output": "", "error": error_line(exc), "error_type": type(exc).__name__}


# ---- local process pool ------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(artifact: str, load_kwargs: dict) -> None:
    """Pool initializer: the engine, loaded once per worker process. SIGINT is left to the driver (a Ctrl-C in the
    terminal reaches the whole process group; the driver decides what stops)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from segrt.engine.engine import Engine

    try:
        _WORKER["engine"] = Engine.load(artifact, **load_kwargs)
    except Exception as exc:  # noqa: BLE001 - reported by the first case instead of a broken pool
        from segrt.cliargs import error_line

        _WORKER["error"] = error_line(exc)


def _pool_task(case: Case, art_sha: str, artifact: str, options: dict) -> dict:
    if "engine" not in _WORKER:
        return {"fatal": _WORKER.get("error", "the worker has no engine")}
    return process_case(_WORKER["engine"], case, art_sha, artifact, options)


def _prefetch(path: str) -> None:
    """Read an input's bytes once so that the next case's read comes from the page cache."""
    try:
        files = _visible_files(Path(path)) if os.path.isdir(path) else [Path(path)]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 22):
                    pass
    except OSError:
        pass


class _Stop:
    """SIGINT/SIGTERM: the first stops new cases, the second raises KeyboardInterrupt (abandon the running ones)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsegrt: {signal.Signals(signum).name}: finishing the running case(s), starting no new one "
              "(again to abandon them)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    @property
    def stopped(self) -> bool:
        return self.signum is not None


def _run_inline(todo, artifact, load_kwargs, art_sha, options, stop, on_result):
    from concurrent.futures import ThreadPoolExecutor

    from segrt.engine.engine import Engine

    with Engine.load(artifact, **load_kwargs) as eng, ThreadPoolExecutor(1) as reader:
        for i, case in enumerate(todo):
            if stop.stopped:
                return
            if i + 1 < len(todo):
                reader.submit(_prefetch, todo[i + 1].source)
            on_result(case, process_case(eng, case, art_sha, artifact, options))


def _run_pool(todo, artifact, load_kwargs, art_sha, options, stop, on_result, workers):
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = list(reversed(todo))
    running = {}
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(artifact, load_kwargs))
    try:
        while pending or running:
            while pending and len(running) < workers and not stop.stopped:  # back-pressure: one case per worker
                case = pending.pop()
                running[pool.submit(_pool_task, case, art_sha, artifact, options)] = case
            if not running:
                break
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                case = running.pop(fut)
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker process died (e.g. killed for memory)
                    res = {"case": case.name, "status": "failed", "seconds": None, "windows": None, "output": "",
                           "error": f"the worker process died: {exc}", "error_type": type(exc).__name__}
                if "fatal" in res:
                    raise SegrtError(res["fatal"])
                on_result(case, res)
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):  # abandon: running cases write nothing partial
            p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ---- Ray ---------------------------------------------------------------------------------------------------------
def _artifact_files(artifact: str) -> dict[str, bytes]:
    root = Path(artifact)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


class _RayWorkerImpl:
    """One engine per actor, loaded from the artifact's files materialised into a temporary folder."""

    def __init__(self, files: dict, load_kwargs: dict):
        import tempfile

        from segrt.engine.engine import Engine

        self.dir = tempfile.mkdtemp(prefix="segrt-artifact-")
        for rel, data in files.items():
            dst = Path(self.dir) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
        self.engine = Engine.load(self.dir, **load_kwargs)

    def ready(self) -> bool:
        return True

    def segment(self, case: Case, art_sha: str, artifact: str, options: dict) -> dict:
        return process_case(self.engine, case, art_sha, artifact, options)


def _run_ray(todo, artifact, load_kwargs, art_sha, options, stop, on_result, address, workers, threads):
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'segrt[ray]'") from None
    started = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=_usable_cpus(), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
            msg = " ".join(str(exc).split())[:300]
            raise SegrtError(f"cannot start or reach the Ray cluster {address!r}: {msg}") from None
        started = True
    actors = []
    try:
        res = ray.cluster_resources()
        cpus = max(1, int(res.get("CPU", 1)))
        if workers is None:
            threads = threads or min(4, cpus)
            workers = max(1, cpus // threads)
        threads = threads or max(1, cpus // workers)
        gpus = 1 if res.get("GPU", 0) >= 1 and load_kwargs.get("device") not in ("cpu", "ort-cpu", "openvino") else 0
        files_ref = ray.put(_artifact_files(artifact))
        cls = ray.remote(_RayWorkerImpl)
        kw = dict(load_kwargs, threads=threads)
        actors = [cls.options(num_cpus=min(threads, cpus), num_gpus=gpus).remote(files_ref, kw)
                  for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            raise SegrtError(f"a Ray worker could not load the artifact: {cause or exc}") from None
        pending = list(reversed(todo))
        in_flight = {a: 0 for a in actors}
        refs = {}
        while pending or refs:
            for a in actors:  # back-pressure: at most 2 cases per actor
                while pending and in_flight[a] < 2 and not stop.stopped:
                    case = pending.pop()
                    refs[a.segment.remote(case, art_sha, artifact, options)] = (a, case)
                    in_flight[a] += 1
            if not refs:
                break
            done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in done:
                a, case = refs.pop(ref)
                in_flight[a] -= 1
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    r = {"case": case.name, "status": "failed", "seconds": None, "windows": None, "output": "",
                         "error": f"the Ray worker failed: {str(exc).splitlines()[0][:300]}",
                         "error_type": type(exc).__name__}
                on_result(case, r)
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


# ---- the command -------------------------------------------------------------------------------------------------
def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


def _lock(out_dir: Path):
    import fcntl

    f = open(out_dir / _LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"another 'segrt batch' is writing {str(out_dir)!r}; wait for it or choose another "
                         "OUT_DIR") from None
    return f


def _clean_temps(out_dir: Path, cases: list[Case]) -> int:
    """Remove temporary files an interrupted run left for this batch's outputs (safety.temp_name's names)."""
    from segrt.safety import TEMP_PREFIX_CHARS

    names = {n[:TEMP_PREFIX_CHARS] for c in cases for n in (c.output.name, c.sidecar.name)}
    names |= {n[:TEMP_PREFIX_CHARS] for n in ("summary.csv", "errors.jsonl")}
    removed = 0
    for p in out_dir.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and m.group("prefix") in names and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


@dataclass
class _Tally:
    rows: dict = field(default_factory=dict)
    ok: int = 0
    failed: int = 0
    skipped: int = 0


def _write_summary(out_dir: Path, cases: list[Case], tally: _Tally) -> Path:
    from segrt.safety import atomic_write

    cols = ["case", "status", "seconds", "windows", "output", "error"]

    def write(f):
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for c in cases:
            row = tally.rows.get(c.name) or {"case": c.name, "status": "pending", "output": ""}
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})

    return atomic_write(out_dir / "summary.csv", write, mode="w", encoding="utf-8", newline="")


def run_cli(a) -> int:
    """Run ``segrt batch``; returns the exit status (0 all ok/skipped, 1 a case failed, 130/143 interrupted)."""
    from segrt.artifact import Artifact
    from segrt.safety import check_output_dir, same_file

    if a.ray is not None and a.ray != "local" and not a.ray.strip():
        raise UsageError("--ray needs a cluster address or 'local'")
    if a.ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UsageError("--ray needs Ray: pip install 'segrt[ray]'")
    Artifact.load(a.artifact)  # a bad artifact fails here, before any worker starts
    out_dir = Path(a.output)
    cases = collect_cases(a.inputs, out_dir, a.format)
    check_output_dir(out_dir, sources=[a.artifact], what="output folder")
    out_dir.mkdir(exist_ok=True)
    for c in cases:
        if same_file(c.output, c.source) or same_file(c.sidecar, c.source):
            raise UsageError(f"case {c.name!r}: the output {str(c.output)!r} is its input")
    lock = _lock(out_dir)
    try:
        return _run_locked(a, out_dir, cases)
    finally:
        lock.close()


def _run_locked(a, out_dir: Path, cases: list[Case]) -> int:
    from tqdm import tqdm

    _clean_temps(out_dir, cases)
    art_sha = artifact_sha256(a.artifact)
    options = {"skip_empty": not a.no_skip}
    local_workers = a.workers or 1
    threads = a.threads
    if a.ray is None and threads is None:
        threads = max(1, _usable_cpus() // local_workers)
    load_kwargs = {"device": a.device, "threads": threads, "max_memory": a.max_memory, "skip_empty": not a.no_skip}
    if a.ray is None and local_workers > 1:
        load_kwargs["stitch_threads"] = threads > 1
    tally = _Tally()
    todo = []
    t0 = time.perf_counter()
    for c in cases:
        try:
            in_sha = input_sha256(c.source)
        except OSError:
            in_sha = None
        if in_sha is not None and is_done(c, in_sha, art_sha, options):
            tally.rows[c.name] = {"case": c.name, "status": "skipped", "output": str(c.output), "error": ""}
            tally.skipped += 1
        else:
            c.sidecar.unlink(missing_ok=True)  # an older output stays but is no longer 'done' (redone below)
            todo.append(c)
    errors_path = out_dir / "errors.jsonl"
    errors_path.write_text("")  # this run's failures
    bar = tqdm(total=len(cases), initial=tally.skipped, unit="case", desc="segrt batch", file=sys.stderr,
               disable=a.quiet, dynamic_ncols=True)
    bar.set_postfix(ok=0, failed=0, skipped=tally.skipped)

    def on_result(case: Case, res: dict) -> None:
        tally.rows[case.name] = res
        if res["status"] == "ok":
            tally.ok += 1
        else:
            tally.failed += 1
            rec = {"case": case.name, "input": str(case.source), "error_type": res.get("error_type"),
                   "message": res.get("error"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            with open(errors_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if not a.quiet:
                bar.write(f"segrt: case {case.name} failed: {res.get('error')}", file=sys.stderr)
        bar.update(1)
        bar.set_postfix(ok=tally.ok, failed=tally.failed, skipped=tally.skipped)

    interrupted = False
    with _Stop() as stop:
        try:
            if not todo:
                pass
            elif a.ray is not None:
                _run_ray(todo, a.artifact, load_kwargs, art_sha, options, stop, on_result, a.ray, a.workers,
                         a.threads)
            elif local_workers == 1:
                _run_inline(todo, a.artifact, load_kwargs, art_sha, options, stop, on_result)
            else:
                _run_pool(todo, a.artifact, load_kwargs, art_sha, options, stop, on_result, local_workers)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
            _clean_temps(out_dir, cases)
            _write_summary(out_dir, cases, tally)
        signum = stop.signum
    seconds = time.perf_counter() - t0
    pending = len(cases) - tally.ok - tally.failed - tally.skipped
    if a.json:
        print(json.dumps({"cases": len(cases), "ok": tally.ok, "failed": tally.failed, "skipped": tally.skipped,
                          "pending": pending, "seconds": round(seconds, 3), "output": str(out_dir)}, indent=2))
    elif not a.quiet:
        rate = tally.ok / seconds * 60 if seconds > 0 and tally.ok else 0.0
        print(f"{len(cases)} case(s): {tally.ok} ok, {tally.failed} failed, {tally.skipped} skipped (done)"
              + (f", {pending} not run (interrupted)" if pending else "")
              + f" in {seconds:.1f} s ({rate:.1f} cases/min); summary: {out_dir / 'summary.csv'}"
              + (f", errors: {out_dir / 'errors.jsonl'}" if tally.failed else ""))
    if signum is not None or interrupted:
        return 128 + (signum or signal.SIGINT)
    return EXIT_FAILED if tally.failed else 0
