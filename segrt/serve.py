"""``segrt serve ARTIFACT``: keep one model loaded and segment scans POSTed over HTTP (issue 13).

    segrt serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--queue 4] [--timeout 600] [--max-body 1G]
                         [--device auto] [--threads N]

Endpoints (Starlette app, served by uvicorn; both are the serve extra: ``pip install 'segrt[serve]'``):

* ``GET /health``: ``{"status": "ok", "artifact", "artifact_sha256" (of its manifest, which holds every model
  file's hash), "backend", "device", "queue_depth" (accepted, waiting), "in_flight" (running: 0 or 1),
  "queue_limit", "served", "refused", "rss_mb", "peak_rss_mb"}``.
* ``POST /segment``: the scan is the request body: NIfTI (.nii / .nii.gz), NRRD (attached data), one DICOM file
  or a zip of a DICOM series. The format comes from ``?format=`` (nifti, nrrd, dicom, dicom-zip), else from
  ``Content-Type`` (``application/zip``: DICOM zip, ``application/x-nrrd`` / ``application/nrrd``: NRRD,
  ``application/dicom``: DICOM file, ``application/x-nifti`` / ``application/gzip``: NIfTI); with neither (or
  ``application/octet-stream``) it is sniffed: gzip magic → .nii.gz, ``NRRD`` → .nrrd, zip magic → DICOM zip,
  ``DICM`` at byte 128 → DICOM file, a 348 (NIfTI-1) / 540 (NIfTI-2) header size → .nii. ``?output=``:
  ``nifti`` (default: the labels on the input grid as .nii.gz, ``application/gzip``), ``nrrd``, ``stats`` (the
  per-structure statistics JSON of ``segrt run --stats``), ``preview`` (PNG, needs matplotlib) or ``json``
  (``{"statistics", "metadata", "timings", "volumes_ml"}``).

Resources, all bounded:

* One :class:`~segrt.engine.engine.Engine`, loaded once; inference runs in ONE worker thread (the engine already
  uses every core for one scan), so requests are served one at a time, in arrival order.
* At most ``--queue`` requests wait behind the one running; another one is refused at once with 503 and
  ``Retry-After`` (its body is not stored). So at most queue + 1 uploads are on disk and one scan is in memory.
* The body is streamed into a private temporary folder (mode 0700), never held in memory; a body over
  ``--max-body`` is refused with 413 (at once when ``Content-Length`` says so, else when the stream passes it).
  A DICOM zip is extracted member by member under flat names (no path from the archive is used), its unpacked
  size capped at 4 x ``--max-body``. Every temporary file is deleted when its request's work ends.
* ``--timeout`` seconds from the end of the upload (waiting + running): past it the client gets 504. A request
  still waiting is dropped from the queue; one already running finishes (inference cannot be interrupted) and its
  result is discarded - its queue slot stays taken until then, so timeouts cannot pile up work.

Errors are JSON ``{"error": "<the one line 'segrt run' prints>"}`` (temporary paths replaced by ``<upload>``):
400 for a bad input or request (corrupt or unreadable scan, NaN voxels, an unknown ``output``), 415 for an
unrecognised format, 413 too large, 422 for a scan the memory budget cannot fit, 503 queue full, 504 timeout,
500 for anything else.

Binds 127.0.0.1 by default (the server has no authentication); ``--host 0.0.0.0`` works with a warning.
``--port 0`` picks a free port; the address is printed as ``segrt serve: listening on http://HOST:PORT``.
SIGINT / SIGTERM: stop accepting, let the running requests finish (uvicorn's graceful shutdown), close the engine.

Size: over 400 lines because the bounded queue, the streaming upload with its limits, the format sniffing and
the error mapping are one request path, tested as one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from segrt.errors import (BudgetError, OutputError, SegrtError, UsageError, VolumeError)

DEFAULT_MAX_BODY = 1 << 30
_EXTRA_MISSING = "segrt serve needs the serve extra: pip install 'segrt[serve]'"
_OUTPUTS = ("nifti", "nrrd", "stats", "preview", "json")
_FORMATS = {"nifti": "nifti", "nii": "nifti", "nii.gz": "nifti", "nrrd": "nrrd", "dicom": "dicom",
            "dcm": "dicom", "dicom-zip": "dicom-zip", "zip": "dicom-zip"}
_CONTENT_TYPES = {"application/zip": "dicom-zip", "application/x-zip-compressed": "dicom-zip",
                  "application/x-nrrd": "nrrd", "application/nrrd": "nrrd", "application/dicom": "dicom",
                  "application/x-nifti": "nifti", "application/nifti": "nifti", "application/gzip": "nifti",
                  "application/x-gzip": "nifti"}
_SNIFFED = ("application/octet-stream", "")
_DRAIN_REFUSED = 8 << 20  # a refused request's body up to this size is read and discarded (clean close)


class HTTPError(Exception):
    """An error answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, BudgetError):
        return 422
    if isinstance(exc, (VolumeError, UsageError, OutputError)):
        return 400
    return 500


