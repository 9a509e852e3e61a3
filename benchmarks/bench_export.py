"""How long `segrt export` takes and how much memory it needs, stage by stage.

Exports a bundle (default: the wholeBody CT bundle of ``../shared/bundles``, 105 classes, 96³ windows, seeded random
weights when its weights file is absent) with the CLI's defaults (the CPU variants this machine runs fast: OpenVINO
bf16 where the CPU computes bf16 natively) in a child process that samples its own RSS every 50 ms, and records the
wall time and peak RSS of each stage (the export's progress lines) and of the whole export.

    python benchmarks/bench_export.py [BUNDLE] [--int8] [--out FILE]

Result: ``benchmarks/results/export_cpu_<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, threading, time, warnings, shutil
warnings.simplefilter("ignore")
t_import = time.perf_counter()
import segrt.export as E
from segrt.export.cpu_variants import auto_cpu_variants
stages, cur = [], {"name": "start", "t": time.perf_counter(), "peak": 0}
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def sample():
    while True:
        cur["peak"] = max(cur["peak"], rss()); time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
def progress(msg):
    now = time.perf_counter()
    stages.append({"stage": cur["name"], "seconds": round(now - cur["t"], 2), "peak_rss_gib": round(cur["peak"] / 2**30, 3)})
    cur.update(name=msg, t=now, peak=rss())
src, out, int8 = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
shutil.rmtree(out, ignore_errors=True)
variants = auto_cpu_variants() + (("openvino-int8",) if int8 else ())
t0 = time.perf_counter()
E.export(src, out, random_init=True, cpu_variants=variants, progress=progress)
progress("done")
m = json.load(open(out + "/manifest.json"))
print(json.dumps({"stages": stages, "export_seconds": round(time.perf_counter() - t0, 2), "cpu_variants": list(variants),
                  "gates": {v: {k: g.get(k) for k in ("passed", "worst_class_dice", "seconds_per_window",
                                                          "fp32_seconds_per_window")} for v, g in m["gate"].items()},
                  "random_weights": m["weights"].get("random_init")}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=str(ROOT.parent / "shared" / "bundles" / "wholeBody_ct_segmentation"))
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"export_cpu_{time.strftime('%Y-%m-%d')}.json"))
    a = ap.parse_args(argv)
    work = Path("/tmp") / f"segrt-bench-export-{os.getpid()}"
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", CHILD, a.bundle, str(work),
                        "1" if a.int8 else "0"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    peak_kib = int(r.stderr.strip().splitlines()[-1])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    out = {"benchmark": "segrt export (CLI defaults), one child process", "date": time.strftime("%Y-%m-%d"),
           "bundle": Path(a.bundle).name, "machine": {"cpu": cpu, "threads": len(os.sched_getaffinity(0)),
                                                      "load_before": os.getloadavg()},
           "wall_seconds_incl_imports": round(wall, 2), "peak_rss_gib": round(peak_kib / 2 ** 20, 3), **res}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
