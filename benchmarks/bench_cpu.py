"""CPU benchmark: MONAI's own bundle pipeline vs ``segrt run`` on the same weights and the same CT-like volume.

Usage (from anywhere; the repository is found from this file's location)::

    python benchmarks/bench_cpu.py                 # wholeBody_ct_segmentation, low-res (3 mm), 1 run each
    python benchmarks/bench_cpu.py --full          # high-res (1.5 mm) model and a 512x512x397 volume
    python benchmarks/bench_cpu.py --runs 3        # 3 runs each, alternating MONAI / segrt
    python benchmarks/bench_cpu.py --smoke         # small fixture bundle and a tiny volume (< 1 min): checks
                                                   # that the script works end to end

What it does:

1. Builds, or reuses from ``--work`` (default ``./bench-work``; it ignores itself for git), a copy of the bundle
   (``../shared/bundles/wholeBody_ct_segmentation``: SegResNet, 105 classes, exactly the bundle's architecture)
   with seeded random weights saved at the checkpoint path the bundle loads, and a segrt artifact exported
   from that copy, so that both sides run the *same* weights. The low-res run overrides
   ``displayable_configs#highres=false`` (3 mm, ``model_lowres.pt``); ``--full`` sets it true (1.5 mm).
2. Writes (or reuses) a whole-body-like phantom CT (``segrt.phantom.make_phantom``, LPS voxel order, int16 HU,
   gzipped NIfTI): default 288x288x200 at 1.5x1.5x3.0 mm, which the 3 mm pipeline resamples to 144x144x200;
   ``--full`` 512x512x397 at 0.84x0.84x1.5 mm, resampled to about 287x287x397 at 1.5 mm.
3. Runs, ``--runs`` times each and alternating (the first tool alternates per round), each in its own fresh
   process started through :mod:`benchmarks._measure` (so ``ru_maxrss`` is the peak RSS of that one process):

   - MONAI: ``python -m benchmarks.monai_pipeline`` - the bundle's preprocessing (LoadImaged ... reading the
     NIfTI), SlidingWindowInferer, and postprocessing incl. Invertd and SaveImaged (writing the NIfTI), with
     ``torch.set_num_threads(physical cores)``;
   - segrt: ``python -m segrt.cli run ARTIFACT INPUT -o OUT --json --quiet --device cpu`` (threads: segrt's
     default, the physical cores).

   and records per-stage wall times, process wall time (incl. interpreter start and imports), peak RSS,
   CPU time, windows run, and the fraction of voxels on which the two label images agree.
4. Writes JSON (machine, versions, config, every run, medians, ratios) to
   ``benchmarks/results/cpu_<3mm|1.5mm>_<YYYY-MM-DD>.json`` (``--smoke``: under the work directory), prints a
   table, and draws ``<same name>.png`` when matplotlib is installed (it is not a segrt dependency).

Ratios: ``speedup`` = MONAI median in-process total / segrt median in-process total (sum of the stages);
``speedup_wall`` the same for whole-process wall times; ``memory_ratio`` = MONAI median peak RSS / segrt
median peak RSS.

The machine should be otherwise idle while this runs; the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import _machine  # noqa: E402
from benchmarks.monai_pipeline import bundle_with_weights  # noqa: E402

from benchmarks._paths import RESULTS, SMOKE_BUNDLE, WHOLEBODY  # noqa: E402
from segrt.artifact import sha256_file  # noqa: E402

#: name -> (phantom shape, phantom spacing mm, bundle overrides)
CONFIGS = {
    "3mm": ((288, 288, 200), (1.5, 1.5, 3.0), {"displayable_configs#highres": False}),
    "1.5mm": ((512, 512, 397), (0.84, 0.84, 1.5), {"displayable_configs#highres": True}),
}
SMOKE_PHANTOM = ((48, 48, 100), (4.0, 4.0, 3.0))

TOOLS = ("monai", "segrt")


# ---------------------------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------------------------

def machine_info() -> dict:
    return _machine.machine_info()


# ---------------------------------------------------------------------------------------------
# inputs: bundle copy with weights + artifact, phantom
# ---------------------------------------------------------------------------------------------


def _work_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by benchmarks/bench_cpu.py: nothing in here belongs in git\n*\n")
    return path


def prepare_model(work: Path, source: Path, overrides: dict, seed: int, rebuild: bool, log) -> tuple[Path, Path]:
    """(bundle copy with seeded weights, artifact exported from it), reused when the cache matches."""
    from segrt.artifact import Artifact

    parts = [source.name] + [f"{k.split('#')[-1]}-{v}" for k, v in sorted(overrides.items())] + [f"seed{seed}"]
    tag = "_".join(parts)
    root = work / "models" / tag
    bundle, artifact, stamp = root / "bundle", root / "artifact", root / "build.json"
    key = {"source": str(source.resolve()), "overrides": overrides, "seed": seed,
           "configs_sha256": {p.name: sha256_file(p) for p in sorted((source / "configs").glob("*.json"))}}
    if not rebuild and stamp.is_file():
        try:
            rec = json.loads(stamp.read_text())
            art = Artifact.load(artifact)  # verifies the model files' sha256
            ok = (rec.get("key") == key and sha256_file(Path(rec["checkpoint"])) == rec["checkpoint_sha256"]
                  == art.manifest.get("weights", {}).get("sha256"))
        except Exception as exc:  # noqa: BLE001 - any damage to the cache means rebuild
            log(f"cache at {root} unusable ({type(exc).__name__}: {exc}); rebuilding")
            ok = False
        if ok:
            log(f"reusing bundle copy and artifact in {root}")
            return bundle, artifact
    from segrt.export import export

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"writing {source.name} with seeded random weights (seed {seed}) to {bundle}")
    ckpt = bundle_with_weights(source, bundle, seed=seed, overrides=overrides)
    log(f"exporting {bundle} -> {artifact} (ONNX export + accuracy gate; this can take minutes)")
    export(bundle, artifact, overrides=overrides or None)
    stamp.write_text(json.dumps({"key": key, "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt),
                                 "build_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return bundle, artifact


def prepare_phantom(work: Path, shape, spacing, seed: int, log, dtype: str = "int16") -> Path:
    import nibabel as nib
    import numpy as np

    from segrt.phantom import make_phantom

    path = work / "inputs" / (f"phantom_{'x'.join(map(str, shape))}_{'x'.join(f'{s:g}' for s in spacing)}"
                              f"_seed{seed}_{dtype}.nii.gz")
    if path.is_file():
        try:
            hdr = nib.load(str(path)).header
            if tuple(hdr.get_data_shape()) == tuple(shape) and np.allclose(hdr.get_zooms()[:3], spacing):
                log(f"reusing phantom {path}")
                return path
        except Exception:  # noqa: BLE001
            pass
    log(f"writing phantom CT {'x'.join(map(str, shape))} at {'x'.join(f'{s:g}' for s in spacing)} mm to {path}")
    image, _, affine, _ = make_phantom(shape, spacing, axcodes="LPS", seed=seed)
    if dtype == "int16":  # as CT scanners store them: integer HU
        data = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        data = image.astype(np.float32)
    del image
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------

def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ChildFailed(RuntimeError):
    """A benchmarked process exited non-zero (or was killed, e.g. by the OOM killer); carries its measurement."""

    def __init__(self, message: str, measurement: dict):
        super().__init__(message)
        self.measurement = measurement


def _measured(cmd: list[str], run_dir: Path, name: str) -> dict:
    """Run ``cmd`` under the measuring launcher; returns its measurement plus the command's stdout."""
    meas = run_dir / f"{name}.measure.json"
    out, err = run_dir / f"{name}.stdout", run_dir / f"{name}.stderr"
    full = [sys.executable, "-m", "benchmarks._measure", str(meas), "--", *cmd]
    with open(out, "w") as fo, open(err, "w") as fe:
        rc = subprocess.call(full, cwd=REPO, env=_child_env(), stdout=fo, stderr=fe)
    tail = err.read_text()[-3000:] if err.is_file() else ""
    if not meas.is_file():
        raise RuntimeError(f"the measuring launcher failed (exit {rc}) for {name}:\n{tail}")
    m = json.loads(meas.read_text())
    if m["returncode"] != 0:
        how = (f"killed by signal {-m['returncode']}" + (" (SIGKILL: out of memory?)" if m["returncode"] == -9
                                                         else "")
               if m["returncode"] < 0 else f"exit status {m['returncode']}")
        m.update(stderr_tail=tail)
        raise ChildFailed(f"{name} failed ({how}) after {m['wall_s']:.1f} s at peak RSS "
                          f"{m['maxrss_mib']:.0f} MiB: {' '.join(cmd)}\n--- stderr (tail) ---\n{tail}", m)
    m["stdout"] = out.read_text()
    return m


