"""Whole-brain MRI configuration (UNesT's inference settings): window count and time vs overlap, and
MONAI's pipeline vs segrt on the same run.

Usage (from anywhere; the repository is found from this file's location)::

    python benchmarks/bench_brain.py                       # 160³ at 1 mm, overlaps 0.7 / 0.5 / 0.25, MONAI at 0.7
    python benchmarks/bench_brain.py --shape 256,256,256   # UNesT's real input size (343 windows at 0.7; hours)
    python benchmarks/bench_brain.py --transformers        # also: full-size SwinUNETR / UNETR (96³, 133 ch) exports
    python benchmarks/bench_brain.py --smoke               # tiny volume and roi, to check the script (< 1 min)

The real UNesT network code ships with the bundle's own ``scripts/`` (not with monai) and is not in this
repository, so the model is the brain fixture's transformer (``tests/fixtures/bundles/brain_small/scripts``:
patch embedding, windowed self-attention, LayerNorm, GELU, convolutional decoder) at UNesT's roi (96³) with
UNesT's 133 classes and label table, seeded random weights; every other setting is UNesT's
(``configs/inference.json``: no spatial preprocessing, NormalizeIntensityd(nonzero, channel_wise), overlap 0.7,
sw_batch 4, constant blending, softmax → Invertd → argmax). The network is much cheaper than UNesT, so the
per-window times here are *not* UNesT's; window counts, the stitching / postprocessing cost of 133 classes and
the agreement between overlaps are what the numbers say.

Steps, in one process (peak RSS is read from ``/proc/self/status`` VmHWM after each step: monotonic, so the
MONAI step, run last, shows the larger of both):

1. the bundle copy (fixture configs, 133 classes, roi 96³, UNesT's metadata when ``../shared`` has it) with
   seeded weights in ``models/model.pt``, and ``segrt export`` of it (timed);
2. a skull-stripped-T1-like volume at 1 mm (exact-zero background) with an oblique affine;
3. ``segrt`` (ONNX Runtime CPU, ``Engine.load(..., overlap=X)``) for each overlap: windows, stage times, label
   agreement with the overlap-0.7 labels;
4. MONAI's own pipeline (the bundle's preprocessing, SlidingWindowInferer, postprocessing incl. Invertd) at
   0.7 with ``torch.set_num_threads(physical cores)``: stage times, windows, label agreement with segrt 0.7.

JSON goes to ``benchmarks/results/brain_<YYYY-MM-DD>.json`` (``--smoke``: under the work directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks.bench_cpu import machine_info  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "bundles" / "brain_small"
UNEST = REPO.parent / "shared" / "bundles" / "wholeBrainSeg_Large_UNEST_segmentation"
RESULTS = REPO / "benchmarks" / "results"


def _log(msg: str) -> None:
    print(f"[bench_brain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def _triple(text: str):
    vals = [int(v) for v in text.split(",")]
    return tuple(vals * 3 if len(vals) == 1 else vals)


def make_bundle(work: Path, classes: int, roi: int, seed: int) -> Path:
    """The fixture bundle at UNesT's roi and class count, with seeded weights where its handler loads them."""
    from benchmarks.monai_pipeline import save_random_weights

    dst = work / "bundle"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    cfg_path = dst / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["network_def"]["out_channels"] = classes
    cfg["inferer"]["roi_size"] = [roi] * 3
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if classes == 133 and (UNEST / "configs" / "metadata.json").is_file():
        shutil.copyfile(UNEST / "configs" / "metadata.json", dst / "configs" / "metadata.json")
    else:
        meta = json.loads((dst / "configs" / "metadata.json").read_text())
        out = meta["network_data_format"]["outputs"]["pred"]
        out["num_channels"] = classes
        out["channel_def"] = {k: v for k, v in out["channel_def"].items() if int(k) < classes}
        (dst / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    save_random_weights(dst, seed=seed, perturb_bn=False)  # the network's own init from the seed, as before
    return dst


def run_monai(bundle: Path, image: Path, out_dir: Path, threads: int) -> dict:
    """The bundle's own preprocessing → SlidingWindowInferer → postprocessing (benchmarks.monai_pipeline)."""
    import nibabel as nib
    import numpy as np

    from benchmarks.monai_pipeline import run_pipeline

    r = run_pipeline(bundle, image, out_dir, threads=threads)
    labels = np.asarray(nib.load(r["output"]).dataobj).astype(np.uint8)
    return {"timings": r["timings"], "total_s": sum(r["timings"].values()), "windows": r["windows"],
            "threads": r["threads"], "labels": labels}


def run_segrt(artifact: Path, image: Path, overlap: float | None, threads: int | None, out: Path) -> dict:
    from segrt.engine.engine import Engine

    t0 = time.perf_counter()
    with Engine.load(artifact, device="cpu", threads=threads, overlap=overlap) as eng:
        load = time.perf_counter() - t0
        seg = eng.segment(image, output=out, progress=False)
    timings = dict(seg.timings)
    timings["load"] += load
    return {"timings": timings, "total_s": sum(timings.values()), "windows": seg.metadata["windows"],
            "overlap": seg.metadata["overlap"][0], "overlap_overridden": seg.metadata["overlap_overridden"],
            "labels": seg.labels}


def transformer_exports(work: Path, classes: int, roi: int) -> list[dict]:
    """Full-size SwinUNETR and UNETR (roi³, ``classes`` outputs): ONNX export (auto: dynamo, then TorchScript)
    and the fp32 accuracy gate, timed."""
    import torch
    from monai.networks.nets import SwinUNETR, UNETR

    from segrt.export.gate import run_gate
    from segrt.export.onnx import export_onnx

    rows = []
    nets = {
        "SwinUNETR(feature_size=48)": lambda: SwinUNETR(in_channels=1, out_channels=classes, feature_size=48),
        "UNETR(hidden_size=768)": lambda: UNETR(in_channels=1, out_channels=classes, img_size=roi),
    }
    for name, make in nets.items():
        torch.manual_seed(0)
        net = make().eval()
        path = work / "transformer.onnx"
        row = {"network": name, "roi": roi, "classes": classes,
               "parameters": int(sum(p.numel() for p in net.parameters()))}
        _log(f"exporting {name} at {roi}³ ...")
        try:
            info = export_onnx(net, path, in_channels=1, roi_size=(roi,) * 3, num_classes=classes)
            row.update({k: info.get(k) for k in ("exporter", "export_seconds", "exporter_note")})
            row["onnx_mib"] = round(path.stat().st_size / 2 ** 20, 1)
            t0 = time.perf_counter()
            gate = run_gate(net, path, in_channels=1, roi_size=(roi,) * 3, num_classes=classes, samples=1,
                            raise_on_fail=False)
            row["gate_seconds"] = round(time.perf_counter() - t0, 1)
            row["gate"] = {k: gate.get(k) for k in ("passed", "max_abs_logit_diff", "max_abs_logit",
                                                    "argmax_agreement")}
        except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next network
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:
            if path.exists():
                path.unlink()
        _log(json.dumps(row))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_triple, default=(160, 160, 160), help="volume shape at 1 mm (default 160³)")
    ap.add_argument("--overlaps", default="0.7,0.5,0.25", help="segrt overlaps; the first is the reference")
    ap.add_argument("--classes", type=int, default=133)
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--no-monai", action="store_true", help="skip MONAI's pipeline")
    ap.add_argument("--transformers", action="store_true", help="also export full-size SwinUNETR and UNETR")
    ap.add_argument("--threads", type=int, default=None, help="threads for both sides (default: physical cores)")
    ap.add_argument("--work", type=Path, default=Path("bench-work") / "brain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="48³ volume, roi 32, 12 classes: checks the script")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shape, a.roi, a.classes = (48, 48, 40), 32, 12
    import numpy as np

    from parity_util import mri_like, oblique_affine, write_volume
    from segrt.engine.backends.ort_cpu import physical_cores
    from segrt.export import export

    threads = a.threads or physical_cores()
    overlaps = [float(v) for v in a.overlaps.split(",")]
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / ".gitignore").exists():
        (work / ".gitignore").write_text("*\n")
    load_before = os.getloadavg()
    report = {"benchmark": "brain", "date": dt.date.today().isoformat(), "machine": machine_info(),
              "load_average_before": load_before,
              "config": {"shape": list(a.shape), "spacing_mm": [1.0, 1.0, 1.0], "classes": a.classes,
                         "roi": [a.roi] * 3, "sw_batch_size": 4, "overlaps": overlaps, "threads": threads,
                         "network": "brain_small fixture transformer (TinyUNesT: patch 4, embed 32, 2 windowed "
                                    "attention blocks, decoder 16 ch), seeded random weights",
                         "label_table": "UNesT metadata.json" if (a.classes == 133 and UNEST.exists())
                         else "fixture"}}

    _log(f"bundle copy + export (roi {a.roi}³, {a.classes} classes)")
    bundle = make_bundle(work, a.classes, a.roi, a.seed)
    art = work / "artifact"
    t0 = time.perf_counter()
    export(bundle, art, force=True, gate_samples=1)
    report["export_seconds"] = round(time.perf_counter() - t0, 1)
    man = json.loads((art / "manifest.json").read_text())
    report["export"] = {"exporter": man["models"]["fp32"]["exporter"], "gate": man["gate"]["fp32"]}

    image = work / f"t1_{'x'.join(map(str, a.shape))}.nii.gz"
    write_volume(image, mri_like(a.shape, seed=a.seed), oblique_affine((1.0, 1.0, 1.0)))

    runs = []
    ref_labels = None
    for ov in overlaps:
        _log(f"segrt overlap {ov}")
        r = run_segrt(art, image, ov, threads, work / f"segrt_{ov}.nii.gz")
        labels = r.pop("labels")
        if ref_labels is None:
            ref_labels = labels
        r["agreement_vs_first"] = float(np.mean(labels == ref_labels))
        r["tool"] = "segrt"
        r["peak_rss_mib_so_far"] = _vm_hwm_mib()
        runs.append(r)
        _log(json.dumps(r))
    if not a.no_monai:
        _log(f"MONAI overlap {overlaps[0]}")
        r = run_monai(bundle, image, work / "monai_out", threads)
        labels = r.pop("labels")
        r["agreement_vs_segrt_same_overlap"] = float(np.mean(labels == ref_labels))
        r["tool"] = "monai"
        r["overlap"] = overlaps[0]
        r["peak_rss_mib_so_far"] = _vm_hwm_mib()
        runs.append(r)
        _log(json.dumps(r))
        report["speedup_segrt_vs_monai_same_overlap"] = round(r["total_s"] / runs[0]["total_s"], 3)
    report["runs"] = runs
    if a.transformers:
        report["transformer_exports"] = transformer_exports(work, 133, 96)
    report["load_average_after"] = os.getloadavg()

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = (work if a.smoke else RESULTS) / f"brain_{report['date']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"{'tool':<6} {'overlap':>7} {'windows':>7} {'total s':>8} {'infer s':>8} {'agreement':>10}")
    for r in runs:
        agree = r.get("agreement_vs_first", r.get("agreement_vs_segrt_same_overlap"))
        infer = r["timings"].get("infer")
        print(f"{r['tool']:<6} {r['overlap']:>7g} {r['windows']:>7} {r['total_s']:>8.1f} {infer:>8.1f} "
              f"{agree:>10.5f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
