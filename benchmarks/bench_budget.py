"""The 1.5 mm whole-body CT job under a RAM budget: `segrt run --max-memory SIZE`, peak RSS as the kernel counts it.

Writes (once, cached under ``--work``) a 512×512×397 CT phantom at 0.84 × 0.84 × 1.5 mm, LPS, stored as int16 HU as
scanners' NIfTI conversions store CT, and a random-weight artifact of the wholeBody_ct_segmentation bundle (105
classes, 96³ windows, 1.5 mm: the image is resampled to 287×287×397). Then runs ``segrt run ART CT -o LABELS
--max-memory SIZE --json`` in a child process and records the child's plan, timings, skipped windows and its peak
resident set (``VmHWM`` of the child, read by the child at its end), with the machine.

Random weights: the labels are meaningless; what is measured is memory and time of the pipeline (the windows run
do not depend on the weights; the skip rule depends on the image only).

    python benchmarks/bench_budget.py [--max-memory 1.9G] [--work /tmp/segrt-bench-budget] [--out FILE]

Result: ``benchmarks/results/budget_wholebody_1.5mm_cpu_<date>.json``.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._machine import machine_info  # noqa: E402

BUNDLE = ROOT.parent / "shared" / "bundles" / "wholeBody_ct_segmentation"

CHILD = r"""
import json, sys, time
t = time.perf_counter()
from segrt.cli import main
rc = main(["run", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--json", "--quiet", "--device", "cpu",
           "--max-memory", sys.argv[4]])
print("WALL", time.perf_counter() - t)
print("VMHWM", next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
sys.exit(rc)
"""


def ensure_inputs(work: Path, bundle: Path) -> tuple[Path, Path]:
    import nibabel as nib
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    ct = work / "ct_512x512x397_int16.nii.gz"
    if not ct.exists():
        from segrt.phantom import make_phantom

        image, _, affine, _ = make_phantom(shape=(512, 512, 397), spacing=(0.84, 0.84, 1.5), axcodes="LPS")
        img = nib.Nifti1Image(np.round(image).astype(np.int16), affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        tmp = work / "ct.tmp.nii.gz"
        nib.save(img, str(tmp))
        os.replace(tmp, ct)
    art = work / "wholebody_random"
    if not (art / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "segrt.cli", "export", str(bundle), "-o", str(art), "--random-init",
                        "--no-cpu-variants"], check=True)
    return ct, art


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-memory", default="1.9G")
    ap.add_argument("--bundle", default=str(BUNDLE))
    ap.add_argument("--work", default="/tmp/segrt-bench-budget")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         f"budget_wholebody_1.5mm_cpu_{time.strftime('%Y-%m-%d')}.json"))
    a = ap.parse_args(argv)
    from segrt.engine.budget import parse_size

    budget = parse_size(a.max_memory)
    ct, art = ensure_inputs(Path(a.work), Path(a.bundle))
    labels = Path(a.work) / "labels.nii.gz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()
    r = subprocess.run([sys.executable, "-c", CHILD, str(art), str(ct), str(labels), a.max_memory],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    text = r.stdout
    report = json.loads(text[:text.index("WALL")])
    wall = float(text.split("WALL", 1)[1].split()[0])
    vmhwm = int(text.split("VMHWM", 1)[1].split()[0])
    plan = report.get("memory_plan") or {}
    out = {
        "benchmark": "segrt run --max-memory on the wholeBody 1.5 mm job (random weights), one child process",
        "date": time.strftime("%Y-%m-%d"), "machine": {**machine_info(), "load_before": load},
        "input": {"shape": [512, 512, 397], "spacing_mm": [0.84, 0.84, 1.5], "dtype": "int16", "kind": "CT phantom"},
        "preprocessed_shape": report.get("preprocessed_shape"),
        "budget_bytes": budget, "budget": a.max_memory,
        "peak_rss_bytes": vmhwm, "peak_rss_gib": round(vmhwm / 2 ** 30, 3),
        "within_budget": vmhwm <= budget, "within_2_gib": vmhwm <= 2 * 2 ** 30,
        "predicted_peak_gib": round(plan.get("peak_bytes", 0) / 2 ** 30, 3),
        "wall_seconds_incl_imports": round(wall, 1),
        "memory_plan": plan,
        "windows": report.get("windows"), "windows_skipped": report.get("windows_skipped"),
        "timings": report.get("timings"), "backend": report.get("backend"),
    }
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("peak_rss_gib", "predicted_peak_gib", "within_budget",
                                          "wall_seconds_incl_imports", "windows", "windows_skipped")}, indent=2))
    return 0 if vmhwm <= budget else 1


if __name__ == "__main__":
    raise SystemExit(main())