def run_monai(bundle: Path, image: Path, overrides: dict, threads: int, run_dir: Path, name: str) -> dict:
    result = run_dir / f"{name}.result.json"
    out_dir = run_dir / f"{name}_out"
    cmd = [sys.executable, "-m", "benchmarks.monai_pipeline", str(bundle), str(image), "-o", str(out_dir),
           "--result", str(result), "--threads", str(threads)]
    for k, v in overrides.items():
        cmd += ["--override", f"{k}={json.dumps(v)}"]
    m = _measured(cmd, run_dir, name)
    res = json.loads(result.read_text())
    stages = res["timings"]
    return {"stages": stages, "windows": res["windows"], "preprocessed_shape": res["preprocessed_shape"],
            "threads": res["threads"], "output": res["output"], **_common(m, stages)}


def run_segrt(artifact: Path, image: Path, threads: int | None, run_dir: Path, name: str) -> dict:
    out = run_dir / f"{name}_out.nii.gz"
    cmd = [sys.executable, "-m", "segrt.cli", "run", str(artifact), str(image), "-o", str(out),
           "--json", "--quiet", "--device", "cpu"]
    if threads:
        cmd += ["--threads", str(threads)]
    m = _measured(cmd, run_dir, name)
    try:
        res = json.loads(m["stdout"])
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"segrt run --json printed no JSON ({exc}): {m['stdout'][:500]!r}") from None
    stages = res["timings"]
    return {"stages": stages, "windows": res.get("windows"), "preprocessed_shape": res.get("preprocessed_shape"),
            "backend": res.get("backend"), "output": str(out), **_common(m, stages)}