def _rss_mb() -> dict:
    out = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
                elif line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def sniff_format(head: bytes) -> str | None:
    """The upload's kind from its first bytes (at least 348 for DICOM): nifti-gz, nrrd, dicom-zip, dicom, nifti."""
    if head[:2] == b"\x1f\x8b":
        return "nifti-gz"
    if head[:4] == b"NRRD":
        return "nrrd"
    if head[:4] == b"PK\x03\x04":
        return "dicom-zip"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 4 and (int.from_bytes(head[:4], "little") in (348, 540)
                           or int.from_bytes(head[:4], "big") in (348, 540)):
        return "nifti"
    return None


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _dumps(obj) -> bytes:
    return json.dumps(obj, default=_json_default, allow_nan=False).encode()


class SegmentService:
    """The engine, its one worker thread and the bounded queue in front of it (independent of the web framework)."""

    def __init__(self, engine, artifact=None, queue: int = 4, timeout: float = 600.0,
                 max_body: int = DEFAULT_MAX_BODY, tmp_dir=None):
        if queue < 0:
            raise UsageError(f"--queue must be 0 or more, got {queue}")
        if not timeout > 0:
            raise UsageError(f"--timeout must be positive, got {timeout}")
        if max_body < 1:
            raise UsageError(f"--max-body must be positive, got {max_body}")
        self.engine = engine
        root = Path(artifact) if artifact is not None else Path(engine.artifact.root)
        self.artifact_name = root.resolve().name
        try:
            self.artifact_sha256 = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
        except OSError:
            self.artifact_sha256 = None
        self.queue_limit, self.timeout, self.max_body = int(queue), float(timeout), int(max_body)
        self._tmp_root = Path(tempfile.mkdtemp(prefix="segrt-serve-", dir=tmp_dir))  # mkdtemp: mode 0700
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="segrt-serve")
        self._lock = threading.Lock()
        self._admitted = 0  # requests holding a slot: uploading, waiting or running
        self._in_flight = 0
        self.served = 0
        self.refused = 0

    # ---- slots ------------------------------------------------------------------------------------------------
    def try_admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.queue_limit + 1:
                self.refused += 1
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def health(self) -> dict:
        with self._lock:
            admitted, running = self._admitted, self._in_flight
        return {"status": "ok", "artifact": self.artifact_name, "artifact_sha256": self.artifact_sha256,
                "backend": getattr(self.engine.backend, "name", None), "device": getattr(self.engine, "device", None),
                "queue_depth": admitted - running, "in_flight": running, "queue_limit": self.queue_limit,
                "served": self.served, "refused": self.refused, **_rss_mb()}

    def new_workdir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="req-", dir=self._tmp_root))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    # ---- the work, in the worker thread -----------------------------------------------------------------------
    def submit(self, workdir: Path, upload: Path, kind: str, output: str) -> concurrent.futures.Future:
        """Queue the job; its workdir is deleted and its slot released when it ends (done, failed or cancelled)."""
        fut = self._executor.submit(self._job, workdir, upload, kind, output)

        def done(f):
            if f.cancelled():
                shutil.rmtree(workdir, ignore_errors=True)
            self.release()

        fut.add_done_callback(done)
        return fut

    def _job(self, workdir: Path, upload: Path, kind: str, output: str):
        with self._lock:
            self._in_flight += 1
        try:
            return self._segment(workdir, upload, kind, output)
        finally:
            with self._lock:
                self._in_flight -= 1
            shutil.rmtree(workdir, ignore_errors=True)

    def _segment(self, workdir: Path, upload: Path, kind: str, output: str):
        source = self._input_path(workdir, upload, kind)
        seg = self.engine.segment(source, progress=False)
        self.served += 1
        if output in ("nifti", "nrrd"):
            out = workdir / ("labels.nii.gz" if output == "nifti" else "labels.nrrd")
            seg.save(out)
            media = "application/gzip" if output == "nifti" else "application/x-nrrd"
            return out.read_bytes(), media
        if output == "stats":
            return _dumps(seg.statistics()), "application/json"
        if output == "preview":
            out = seg.write_preview(workdir / "preview.png")
            return Path(out).read_bytes(), "image/png"
        return _dumps({"statistics": seg.statistics(), "metadata": seg.metadata, "timings": seg.timings,
                       "volumes_ml": seg.volumes_ml()}), "application/json"

    def _input_path(self, workdir: Path, upload: Path, kind: str) -> Path:
        if kind in ("nifti", "nifti-gz", "nrrd", "dicom"):
            with open(upload, "rb") as f:
                head = f.read(352)
            sniffed = sniff_format(head)
            if kind == "nifti":  # declared NIfTI: gzip or not is in the bytes
                kind = "nifti-gz" if sniffed == "nifti-gz" else "nifti"
            name = {"nifti": "upload.nii", "nifti-gz": "upload.nii.gz", "nrrd": "upload.nrrd",
                    "dicom": "upload.dcm"}[kind]
            return upload.rename(workdir / name)
        return self._extract_zip(workdir, upload)

    def _extract_zip(self, workdir: Path, upload: Path) -> Path:
        import zipfile

        folder = workdir / "dicom"
        folder.mkdir()
        cap = 4 * self.max_body
        total = 0
        try:
            with zipfile.ZipFile(upload) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()]
                if not members:
                    raise VolumeError("the uploaded zip holds no files; expected the .dcm files of one DICOM series")
                if len(members) > 100_000:
                    raise VolumeError(f"the uploaded zip holds {len(members)} files; at most 100000 are accepted")
                for i, m in enumerate(members):
                    with zf.open(m) as src, open(folder / f"{i:06d}.dcm", "wb") as dst:
                        while True:
                            chunk = src.read(1 << 20)
                            if not chunk:
                                break
                            total += len(chunk)
                            if total > cap:
                                raise HTTPError(413, f"the uploaded zip unpacks to more than {cap} bytes "
                                                     f"(4 x --max-body); refused")
                            dst.write(chunk)
        except zipfile.BadZipFile as exc:
            raise VolumeError(f"the uploaded zip is corrupt or truncated ({exc}); expected a zip of one DICOM "
                              "series") from None
        except (RuntimeError, NotImplementedError) as exc:  # encrypted members, unsupported compression
            raise VolumeError(f"cannot unpack the uploaded zip: {exc}") from None
        upload.unlink(missing_ok=True)
        return folder

    def error_message(self, exc: BaseException) -> str:
        if isinstance(exc, HTTPError):
            return exc.message
        from segrt.cliargs import error_line

        return error_line(exc).replace(str(self._tmp_root), "<upload>")


