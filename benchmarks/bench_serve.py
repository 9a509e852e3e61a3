"""Latency, throughput and memory of ``segrt serve`` on this machine (a real uvicorn server in a subprocess).

    python benchmarks/bench_serve.py                        # the tiny fixture artifact (random weights)
    python benchmarks/bench_serve.py --artifact DIR --shape 96 96 64 --requests 16

The server runs ``segrt serve ARTIFACT --port 0 --queue 64`` (the queue large enough to accept every request) on
127.0.0.1. The inputs are CT-like phantoms of ``--shape`` (a different random one per request, .nii.gz). After one
untimed warm-up request:

* ``clients_1``: ``--requests`` requests one after another (latency = one request's end-to-end time: upload,
  queue, read, segment, write .nii.gz, download);
* ``clients_8``: 8 client threads sending ``--requests`` requests in all at once (latency includes the time spent
  queued behind the others: the server runs one inference at a time).

Reported: median and p90 latency, throughput (requests / wall second), every response's status (all must be 200),
the server's RSS before and after and its peak RSS (VmHWM), machine info. Writes
``benchmarks/results/serve_cpu_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import machine_info  # noqa: E402
from benchmarks._paths import RESULTS, SMOKE_BUNDLE  # noqa: E402


def _proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def _phantoms(folder: Path, shape, n: int) -> list[bytes]:
    import nibabel as nib
    import numpy as np

    bodies = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        body = (g[0] ** 2 / 0.8 + g[1] ** 2 / 0.6) < 1.0
        x = np.full(shape, -1000.0, np.float32)
        x[body] = 40.0 + rng.normal(0, 20, size=int(body.sum()))
        organ = ((g[0] - 0.2) ** 2 + g[1] ** 2 + (g[2] * 0.7) ** 2) < 0.1
        x[organ] = 120.0
        aff = np.diag([-1.5, -1.5, 3.0, 1.0])
        p = folder / f"p{i}.nii.gz"
        nib.save(nib.Nifti1Image(x, aff), str(p))
        bodies.append(p.read_bytes())
    return bodies


def _summary(lat: list[float], wall: float, codes: list) -> dict:
    lat = sorted(lat)
    return {"requests": len(codes), "status_codes": {str(c): codes.count(c) for c in sorted(set(codes), key=str)},
            "latency_median_s": round(statistics.median(lat), 4),
            "latency_p90_s": round(lat[min(len(lat) - 1, int(round(0.9 * (len(lat) - 1))))], 4),
            "latency_max_s": round(lat[-1], 4), "wall_s": round(wall, 3),
            "throughput_rps": round(len(codes) / wall, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=None, help="artifact directory (default: export the tiny fixture bundle)")
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 64, 40))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = a.artifact
        if artifact is None:
            from segrt.export import export

            artifact = str(export(SMOKE_BUNDLE, tmp / "artifact", random_init=True, gate_samples=1))
        bodies = _phantoms(tmp, tuple(a.shape), a.requests)
        proc = subprocess.Popen([sys.executable, "-m", "segrt.cli", "serve", artifact, "--port", "0", "--queue", "64",
                                 "--device", a.device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            t_start = time.perf_counter()
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()}")
            startup_s = time.perf_counter() - t_start
            url = line.split("listening on ")[1].split()[0]
            with httpx.Client(base_url=url, timeout=600) as c:
                health = c.get("/health").json()
                t0 = time.perf_counter()
                assert c.post("/segment", content=bodies[0]).status_code == 200
                warmup_s = time.perf_counter() - t0
            rss_idle = _proc_status(proc.pid)
            results = {}
            # one client
            lat, codes = [], []
            with httpx.Client(base_url=url, timeout=600) as c:
                w0 = time.perf_counter()
                for body in bodies:
                    t0 = time.perf_counter()
                    r = c.post("/segment", content=body)
                    lat.append(time.perf_counter() - t0)
                    codes.append(r.status_code)
                results["clients_1"] = _summary(lat, time.perf_counter() - w0, codes)
            # eight clients
            lat, codes, lock = [], [], threading.Lock()
            jobs = list(range(len(bodies)))

            def client():
                with httpx.Client(base_url=url, timeout=600) as c:
                    while True:
                        with lock:
                            if not jobs:
                                return
                            i = jobs.pop()
                        t0 = time.perf_counter()
                        r = c.post("/segment", content=bodies[i])
                        with lock:
                            lat.append(time.perf_counter() - t0)
                            codes.append(r.status_code)

            threads = [threading.Thread(target=client) for _ in range(8)]
            w0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results["clients_8"] = _summary(lat, time.perf_counter() - w0, codes)
            rss_end = _proc_status(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    record = {
        "benchmark": "serve", "date": datetime.date.today().isoformat(), "machine": machine_info(),
        "artifact": "tiny fixture (wholebody_small, random weights)" if a.artifact is None else str(a.artifact),
        "backend": health.get("backend"), "device": a.device, "shape": list(a.shape),
        "input_bytes_median": int(statistics.median(len(b) for b in bodies)),
        "server_startup_s": round(startup_s, 3), "warmup_request_s": round(warmup_s, 3), **results,
        "server_rss_mb_idle": rss_idle.get("VmRSS"), "server_rss_mb_end": rss_end.get("VmRSS"),
        "server_peak_rss_mb": rss_end.get("VmHWM"),
    }
    out = Path(a.out) if a.out else RESULTS / f"serve_cpu_{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