def _common(m: dict, stages: dict) -> dict:
    total = float(sum(stages.values()))
    return {"total_s": total, "wall_s": m["wall_s"], "startup_s": m["wall_s"] - total,
            "maxrss_mib": m["maxrss_mib"], "user_s": m["user_s"], "sys_s": m["sys_s"],
            "launcher_maxrss_mib": m["launcher_maxrss_mib"]}


def label_agreement(path_a: str, path_b: str) -> dict:
    import nibabel as nib
    import numpy as np

    ia, ib = nib.load(path_a), nib.load(path_b)
    a = np.asanyarray(ia.dataobj)
    b = np.asanyarray(ib.dataobj)
    a = a.reshape(a.shape[:3]) if a.ndim > 3 and all(n == 1 for n in a.shape[3:]) else a
    b = b.reshape(b.shape[:3]) if b.ndim > 3 and all(n == 1 for n in b.shape[3:]) else b
    rec = {"shape_monai": list(a.shape), "shape_segrt": list(b.shape),
           "affine_max_abs_diff": float(np.abs(ia.affine - ib.affine).max())}
    if a.shape != b.shape:
        rec["agreement"] = None
        rec["note"] = "label images differ in shape"
        return rec
    a = np.rint(a).astype(np.int64)
    b = np.rint(b).astype(np.int64)
    eq = a == b
    rec.update(agreement=float(eq.mean()), disagreeing_voxels=int(eq.size - eq.sum()), voxels=int(eq.size),
               labels_present_monai=int(len(np.unique(a))), labels_present_segrt=int(len(np.unique(b))))
    return rec


