"""``segrt serve``: the HTTP endpoints (in-process, Starlette's TestClient) and a real uvicorn server in a subprocess
(concurrency, back-pressure, RSS, graceful shutdown)."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from parity_util import ct_like, lps_affine, write_volume  # noqa: E402

SHAPES = [(40, 36, 24), (38, 40, 22), (42, 34, 26), (36, 38, 24), (44, 36, 20), (40, 40, 22), (34, 42, 24),
          (46, 32, 22)]


@pytest.fixture(scope="module")
def engine(small_artifact):
    from segrt.engine.engine import Engine

    with Engine.load(small_artifact, device="cpu", threads=1) as eng:
        yield eng


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_scans")
    return [write_volume(d / f"ct{i}.nii.gz", ct_like(s, seed=10 + i), lps_affine((1.6, 1.7, 3.2)))
            for i, s in enumerate(SHAPES)]


@pytest.fixture(scope="module")
def references(engine, scans):
    return [engine.segment(str(p), progress=False).labels for p in scans]


def _labels(body: bytes) -> np.ndarray:
    img = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    return np.asarray(img.dataobj)


@pytest.fixture
def make_client(engine, small_artifact):
    from starlette.testclient import TestClient

    from segrt.serve import create_app

    clients = []

    def make(**kw):
        c = TestClient(create_app(engine, artifact=small_artifact, **kw))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_health(make_client, small_artifact):
    r = make_client().get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["artifact"] == small_artifact.name
    assert len(h["artifact_sha256"]) == 64 and h["backend"]
    assert h["queue_depth"] == 0 and h["in_flight"] == 0 and h["queue_limit"] == 4


def test_nifti_gz_and_nii_match_engine(make_client, engine, scans, references):
    c = make_client()
    body = scans[0].read_bytes()
    r = c.post("/segment", content=body, headers={"Content-Type": "application/octet-stream"})  # sniffed gzip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    out = _labels(r.content)
    assert np.array_equal(out, references[0])
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert np.allclose(img.affine, nib.load(str(scans[0])).affine)
    raw = gzip.decompress(body)  # uncompressed .nii: sniffed by its 348-byte header
    r = c.post("/segment", content=raw)
    assert r.status_code == 200, r.text
    assert np.array_equal(_labels(r.content), references[0])
    r = c.post("/segment?format=nifti", content=raw, headers={"Content-Type": "text/plain"})  # ?format wins
    assert r.status_code == 200, r.text


def test_nrrd(make_client, engine, tmp_path):
    pytest.importorskip("nrrd")
    from segrt.nrrdio import save_nrrd_volume
    from segrt.volume import Volume

    p = tmp_path / "scan.nrrd"
    save_nrrd_volume(Volume.from_array(ct_like((40, 36, 24), seed=3), lps_affine((1.5, 1.5, 3.0))), p)
    ref = engine.segment(str(p), progress=False).labels
    c = make_client()
    for headers in ({}, {"Content-Type": "application/x-nrrd"}):
        r = c.post("/segment", content=p.read_bytes(), headers=headers)
        assert r.status_code == 200, r.text
        assert np.array_equal(_labels(r.content), ref)
    r = c.post("/segment?output=nrrd", content=p.read_bytes())
    assert r.status_code == 200 and r.content[:4] == b"NRRD"


def test_dicom_zip_and_file(make_client, engine, tmp_path):
    pytest.importorskip("pydicom")
    from test_dicom_input import write_series

    folder = tmp_path / "series"
    stored = (ct_like((32, 30, 12), seed=5) + 1000).astype(np.int16)
    files = write_series(folder, stored, intercept=-1000.0)["files"]
    ref = engine.segment(str(folder), progress=False).labels
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"../evil/{f.name}")  # archive paths are never used
    c = make_client()
    r = c.post("/segment", content=buf.getvalue())  # sniffed zip
    assert r.status_code == 200, r.text
    assert np.array_equal(_labels(r.content), ref)
    r = c.post("/segment", content=buf.getvalue(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    r = c.post("/segment", content=open(files[0], "rb").read())  # one slice: DICM magic, a 1-slice series
    assert r.status_code in (200, 400), r.text
    assert not (tmp_path.parent / "evil").exists()


def test_stats_json_preview(make_client, engine, scans):
    c = make_client()
    seg = engine.segment(str(scans[1]), progress=False)
    r = c.post("/segment?output=stats", content=scans[1].read_bytes())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == json.loads(json.dumps(seg.statistics()))
    r = c.post("/segment?output=json", content=scans[1].read_bytes())
    assert r.status_code == 200
    j = r.json()
    assert set(j) == {"statistics", "metadata", "timings", "volumes_ml"} and j["metadata"]["backend"]
    pytest.importorskip("matplotlib")
    r = c.post("/segment?output=preview", content=scans[1].read_bytes())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(make_client, tmp_path):
    c = make_client()
    svc = c.app.state.service
    corrupt = gzip.compress(b"this is not a nifti file at all" * 20)
    r = c.post("/segment", content=corrupt)
    assert r.status_code == 400
    msg = r.json()["error"]
    assert "\n" not in msg and msg and str(svc._tmp_root) not in msg
    r = c.post("/segment", content=b"hello world, not a scan" * 30)
    assert r.status_code == 415 and "format" in r.json()["error"]
    r = c.post("/segment", content=b"x" * 400, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = c.post("/segment?output=bogus", content=b"x")
    assert r.status_code == 400 and "output" in r.json()["error"]
    r = c.post("/segment", content=b"")
    assert r.status_code == 400
    a = ct_like((30, 30, 20))
    a[3, 4, 5] = np.nan
    p = write_volume(tmp_path / "nan.nii.gz", a, np.eye(4))
    r = c.post("/segment", content=p.read_bytes())
    assert r.status_code == 400 and "nan" in r.json()["error"].lower()
    r = c.post("/segment", content=b"PK\x03\x04 broken zip" * 30)
    assert r.status_code == 400 and "zip" in r.json()["error"]
    assert list(svc._tmp_root.iterdir()) == []  # every temporary file is gone
    assert c.get("/health").json()["queue_depth"] == 0


def test_too_large(make_client, scans):
    c = make_client(max_body=1000)
    r = c.post("/segment", content=scans[0].read_bytes())  # Content-Length says so: refused before reading
    assert r.status_code == 413 and "max-body" in r.json()["error"]

    def chunks():  # no Content-Length: refused when the stream passes the limit
        for _ in range(10):
            yield b"\x1f\x8b" + b"\0" * 510

    r = c.post("/segment", content=chunks())
    assert r.status_code == 413
    assert list(c.app.state.service._tmp_root.iterdir()) == []
    assert c.get("/health").json()["queue_depth"] == 0


def test_timeout(make_client, scans):
    c = make_client(timeout=1e-4)
    r = c.post("/segment", content=scans[2].read_bytes())
    assert r.status_code == 504 and "timed out" in r.json()["error"]


# ---- a real server ---------------------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(small_artifact):
    proc = subprocess.Popen([sys.executable, "-m", "segrt.cli", "serve", str(small_artifact), "--port", "0",
                             "--queue", "2", "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()}")
    url = line.split("listening on ")[1].split()[0]
    assert url.startswith("http://127.0.0.1:")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_real_server_concurrency_backpressure_rss_and_shutdown(server, scans, references):
    proc, url = server
    bodies = [p.read_bytes() for p in scans]
    with httpx.Client(base_url=url, timeout=120) as c:  # warm up, then the RSS baseline
        assert c.post("/segment", content=bodies[0]).status_code == 200
    rss0 = _rss_kb(proc.pid)
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i):
        with httpx.Client(base_url=url, timeout=120) as c:
            barrier.wait()
            try:
                r = c.post("/segment", content=bodies[i])
                results[i] = (r.status_code, r.content, r.headers)
            except httpx.HTTPError as exc:  # pragma: no cover - would be a lost request
                results[i] = ("lost", repr(exc), {})

    for _ in range(2):  # two bursts: RSS must not grow with the number of requests
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        codes = [r[0] for r in results]
        assert set(codes) <= {200, 503}, codes  # nothing lost, nothing else
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        for i, (code, content, headers) in enumerate(results):
            if code == 200:
                assert np.array_equal(_labels(content), references[i]), f"client {i} got another scan's labels"
            else:
                assert "Retry-After" in headers and "busy" in json.loads(content)["error"]
    rss1 = _rss_kb(proc.pid)
    assert rss1 < rss0 + 300 * 1024, (rss0, rss1)  # generous: no per-request growth
    with httpx.Client(base_url=url, timeout=30) as c:
        h = c.get("/health").json()
    assert h["queue_depth"] == 0 and h["in_flight"] == 0 and h["refused"] >= 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_cli_errors(small_artifact, tmp_path):
    r = subprocess.run([sys.executable, "-m", "segrt.cli", "serve", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("segrt: error:") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "segrt.cli", "serve", str(small_artifact), "--port", "70000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "port" in r.stderr