def _resolve_kind(fmt: str | None, content_type: str | None, head: bytes) -> str:
    if fmt is not None:
        kind = _FORMATS.get(fmt.strip().lower())
        if kind is None:
            raise HTTPError(415, f"unknown format {fmt!r}: expected one of nifti, nrrd, dicom, dicom-zip")
        return kind
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in _CONTENT_TYPES:
        return _CONTENT_TYPES[ctype]
    if ctype not in _SNIFFED:
        raise HTTPError(415, f"unsupported Content-Type {ctype!r}: send NIfTI (.nii / .nii.gz), NRRD, a DICOM file "
                             "or a zip of a DICOM series as application/octet-stream (sniffed), or name the format "
                             "with ?format=nifti|nrrd|dicom|dicom-zip")
    kind = sniff_format(head)
    if kind is None:
        raise HTTPError(415, "cannot tell the uploaded scan's format from its first bytes: expected NIfTI (.nii / "
                             ".nii.gz), NRRD, a DICOM file or a zip of a DICOM series (or give ?format=)")
    return kind


def create_app(engine, *, artifact=None, queue: int = 4, timeout: float = 600.0, max_body: int = DEFAULT_MAX_BODY,
               tmp_dir=None):
    """The Starlette application around ``engine`` (an :class:`~segrt.engine.engine.Engine`, loaded by the caller,
    who also closes it). ``app.state.service`` is the :class:`SegmentService`; it is closed (worker joined,
    temporary folder deleted) at the application's shutdown."""
    try:
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
    except ModuleNotFoundError:
        raise UsageError(_EXTRA_MISSING) from None

    service = SegmentService(engine, artifact=artifact, queue=queue, timeout=timeout, max_body=max_body,
                             tmp_dir=tmp_dir)

    def error(exc: BaseException) -> JSONResponse:
        headers = dict(exc.headers) if isinstance(exc, HTTPError) else {}
        return JSONResponse({"error": service.error_message(exc)}, status_code=_status_of(exc), headers=headers)

    async def health(request):
        return JSONResponse(service.health())

    async def drain(request, limit: int) -> None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    return
        except Exception:  # noqa: BLE001 - the client went away: nothing to answer
            return

    async def receive_body(request, path: Path) -> bytes:
        """Stream the body into ``path``; returns its first bytes (for sniffing)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise HTTPError(400, f"invalid Content-Length {declared!r}")
            if int(declared) > service.max_body:
                raise HTTPError(413, f"the upload ({int(declared)} bytes) is larger than --max-body "
                                     f"({service.max_body} bytes)")
        size, head = 0, b""
        with open(path, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > service.max_body:
                    raise HTTPError(413, f"the upload is larger than --max-body ({service.max_body} bytes)")
                if len(head) < 352:
                    head += chunk[:352 - len(head)]
                f.write(chunk)
        if size == 0:
            raise HTTPError(400, "empty request body: POST the scan (NIfTI, NRRD, DICOM file or zip) as the body")
        return head

    async def segment(request):
        output = request.query_params.get("output", "nifti").strip().lower()
        if output not in _OUTPUTS:
            return error(HTTPError(400, f"unknown output {output!r}: expected one of {', '.join(_OUTPUTS)}"))
        if not service.try_admit():
            await drain(request, _DRAIN_REFUSED)
            return error(HTTPError(503, f"busy: {service.queue_limit} requests already wait (--queue); retry later",
                                   headers={"Retry-After": "5"}))
        workdir, submitted = None, False
        try:
            workdir = service.new_workdir()
            upload = workdir / "upload.bin"
            head = await receive_body(request, upload)
            kind = _resolve_kind(request.query_params.get("format"), request.headers.get("content-type"), head)
            deadline = time.monotonic() + service.timeout
            fut = service.submit(workdir, upload, kind, output)
            submitted = True  # from here the job owns the slot and the workdir
            try:
                body, media = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                                                     max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                fut.cancel()  # drops it if still waiting; a running one finishes and is discarded
                return error(HTTPError(504, f"timed out after {service.timeout:g} s (--timeout); the result, if "
                                            "any, is discarded"))
            return Response(body, media_type=media)
        except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes one JSON line
            return error(exc)
        finally:
            if not submitted:
                if workdir is not None:
                    shutil.rmtree(workdir, ignore_errors=True)
                service.release()

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = Starlette(routes=[Route("/health", health, methods=["GET"]),
                            Route("/segment", segment, methods=["POST"])], lifespan=lifespan)
    app.state.service = service
    return app


# ---- command line ----------------------------------------------------------------------------------------------
def _size(text: str) -> int:
    import argparse

    from segrt.engine.budget import parse_size

    try:
        v = parse_size(text)
    except SegrtError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size like 1G, got {text!r}")
    return v


def add_arguments(parser) -> None:
    """The subcommand's arguments (called by :func:`segrt.cli.build_parser`)."""
    parser.add_argument("artifact", help="artifact directory written by 'segrt export'")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1; the server has no authentication, so 0.0.0.0 "
                             "exposes it to the network - a warning is printed)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free port, printed)")
    parser.add_argument("--queue", type=int, default=4,
                        help="requests that may wait behind the running one (default 4); more are refused with 503")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may wait and run after its upload (default 600); then 504")
    parser.add_argument("--max-body", type=_size, default=DEFAULT_MAX_BODY, metavar="SIZE",
                        help="largest upload accepted, like 1G or 500M (default 1G); larger ones get 413")
    parser.add_argument("--device", default="auto",
                        choices=["auto", "cpu", "ort-cpu", "openvino", "cuda", "tensorrt", "ort-cuda", "torch-cuda"],
                        help="where to run (as 'segrt run --device')")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (as 'segrt run --threads')")