# ---------------------------------------------------------------------------------------------
# summary, table, chart
# ---------------------------------------------------------------------------------------------

def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def summarize(runs: list[dict]) -> dict:
    med = {}
    for tool in TOOLS:
        rs = [r for r in runs if r["tool"] == tool and not r.get("failed")]
        stages = {k: _median([r["stages"].get(k) for r in rs]) for k in rs[0]["stages"]} if rs else {}
        med[tool] = {"stages": stages, **{k: _median([r[k] for r in rs])
                                          for k in ("total_s", "wall_s", "startup_s", "maxrss_mib", "user_s")}}
    m, s = med["monai"], med["segrt"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    ratios = {"speedup": ratio(m["total_s"], s["total_s"]), "speedup_wall": ratio(m["wall_s"], s["wall_s"]),
              "memory_ratio": ratio(m["maxrss_mib"], s["maxrss_mib"])}
    return {"medians": med, "ratios": ratios}


def _fmt(v, unit="s"):
    if v is None:
        return "-"
    return f"{v:.2f} {unit}" if unit == "s" else f"{v:.0f} {unit}"


def print_table(report: dict, out=sys.stdout) -> None:
    med = report["medians"]
    cfg = report["config"]
    print(f"\n{cfg['bundle']}  {cfg['resolution']}  input {'x'.join(map(str, cfg['input_shape']))} "
          f"@ {'x'.join(f'{s:g}' for s in cfg['input_spacing'])} mm  ({cfg['runs']} run(s) each, "
          f"{report['machine']['physical_cores']} physical cores: {report['machine']['cpu_model']})", file=out)
    rows = [("MONAI stages", None)]
    rows += [(f"  {k}", (med["monai"]["stages"][k], None)) for k in med["monai"]["stages"]]
    rows += [("segrt stages", None)]
    rows += [(f"  {k}", (None, med["segrt"]["stages"][k])) for k in med["segrt"]["stages"]]
    rows += [("in-process total", (med["monai"]["total_s"], med["segrt"]["total_s"])),
             ("process wall", (med["monai"]["wall_s"], med["segrt"]["wall_s"])),
             ("  of which start+imports", (med["monai"]["startup_s"], med["segrt"]["startup_s"])),
             ("CPU user time", (med["monai"]["user_s"], med["segrt"]["user_s"]))]
    print(f"{'median':<28}{'MONAI':>12}{'segrt':>12}", file=out)
    for label, vals in rows:
        if vals is None:
            print(label, file=out)
        else:
            print(f"{label:<28}{_fmt(vals[0]):>12}{_fmt(vals[1]):>12}", file=out)
    print(f"{'peak RSS':<28}{_fmt(med['monai']['maxrss_mib'], 'MiB'):>12}"
          f"{_fmt(med['segrt']['maxrss_mib'], 'MiB'):>12}", file=out)
    r = report["ratios"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    agree = [a["agreement"] for a in report["agreement"] if a.get("agreement") is not None]
    agree_text = (f"{min(agree):.6f}" if agree else "- (label images differ in shape)" if report["agreement"]
                  else "- (no round with both outputs)")
    print(f"speedup (in-process) {x(r['speedup'])}, speedup (wall) {x(r['speedup_wall'])}, "
          f"memory ratio {x(r['memory_ratio'])}; windows {report['windows']}; "
          f"label agreement (min over rounds) {agree_text}", file=out)


def draw_chart(report: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib to get one)"
    med = report["medians"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    for i, tool in enumerate(TOOLS):
        bottom = 0.0
        stages = dict(med[tool]["stages"])
        startup = med[tool]["startup_s"] or 0.0
        for name, v in [("start+imports", max(startup, 0.0)), *stages.items()]:
            ax_t.barh(i, v or 0.0, left=bottom, label=f"{tool}: {name}")
            if (v or 0.0) > 0.06 * (med[tool]["wall_s"] or 1):
                ax_t.text(bottom + v / 2, i, name, ha="center", va="center", fontsize=7, rotation=90)
            bottom += v or 0.0
    ax_t.set_yticks(range(len(TOOLS)), ["MONAI", "segrt"])
    ax_t.set_xlabel("median wall time per stage (s)")
    r = {k: (float("nan") if v is None else v) for k, v in report["ratios"].items()}
    ax_t.set_title(f"{report['config']['bundle']} {report['config']['resolution']}: "
                   f"speedup {r['speedup']:.2f}x (wall {r['speedup_wall']:.2f}x)", fontsize=9)
    ax_m.bar(["MONAI", "segrt"], [med[t]["maxrss_mib"] or 0 for t in TOOLS], color=["tab:gray", "tab:blue"])
    ax_m.set_ylabel("peak RSS (MiB)")
    ax_m.set_title(f"memory ratio {r['memory_ratio']:.2f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart written to {path}"


def _memory_note(artifact: Path, shape, spacing, ram_gib) -> str | None:
    """Warn when MONAI's full-volume (classes x volume) float32 arrays are unlikely to fit in RAM."""
    from segrt.artifact import Artifact

    spec = Artifact.load(artifact).spec
    if spec.preprocessing.spacing is None or not ram_gib:
        return None
    vox = 1.0
    for n, s, t in zip(shape, spacing, spec.preprocessing.spacing.pixdim):
        vox *= max(1.0, n * s / t)
    gib = 3 * spec.num_classes * vox * 4 / 1024 ** 3  # stitched logits, softmax, Invertd/argmax copies
    if gib > 0.8 * ram_gib:
        return (f"warning: MONAI keeps {spec.num_classes} x ~{vox / 1e6:.0f} M voxel float32 arrays; expect a peak "
                f"of roughly {gib:.0f} GiB or more against {ram_gib:.0f} GiB RAM: its run may be killed "
                f"(it is then recorded as failed)")
    return None


def _result_path(args, resolution: str, work: Path) -> Path:
    if args.out:
        return Path(args.out)
    date = dt.date.today().isoformat()
    if args.smoke:
        return work / "results" / f"cpu_smoke_{resolution}_{date}.json"
    base = RESULTS / f"cpu_{resolution}_{date}.json"
    n = 2
    while base.exists():  # never overwrite an earlier result of the same day
        base = RESULTS / f"cpu_{resolution}_{date}_{n}.json"
        n += 1
    return base


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_cpu.py",
                                description="CPU benchmark: MONAI bundle pipeline vs segrt run.")
    p.add_argument("--full", action="store_true", help="high-res model (1.5 mm) on a 512x512x397 volume")
    p.add_argument("--smoke", action="store_true", help="small fixture bundle and a tiny volume (end-to-end check)")
    p.add_argument("--runs", type=int, default=1, help="runs of each tool (alternating; default 1)")
    p.add_argument("--work", default="bench-work", help="cache / scratch directory (default ./bench-work)")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/cpu_<res>_<date>.json)")
    p.add_argument("--bundle", default=None, help="bundle to benchmark (default: the shared wholeBody bundle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the phantom")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both (default: physical cores; segrt gets no --threads then)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the bundle copy and artifact even if cached")
    p.add_argument("--input-dtype", choices=["int16", "float32"], default="int16",
                   help="storage type of the phantom CT (default int16, integer HU as scanners write them)")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error(f"--runs must be >= 1, got {a.runs}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    resolution = "1.5mm" if a.full else "3mm"
    shape, spacing, overrides = CONFIGS[resolution]
    if a.smoke:
        shape, spacing = SMOKE_PHANTOM
    source = Path(a.bundle) if a.bundle else (SMOKE_BUNDLE if a.smoke else WHOLEBODY)
    if not (source / "configs" / "inference.json").is_file():
        p.error(f"no MONAI bundle at {source} (expected {source / 'configs' / 'inference.json'}); "
                f"pass --bundle DIR")
    work = _work_dir(Path(a.work).absolute())
    result_path = _result_path(a, resolution, work)

    machine = machine_info()
    threads = a.threads or machine["physical_cores"]
    load_before = os.getloadavg()
    bundle, artifact = prepare_model(work, source, overrides, a.seed, a.rebuild, log)
    image = prepare_phantom(work, shape, spacing, a.seed, log, a.input_dtype)

    mem_note = _memory_note(artifact, shape, spacing, machine["ram_gib"])
    if mem_note:
        log(mem_note)
    run_dir = work / "runs" / f"{'smoke_' if a.smoke else ''}{resolution}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    runs, agreement = [], []
    for i in range(a.runs):
        order = TOOLS if i % 2 == 0 else TOOLS[::-1]
        outputs = {}
        for tool in order:
            name = f"r{i}_{tool}"
            log(f"round {i + 1}/{a.runs}: {tool}")
            try:
                if tool == "monai":
                    r = run_monai(bundle, image, overrides, threads, run_dir, name)
                else:
                    r = run_segrt(artifact, image, a.threads, run_dir, name)
            except ChildFailed as exc:
                m = exc.measurement
                r = {"failed": str(exc).splitlines()[0], "returncode": m["returncode"], "wall_s": m["wall_s"],
                     "maxrss_mib": m["maxrss_mib"], "user_s": m["user_s"], "sys_s": m["sys_s"],
                     "stderr_tail": m.get("stderr_tail", "")}
                log(f"  {exc}")
            r.update(tool=tool, round=i, position=order.index(tool))
            runs.append(r)
            if r.get("failed"):
                continue
            outputs[tool] = r["output"]
            log(f"  {tool}: {r['total_s']:.2f} s in process, {r['wall_s']:.2f} s wall, "
                f"peak RSS {r['maxrss_mib']:.0f} MiB, {r['windows']} windows")
        if len(outputs) == 2:
            agreement.append({"round": i, **label_agreement(outputs["monai"], outputs["segrt"])})
    load_after = os.getloadavg()

    ok = [r for r in runs if not r.get("failed")]
    windows = sorted({r["windows"] for r in ok})
    notes = [f"{r['tool']} round {r['round']} FAILED: {r['failed']}" for r in runs if r.get("failed")]
    if len(windows) > 1:
        notes.append(f"the tools ran different numbers of windows: {windows}")
    report = {
        "benchmark": "cpu", "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {**machine, "loadavg_before": list(load_before), "loadavg_after": list(load_after)},
        "config": {"bundle": source.name, "bundle_path": str(source), "resolution": resolution,
                   "overrides": overrides, "smoke": a.smoke, "runs": a.runs, "seed": a.seed, "threads": threads,
                   "segrt_threads_flag": a.threads, "input": str(image), "input_shape": list(shape),
                   "input_spacing": list(spacing), "input_dtype": a.input_dtype, "input_axcodes": "LPS",
                   "preprocessed_shape": ok[0]["preprocessed_shape"] if ok else None, "artifact": str(artifact),
                   "monai_command": "python -m benchmarks.monai_pipeline (preprocessing, SlidingWindowInferer, "
                                    "postprocessing incl. Invertd + SaveImaged)",
                   "segrt_command": "python -m segrt.cli run ARTIFACT INPUT -o OUT.nii.gz --json --quiet "
                                    "--device cpu",
                   "random_weights": "seeded random weights, identical for both tools (not a trained model)"},
        "windows": windows[0] if len(windows) == 1 else (windows or None),
        "runs": runs, "agreement": agreement, **summarize(runs), "notes": notes,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    chart = None
    if not a.no_chart:
        chart = draw_chart(report, result_path.with_suffix(".png"))
        report["notes"].append(chart)
    result_path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    for n in report["notes"]:
        print(f"note: {n}")
    print(f"results written to {result_path}")
    return 1 if any(r.get("failed") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
