"""Throughput of many small scans three ways: ``segrt run`` in a loop (one process, one model load per case),
``segrt batch --workers W`` (the local process pool: one load per worker) and ``segrt batch --ray local``.

The model is the reduced whole-body fixture bundle (tests/fixtures/bundles/wholebody_small) exported with random
weights; the scans are CT-like phantoms (different seeds). Every way writes into a fresh folder; the batch outputs
are checked to equal the loop's labels. Cases/minute are wall-clock, process start-up and model loads included (that
is what the batch saves). Results: ``benchmarks/results/batch_cpu_<date>.json``.

    python benchmarks/bench_batch.py [--cases 8] [--shape 80,80,40] [--workers 2] [--no-ray]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import machine_info  # noqa: E402
from benchmarks._paths import RESULTS, SMOKE_BUNDLE  # noqa: E402


def _segrt(*args) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "segrt.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"segrt {' '.join(map(str, args))} failed:\n{r.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    import nibabel as nib
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", default="80,80,40")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from parity_util import ct_like, lps_affine, write_volume

    from segrt.export import export

    with tempfile.TemporaryDirectory(prefix="segrt-bench-batch-") as tmp:
        tmp = Path(tmp)
        art = export(SMOKE_BUNDLE, tmp / "artifact", random_init=True, gate_samples=1)
        scans = tmp / "scans"
        scans.mkdir()
        for i in range(a.cases):
            write_volume(scans / f"case{i:02d}.nii.gz", ct_like(shape, seed=100 + i), lps_affine((1.5, 1.5, 3.0)))
        files = sorted(scans.glob("*.nii.gz"))
        ways = {}

        loop = tmp / "loop"
        loop.mkdir()
        t0 = time.perf_counter()
        for f in files:
            _segrt("run", art, f, "-o", loop / f.name, "-q", "--device", "cpu")
        ways["segrt run loop"] = time.perf_counter() - t0

        runs = [(f"segrt batch --workers {a.workers}", ["--workers", a.workers])]
        if not a.no_ray:
            try:
                import ray  # noqa: F401

                runs.append((f"segrt batch --ray local --workers {a.workers}", ["--ray", "local", "--workers",
                                                                                a.workers]))
            except ImportError:
                print("ray not installed: --ray local left out", file=sys.stderr)
        for name, extra in runs:
            out = tmp / name.replace(" ", "_").replace("-", "")
            ways[name] = _segrt("batch", art, scans, "-o", out, "-q", "--device", "cpu", *extra)
            for f in files:
                same = np.array_equal(np.asarray(nib.load(str(out / f.name)).dataobj),
                                      np.asarray(nib.load(str(loop / f.name)).dataobj))
                if not same:
                    raise SystemExit(f"{name}: labels of {f.name} differ from 'segrt run'")
        one = tmp / "one"
        ways["segrt batch --workers 1"] = _segrt("batch", art, scans, "-o", one, "-q", "--device", "cpu")

    result = {
        "benchmark": "batch_cpu",
        "date": datetime.date.today().isoformat(),
        "cases": a.cases, "shape": list(shape), "model": "wholebody_small fixture bundle (random weights)",
        "note": "wall-clock per way, process start-up and model loads included; batch labels equal the loop's",
        "ways": {k: {"seconds": round(v, 2), "cases_per_minute": round(a.cases / v * 60, 1)} for k, v in ways.items()},
        "machine": machine_info(),
    }
    for k, v in result["ways"].items():
        print(f"{k:40s} {v['seconds']:7.1f} s  {v['cases_per_minute']:6.1f} cases/min")
    out = Path(a.out) if a.out else RESULTS / f"batch_cpu_{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
