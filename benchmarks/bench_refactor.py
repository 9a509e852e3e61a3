"""Before/after benchmark of ``segrt run`` on the CPU: two checkouts of segrt, the same artifact, the same input.

Usage::

    git worktree add /tmp/seg_old <old commit>; git worktree add /tmp/seg_new HEAD
    python benchmarks/bench_refactor.py --old /tmp/seg_old --new /tmp/seg_new --runs 5 --spacing 1.5 3.0

What it does:

1. Checks that ``PYTHONPATH=<checkout> python -c "import segrt"`` imports each checkout's own ``segrt`` (an editable
   install of another clone must not shadow it) from the work directory the runs use, and records each checkout's
   commit (``git rev-parse HEAD``) and whether its tree is dirty.
2. Exports ``--bundle`` (default: the fixture ``tests/fixtures/bundles/wholebody_small``) ONCE with
   ``--export-with`` (default: the old checkout) and ``--random-init``, or reuses ``--artifact``; then checks that
   BOTH checkouts load it (``Engine.load``), so that a stricter manifest/spec check in one is reported, not hidden.
3. Writes, for each ``--spacing`` (isotropic, mm), a CT-like phantom once (``segrt.phantom.make_phantom`` of this
   checkout: the whole 320x320x240 mm field of view, LPS voxel order, int16 HU, gzipped NIfTI, seed 7).
4. For each spacing, ``--runs`` rounds of (old, new) - alternating, each run in its own fresh process started through
   ``benchmarks/_measure.py`` (so ``ru_maxrss`` is that process's own peak RSS) - of
   ``python -m segrt.cli run ART CT -o OUT --device cpu --json --quiet``; records the ``--json`` summary's stage
   timings, the process wall time, peak RSS, CPU time and the 1-minute load average before each run, and checks that
   every output's labels equal the first old run's (``np.array_equal``, same shape and affine).
5. Writes JSON (machine, versions, commits, artifact, inputs, every run, medians, new/old ratios of the medians) to
   ``--out`` (default ``benchmarks/results/refactor_cpu_<date>.json``) and prints a table.

``--merge A.json B.json ... --out OUT.json`` puts several such results (passes of the same checkouts, artifact and
inputs, e.g. one more pass on a busy machine) into one file: every pass as written, plus medians and ratios over the
runs of all passes per spacing.

The machine should be otherwise idle; when it is not, the alternation keeps old and new under the same conditions on
average, the per-run load average says how busy it was, and CPU time (user + sys) is less sensitive to it than wall
time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from segrt.artifact import sha256_file

REPO = Path(__file__).resolve().parents[1]
MEASURE = REPO / "benchmarks" / "_measure.py"
FIXTURE = REPO / "tests" / "fixtures" / "bundles" / "wholebody_small"
STAGES = ("load", "preprocess", "infer", "stitch", "invert", "write")
SIDES = ("old", "new")


def sh(cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict:
    from importlib import metadata

    def ver(d):
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            return None

    lscpu = {}
    try:
        for line in sh(["lscpu"]).splitlines():
            k, _, v = line.partition(":")
            lscpu[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), 0)
    return {
        "cpu_model": lscpu.get("Model name"),
        "cpus": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "ram_gib": round(mem / 1024 ** 2, 2),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(),
                     **{p: ver(p) for p in ("numpy", "torch", "onnxruntime", "onnx", "nibabel", "monai")}},
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }


def env_for(checkout: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def checkout_info(checkout: Path, work: Path) -> dict:
    where = sh([sys.executable, "-c", "import segrt; print(segrt.__file__)"], env=env_for(checkout), cwd=work)
    if Path(where).resolve() != (checkout / "segrt" / "__init__.py").resolve():
        raise SystemExit(f"PYTHONPATH={checkout} imports segrt from {where}, not from the checkout")
    dirty = sh(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"])
    return {"path": str(checkout), "commit": sh(["git", "-C", str(checkout), "rev-parse", "HEAD"]),
            "subject": sh(["git", "-C", str(checkout), "log", "-1", "--format=%s"]),
            "dirty": bool(dirty), "segrt_imported_from": where}


LOAD_CHECK = ("import sys; from segrt.engine.engine import Engine\n"
              "e = Engine.load(sys.argv[1], device='cpu'); print(type(e).__name__, 'loaded'); e.close()")


def load_check(checkout: Path, art: Path, work: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(art)], env=env_for(checkout), cwd=work,
                       capture_output=True, text=True)
    return {"ok": p.returncode == 0, "returncode": p.returncode,
            "message": (p.stdout + p.stderr).strip()[-2000:]}


def make_input(spacing: float, path: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from segrt.phantom import DEFAULT_FOV_MM, make_phantom, shape_for_fov

    sp = (spacing,) * 3
    shape = shape_for_fov(DEFAULT_FOV_MM, sp)
    if not path.exists():
        image, _, affine, _ = make_phantom(shape=shape, spacing=sp, axcodes="LPS", seed=7)
        img = nib.Nifti1Image(np.round(image).astype(np.int16), affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(path))
    return {"path": str(path), "shape": list(shape), "spacing_mm": list(sp), "axcodes": "LPS", "dtype": "int16",
            "fov_mm": list(DEFAULT_FOV_MM), "seed": 7, "maker": "segrt.phantom.make_phantom",
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def one_run(checkout: Path, art: Path, ct: Path, out: Path, work: Path) -> dict:
    res = out.with_suffix("").with_suffix(".measure.json")
    cmd = [sys.executable, "-m", "segrt.cli", "run", str(art), str(ct), "-o", str(out), "--device", "cpu",
           "--json", "--quiet"]
    la = loadavg()
    p = subprocess.run([sys.executable, str(MEASURE), str(res), "--", *cmd], env=env_for(checkout), cwd=work,
                       capture_output=True, text=True)
    m = json.loads(res.read_text())
    if m["returncode"] != 0:
        raise SystemExit(f"segrt run failed ({checkout}):\n{p.stdout}\n{p.stderr}")
    summary = json.loads(p.stdout)
    t = summary["timings"]
    return {"wall_s": m["wall_s"], "maxrss_mib": m["maxrss_mib"], "cpu_s": m["user_s"] + m["sys_s"],
            "user_s": m["user_s"], "sys_s": m["sys_s"], "loadavg_1min_before": la[0],
            "timings": t, "in_process_total_s": sum(t.values()),
            "backend": summary.get("backend"), "backend_reason": summary.get("backend_reason"),
            "windows_run": summary.get("windows_run"), "preprocessed_shape": summary.get("preprocessed_shape"),
            "memory_plan_peak_bytes": (summary.get("memory_plan") or {}).get("peak_bytes"),
            "output": str(out)}


def same_labels(a: Path, b: Path) -> bool:
    import nibabel as nib
    import numpy as np

    ia, ib = nib.load(str(a)), nib.load(str(b))
    return (ia.shape == ib.shape and np.allclose(ia.affine, ib.affine)
            and bool(np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj))))


def med(xs):
    return statistics.median(xs) if xs else None


def summarise(runs: dict) -> tuple[dict, dict]:
    keys = ["wall_s", "in_process_total_s", "cpu_s", "maxrss_mib"] + [f"timings.{s}" for s in STAGES]

    def get(r, k):
        if k.startswith("timings."):
            return r["timings"].get(k.split(".", 1)[1])
        return r[k]

    medians = {side: {k: med([v for r in runs[side] if (v := get(r, k)) is not None]) for k in keys}
               for side in SIDES}
    ratios = {k: (medians["new"][k] / medians["old"][k] if medians["old"][k] else None) for k in keys}
    # paired ratios (new run i / old run i of the same round): a second view, less sensitive to slow load drifts
    paired = {k: med([get(n, k) / get(o, k) for o, n in zip(runs["old"], runs["new"]) if get(o, k)])
              for k in ("wall_s", "in_process_total_s", "cpu_s", "maxrss_mib", "timings.infer")}
    return medians, {"median_new_over_median_old": ratios, "median_of_paired_new_over_old": paired}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, help="checkout (e.g. git worktree) of the old segrt")
    ap.add_argument("--new", type=Path, help="checkout of the new segrt")
    ap.add_argument("--runs", type=int, default=5, help="rounds of (old, new) per spacing")
    ap.add_argument("--spacing", type=float, nargs="+", default=[1.5], help="isotropic phantom spacing(s), mm")
    ap.add_argument("--bundle", type=Path, default=FIXTURE, help="bundle to export (random weights)")
    ap.add_argument("--artifact", type=Path, help="use this artifact instead of exporting one")
    ap.add_argument("--export-with", choices=SIDES, default="old", help="checkout that exports the artifact")
    ap.add_argument("--work", type=Path, default=Path("/tmp/segrt-bench-refactor"), help="scratch directory")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/refactor_cpu_<date>.json)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="RESULT", help="merge these results into --out")
    ap.add_argument("--note", help="a remark stored in the result (e.g. how busy the machine was)")
    a = ap.parse_args(argv)
    if a.merge:
        if not a.out:
            ap.error("--merge needs --out")
        return merge(a.merge, a.out, a.note)
    if not (a.old and a.new):
        ap.error("--old and --new are required")

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkouts = {"old": a.old.resolve(), "new": a.new.resolve()}
    info = {side: checkout_info(path, work) for side, path in checkouts.items()}
    for side in SIDES:
        print(f"{side}: {info[side]['commit'][:10]} {info[side]['subject'][:70]}  (segrt from "
              f"{info[side]['segrt_imported_from']})")
    load_before = loadavg()

    if a.artifact:
        art, export = a.artifact.resolve(), {"reused": str(a.artifact)}
    else:
        art = work / f"artifact_{a.export_with}"
        export = {"with": a.export_with, "commit": info[a.export_with]["commit"], "bundle": str(a.bundle),
                  "random_init": True}
        if not (art / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "segrt.cli", "export", str(a.bundle), "-o", str(art),
                            "--random-init", "--force"], env=env_for(checkouts[a.export_with]), cwd=work,
                           check=True, capture_output=True, text=True)
    manifest = json.loads((art / "manifest.json").read_text())
    export.update(path=str(art), manifest_versions=manifest.get("versions"),
                  onnx_sha256=sha256_file(art / "model_fp32.onnx") if (art / "model_fp32.onnx").exists() else None)
    loads = {side: load_check(checkouts[side], art, work) for side in SIDES}
    for side in SIDES:
        print(f"{side} loads the artifact: {loads[side]['ok']}" + ("" if loads[side]["ok"] else
                                                                     f"\n{loads[side]['message']}"))
    if not all(l["ok"] for l in loads.values()):
        return 1

    cases = []
    for spacing in a.spacing:
        ct = work / f"phantom_{spacing:g}mm.nii.gz"
        case = {"input": make_input(spacing, ct), "runs": {s: [] for s in SIDES}}
        print(f"\ninput {ct.name}: {case['input']['shape']} at {spacing:g} mm")
        for i in range(a.runs):
            for side in SIDES:
                out = work / f"labels_{spacing:g}mm_{side}_{i}.nii.gz"
                r = one_run(checkouts[side], art, ct, out, work)
                r["round"] = i
                case["runs"][side].append(r)
                print(f"  round {i} {side}: wall {r['wall_s']:6.2f} s  infer {r['timings']['infer']:6.2f} s  "
                      f"cpu {r['cpu_s']:6.2f} s  peak RSS {r['maxrss_mib']:7.1f} MiB  "
                      f"load {r['loadavg_1min_before']:.2f}")
        ref = Path(case["runs"]["old"][0]["output"])
        eq = {side: [same_labels(ref, Path(r["output"])) for r in case["runs"][side]] for side in SIDES}
        case["labels_equal_to_first_old_run"] = eq
        case["labels_identical_old_vs_new"] = all(all(v) for v in eq.values())
        case["medians"], case["ratios"] = summarise(case["runs"])
        cases.append(case)

    result = {
        "benchmark": "segrt run on the CPU, old vs new checkout (benchmarks/bench_refactor.py)",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": loadavg()},
        "checkouts": info,
        "artifact": {**export, "loads": loads},
        "command": "python -m segrt.cli run ART CT -o OUT --device cpu --json --quiet (PYTHONPATH=<checkout>)",
        "runs_per_side": a.runs,
        "order": "alternating old, new per round; each run a fresh process under benchmarks/_measure.py",
        "cases": cases,
        "note": a.note,
    }
    out = a.out or REPO / "benchmarks" / "results" / f"refactor_cpu_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print_table(cases)
    print(f"\nwrote {out}")
    return 0


def print_table(cases) -> None:
    for case in cases:
        print(f"{case['input']['spacing_mm'][0]:g} mm, labels identical old vs new: "
              f"{case['labels_identical_old_vs_new']}")
        print(f"  {'median':<22}{'old':>10}{'new':>10}{'new/old':>9}")
        for k, r in case["ratios"]["median_new_over_median_old"].items():
            o, n = case["medians"]["old"][k], case["medians"]["new"][k]
            print(f"  {k:<22}{o:10.3f}{n:10.3f}{(r if r is not None else float('nan')):9.3f}")


def merge(paths: list[Path], out: Path, note: str | None = None) -> int:
    passes = [json.loads(Path(p).read_text()) for p in paths]
    first = passes[0]
    for p, path in zip(passes[1:], paths[1:]):
        for side in SIDES:
            if p["checkouts"][side]["commit"] != first["checkouts"][side]["commit"]:
                raise SystemExit(f"{path}: {side} commit differs from {paths[0]}'s")
        if p["artifact"].get("onnx_sha256") != first["artifact"].get("onnx_sha256"):
            raise SystemExit(f"{path}: another artifact than {paths[0]}'s")
    combined = []
    for case in first["cases"]:
        sha = case["input"]["sha256"]
        same = [c for p in passes for c in p["cases"] if c["input"]["sha256"] == sha]
        runs = {side: [r for c in same for r in c["runs"][side]] for side in SIDES}
        medians, ratios = summarise(runs)
        combined.append({"input": case["input"], "passes": len(same), "runs_per_side": len(runs["old"]),
                         "labels_identical_old_vs_new": all(c["labels_identical_old_vs_new"] for c in same),
                         "medians": medians, "ratios": ratios})
    result = {"benchmark": first["benchmark"], "checkouts": first["checkouts"], "artifact": first["artifact"],
              "command": first["command"], "order": first["order"], "note": note,
              "combined": combined, "passes": passes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"all {len(passes)} passes:")
    print_table(combined)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