def run_cli(a) -> int:
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError(_EXTRA_MISSING) from None
    import socket

    from segrt.engine.engine import Engine

    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {a.port}")
    if a.queue < 0:
        raise UsageError(f"--queue must be 0 or more, got {a.queue}")
    if not a.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {a.timeout}")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"segrt: warning: binding {a.host}: the server has no authentication and accepts scans from anyone "
              "who can reach this port", file=sys.stderr, flush=True)
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {a.host}:{a.port}: {exc.strerror or exc}") from None
    with Engine.load(a.artifact, device=a.device, threads=a.threads) as eng:
        app = create_app(eng, artifact=a.artifact, queue=a.queue, timeout=a.timeout, max_body=a.max_body)
        sock.listen(128)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"segrt serve: listening on http://{shown}:{port} (artifact {app.state.service.artifact_name}, "
              f"backend {eng.backend.name}, queue {a.queue}, timeout {a.timeout:g} s)", flush=True)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=a.timeout, lifespan="on")
        server = uvicorn.Server(config)
        import signal

        # uvicorn handles SIGINT/SIGTERM (graceful shutdown), then re-raises the signal to the handler that was
        # there before it: this one, so that the engine is closed and the exit status is 0
        stopped_by: list[int] = []
        previous = {s: signal.signal(s, lambda sig, frame: stopped_by.append(sig))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            sock.close()
    print("segrt serve: stopped", flush=True)
    return 0
