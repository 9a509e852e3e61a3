"""CPU runtimes side by side on the same patches: time per 96³ patch, GFLOP/s, accuracy against ORT fp32.

    python benchmarks/bench_runtimes.py                 # full wholeBody SegResNet, ~15 min on 2 cores
    python benchmarks/bench_runtimes.py --smoke         # reduced fixture network at 32³, ~1 min

What it measures, on the same CT-like patches (``segrt.phantom`` phantom at the bundle's spacing, run
through the spec's intensity ops - :func:`segrt.export.fp16.ct_like_patches`):

* the network: wholeBody_ct_segmentation's exact SegResNet, built by monai's ConfigParser from the bundle's
  ``configs/inference.json`` with seeded random weights, exported by ``segrt.export`` (the artifact's fp32 ONNX);
* runtimes: ONNX Runtime fp32 (segrt's default session, and with thread spinning off), ONNX Runtime int8
  (static QDQ, ``quantize_static`` with per-channel int8 weights and uint8 activations, MinMax-calibrated on
  phantom patches - ORT "Quantize ONNX models" docs: ``quant_pre_process`` then ``quantize_static(...,
  quant_format=QuantFormat.QDQ, per_channel=True)``), OpenVINO fp32 / bf16 (``INFERENCE_PRECISION_HINT``,
  ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_NUM_THREADS`` - OpenVINO "CPU Device" docs) and OpenVINO running
  the int8 QDQ model, and torch CPU (channels_last_3d fp32, and bf16 autocast) as reference points;
* time per patch (batch 1): one warm-up, then ``--runs`` rounds that run every runtime once on the same
  patch (interleaved, so a busy neighbour on a shared machine slows all runtimes alike); the median is reported;
* GFLOP/s: the convolutions' FLOP count (2 x MACs, counted from the ONNX graph's shapes) / median time;
* accuracy against ORT fp32 on ``--eval`` patches: max / mean |Δlogit|, argmax agreement, per-class Dice
  (classes with >= 1000 voxels gated at 0.98, as the export-time gate of ``segrt.export.cpu_variants``);
  the same for the trained demo network (``segrt/data/demo_bundle``), where logits are decisive;
* the machine: CPU model, cores, ISA flags, large-GEMM fp32 / bf16 rates (torch), library versions.

Writes ``benchmarks/results/cpu_runtimes_<date>.json`` and prints a table. On a shared machine the medians
still move with the neighbours' load; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._machine import version  # noqa: E402

WHOLEBODY = REPO.parent / "shared" / "bundles" / "wholeBody_ct_segmentation"
SMALL = REPO / "tests" / "fixtures" / "bundles" / "wholebody_small"
DEMO = REPO / "segrt" / "data" / "demo_bundle"
RESULTS = REPO / "benchmarks" / "results"
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
         "avx_vnni")


def machine_info() -> dict:
    from segrt.engine.backends.ort_cpu import physical_cores

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "model name":
                    model = v.strip()
                elif k.strip() == "flags":
                    flags = set(v.split())
    except OSError:
        pass
    info = {"cpu_model": model, "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "isa_flags": {f: f in flags for f in FLAGS}, "platform": platform.platform(),
            "versions": {d: version(d) for d in ("numpy", "onnx", "onnxruntime", "openvino", "torch", "monai",
                                                  "segrt")},
            "python": platform.python_version(),
            "shared_machine": True}
    try:
        from segrt.engine.backends.openvino_cpu import openvino_info

        info["openvino_cpu"] = openvino_info()
    except Exception as exc:  # noqa: BLE001
        info["openvino_cpu"] = f"unavailable: {exc}"
    return info


def gemm_rates(threads: int, n: int = 2048, reps: int = 5) -> dict:
    """Large square GEMM rate (torch, GFLOP/s), fp32 and bf16: the compute ceilings of this CPU."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            ts.append(time.perf_counter() - t0)
        out[name] = round(2 * n ** 3 / statistics.median(ts) / 1e9, 1)
    out["n"] = n
    return out


def conv_flops(onnx_path, batch_shape) -> dict:
    """FLOPs (2 x multiply-adds) of every Conv / ConvTranspose, from the graph's inferred shapes."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    inp = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(inp, batch_shape):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    n = 0
    unknown = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = inits.get(node.input[1])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if w is None:
            unknown += 1
            continue
        n += 1
        if node.op_type == "Conv":
            out = shapes.get(node.output[0])
            if not out or any(v is None for v in out):
                unknown += 1
                continue
            macs = int(np.prod(out)) * (w[1]) * int(np.prod(w[2:]))
        else:  # ConvTranspose: every input voxel scatters Cout/group x kernel
            x = shapes.get(node.input[0])
            if not x or any(v is None for v in x):
                unknown += 1
                continue
            macs = int(np.prod(x)) * (w[1]) * int(np.prod(w[2:]))
        total += 2 * macs
    return {"conv_flop": total, "conv_nodes": n, "nodes_without_shape": unknown}


# ---------------------------------------------------------------------------------------------
# model preparation
# ---------------------------------------------------------------------------------------------

def prepare_artifact(work: Path, source: Path, overrides: dict, seed: int, log) -> Path:
    from segrt.artifact import Artifact
    from segrt.export import export

    out = work / f"{source.name}_seed{seed}"
    try:
        Artifact.load(out)
        log(f"reusing artifact {out}")
        return out
    except Exception:  # noqa: BLE001 - absent or damaged: rebuild
        pass
    log(f"exporting {source} (seeded random weights, seed {seed}) -> {out}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(source, out, random_init=not (source / "models").is_dir(), seed=seed,
               overrides=overrides or None, force=True)
    return out


def quantize_int8(fp32_path: Path, out: Path, spec_json: Path, calib: int, seed: int) -> None:
    """Static QDQ int8 (run in a child process: calibration holds the network's every activation range)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from segrt.export.fp16 import ct_like_patches
    from segrt.spec import Spec

    spec = Spec.from_dict(json.loads(spec_json.read_text()))
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    batches = ct_like_patches(spec, calib, 1, seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    pre.unlink(missing_ok=True)


def ensure_int8(art: Path, calib: int, seed: int, log) -> Path:
    from segrt.artifact import Artifact

    a = Artifact.load(art)
    out = art.parent / f"{art.name}_int8_calib{calib}.onnx"
    if out.is_file():
        log(f"reusing int8 model {out}")
        return out
    spec_json = art.parent / f"{art.name}_spec.json"
    spec_json.write_text(json.dumps(a.spec.to_dict()))
    log(f"quantizing (static QDQ, {calib} phantom calibration patches) -> {out}")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_quantize", str(a.model_path("fp32")),
                        str(out), str(spec_json), str(calib), str(seed)])
    if r.returncode != 0:
        raise SystemExit(f"int8 quantization failed (exit {r.returncode})")
    log(f"  quantized in {time.perf_counter() - t0:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------
# runtimes
# ---------------------------------------------------------------------------------------------

def ort_runner(path, threads, spinning=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def ov_runner(path, threads, precision, roi, num_classes):
    from segrt.engine.backends.openvino_cpu import OpenVinoCpuBackend

    return OpenVinoCpuBackend(path, 1, num_classes, roi, 1, precision=precision, threads=threads).infer


def torch_runner(art: Path, threads, bf16: bool, seed: int):
    import torch

    from segrt.export.bundle import load_bundle

    torch.set_num_threads(threads)
    meta = json.loads((art / "manifest.json").read_text())
    src = Path(meta["source"]["path"])
    loaded = load_bundle(src, meta["source"].get("overrides") or None, random_init=meta["weights"]["random_init"],
                         seed=seed)
    net = loaded.network.eval().to(memory_format=torch.channels_last_3d)

    def run(x):
        t = torch.from_numpy(x).to(memory_format=torch.channels_last_3d)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(t).float().contiguous().numpy()

    return run


def build_runtimes(art: Path, int8: Path | None, threads: int, roi, num_classes, with_torch: bool, seed: int,
                   log) -> dict:
    fp32 = art / "model_fp32.onnx"
    rts = {
        "ort-fp32": ("ONNX Runtime fp32 (segrt default session)", lambda: ort_runner(fp32, threads)),
        "ort-fp32-nospin": ("ONNX Runtime fp32, intra-op spinning off", lambda: ort_runner(fp32, threads, False)),
    }
    if int8 is not None:
        rts["ort-int8"] = ("ONNX Runtime int8 static QDQ (per-channel weights)", lambda: ort_runner(int8, threads))
    try:
        import openvino  # noqa: F401

        rts["openvino-fp32"] = ("OpenVINO CPU, f32", lambda: ov_runner(fp32, threads, "f32", roi, num_classes))
        rts["openvino-bf16"] = ("OpenVINO CPU, bf16 inference precision", lambda: ov_runner(fp32, threads, "bf16", roi, num_classes))
        if int8 is not None:
            rts["openvino-int8"] = ("OpenVINO CPU on the int8 QDQ model", lambda: ov_runner(int8, threads, "f32", roi, num_classes))
    except ImportError:
        log("openvino not installed: OpenVINO rows skipped")
    if with_torch:
        rts["torch-fp32"] = ("torch CPU fp32, channels_last_3d (reference)", lambda: torch_runner(art, threads, False, seed))
        rts["torch-bf16"] = ("torch CPU bf16 autocast, channels_last_3d (reference)",
                             lambda: torch_runner(art, threads, True, seed))
    out = {}
    for key, (desc, make) in rts.items():
        try:
            out[key] = (desc, make())
        except Exception as exc:  # noqa: BLE001
            log(f"{key}: unavailable: {type(exc).__name__}: {exc}")
            out[key] = (desc, exc)
    return out


def accuracy(runtimes: dict, patches, num_classes: int) -> dict:
    from segrt.export.cpu_variants import MIN_CLASS_DICE, compare_runs

    ref_fn = runtimes["ort-fp32"][1]
    refs = [ref_fn(x) for x in patches]
    cache = {id(x): r for x, r in zip(patches, refs)}
    res = {}
    for key, (_, fn) in runtimes.items():
        if isinstance(fn, Exception) or key == "ort-fp32":
            continue
        r = compare_runs(lambda x: cache[id(x)], fn, patches, num_classes)
        pcd = r.pop("per_class_dice")
        bad = [k for k in pcd["gated"] if pcd["dice"][k] < MIN_CLASS_DICE]
        r.update({"gated_classes": len(pcd["gated"]), "classes_below_0.98": len(bad),
                  "worst_class": pcd["worst_class"], "worst_class_dice": pcd["worst_dice"],
                  "median_gated_class_dice": float(np.median([pcd["dice"][k] for k in pcd["gated"]]))
                  if pcd["gated"] else None,
                  "gate_passed": bool(r["finite"] and pcd["gated"] and not bad)})
        res[key] = r
        gc.collect()
    return res


def timing(runtimes: dict, patches, runs: int, log) -> dict:
    live = {k: fn for k, (_, fn) in runtimes.items() if not isinstance(fn, Exception)}
    for k, fn in live.items():  # warm-up (first-run allocations, lazy compilation)
        t0 = time.perf_counter()
        fn(patches[0])
        log(f"  warm-up {k}: {time.perf_counter() - t0:.2f} s")
    times = {k: [] for k in live}
    for i in range(runs):
        x = patches[i % len(patches)]
        for k, fn in live.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t0)
        log(f"  round {i + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()))
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="reduced fixture network at 32³ (seconds, checks the script)")
    ap.add_argument("--runs", type=int, default=3, help="timed rounds per runtime (default 3)")
    ap.add_argument("--eval", type=int, default=4, help="CT-like patches for the accuracy comparison (default 4)")
    ap.add_argument("--calib", type=int, default=4,
                    help="phantom patches calibrating int8 (default 4: ORT's calibrator keeps every patch's "
                         "intermediate results - 4 full-size patches peaked at 10 GB RSS, 8 were OOM-killed)")
    ap.add_argument("--threads", type=int, default=None, help="threads per runtime (default: physical cores)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-demo", action="store_true", help="skip the trained demo network's accuracy rows")
    ap.add_argument("--work", default=str(REPO / "bench-work" / "runtimes"))
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/cpu_runtimes_<date>.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_quantize", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._quantize:
        fp32, out, spec_json, calib, seed = a._quantize
        quantize_int8(Path(fp32), Path(out), Path(spec_json), int(calib), int(seed))
        return 0

    from segrt.artifact import Artifact
    from segrt.engine.backends.ort_cpu import physical_cores
    from segrt.export.fp16 import ct_like_patches

    def log(msg):
        print(f"[bench_runtimes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    threads = a.threads or physical_cores()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    info = machine_info()
    info["gemm_gflops"] = gemm_rates(threads) if not a.no_torch else None
    if a.smoke:
        source, overrides, what = SMALL, {"inferer#roi_size": [32, 32, 32], "inferer#sw_batch_size": 1}, \
            "wholebody_small fixture (SegResNet 8 filters, 6 classes) at 32³"
    else:
        source, overrides, what = WHOLEBODY, {}, \
            "wholeBody_ct_segmentation SegResNet (32 filters, 105 classes), exact architecture, seeded random weights"
    art = prepare_artifact(work, source, overrides, a.seed, log)
    artifact = Artifact.load(art)
    spec = artifact.spec
    roi = tuple(spec.inference.roi_size)
    int8 = None if a.no_int8 else ensure_int8(art, a.calib, a.seed + 1000, log)
    flops = conv_flops(art / "model_fp32.onnx", (1, spec.in_channels, *roi))
    log(f"{what}: {flops['conv_flop'] / 1e12:.3f} TFLOP of convolutions per {'x'.join(map(str, roi))} patch")
    patches = ct_like_patches(spec, max(a.eval, 1), 1, a.seed + 7)

    runtimes = build_runtimes(art, int8, threads, roi, spec.num_classes, not a.no_torch, a.seed, log)
    log("accuracy against ORT fp32 on the CT-like patches")
    acc = accuracy(runtimes, patches, spec.num_classes)
    log(f"timing: warm-up + {a.runs} interleaved rounds, batch 1, {threads} threads")
    times = timing(runtimes, patches, a.runs, log)
    rows = {}
    for key, (desc, fn) in runtimes.items():
        if isinstance(fn, Exception):
            rows[key] = {"description": desc, "unavailable": f"{type(fn).__name__}: {fn}"}
            continue
        med = statistics.median(times[key])
        rows[key] = {"description": desc, "times_s": [round(t, 4) for t in times[key]], "median_s": round(med, 4),
                     "gflops": round(flops["conv_flop"] / med / 1e9, 1),
                     "speedup_vs_ort_fp32": None, "accuracy_vs_ort_fp32": acc.get(key)}
    base = rows["ort-fp32"].get("median_s")
    for r in rows.values():
        if "median_s" in r and base:
            r["speedup_vs_ort_fp32"] = round(base / r["median_s"], 3)
    del runtimes
    gc.collect()

    demo = None
    if not a.no_demo and not a.smoke:
        log("trained demo network: accuracy of the reduced-precision runtimes on CT-like patches")
        dart = prepare_artifact(work, DEMO, {}, a.seed, log)
        dspec = Artifact.load(dart).spec
        dint8 = None if a.no_int8 else ensure_int8(dart, a.calib, a.seed + 1000, log)
        drt = build_runtimes(dart, dint8, threads, tuple(dspec.inference.roi_size), dspec.num_classes, False,
                             a.seed, log)
        drt = {k: v for k, v in drt.items() if k != "ort-fp32-nospin"}
        demo = {"network": "segrt demo bundle: SegResNet 8 filters, 6 classes, trained on phantoms, "
                           f"roi {dspec.inference.roi_size}",
                "accuracy_vs_ort_fp32": accuracy(drt, ct_like_patches(dspec, max(a.eval, 1), 1, a.seed + 7),
                                                 dspec.num_classes)}
        del drt

    load1 = os.getloadavg()
    result = {
        "benchmark": "bench_runtimes", "date": dt.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": info, "load_average_before": load0, "load_average_after": load1,
        "note": "measured on a shared machine (other developers' jobs running): medians of interleaved rounds; "
                "compare runtimes with each other, not with other days' numbers",
        "network": what, "roi": list(roi), "batch": 1, "threads": threads, "conv_flops": flops,
        "eval_patches": len(patches), "int8_calibration_patches": None if a.no_int8 else a.calib,
        "runtimes": rows, "demo_trained_network": demo,
    }
    out = Path(a.out) if a.out else (work / "cpu_runtimes_smoke.json" if a.smoke
                                     else RESULTS / f"cpu_runtimes_{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['network']}\n{result['machine']['cpu_model']}, {result['threads']} threads, "
          f"{result['conv_flops']['conv_flop'] / 1e12:.3f} TFLOP/patch, GEMM {result['machine'].get('gemm_gflops')}")
    print(f"{'runtime':18} {'median s':>9} {'GFLOP/s':>8} {'speedup':>8} {'max|Δlogit|':>11} {'argmax':>8} "
          f"{'worst Dice':>10} {'<0.98':>6} {'gate':>5}")
    for key, r in result["runtimes"].items():
        if "unavailable" in r:
            print(f"{key:18} unavailable: {r['unavailable'][:80]}")
            continue
        acc = r.get("accuracy_vs_ort_fp32") or {}
        wd = acc.get("worst_class_dice")
        print(f"{key:18} {r['median_s']:9.2f} {r['gflops']:8.1f} {r['speedup_vs_ort_fp32']:8.2f} "
              f"{acc.get('max_abs_logit_diff', 0.0):11.3g} {acc.get('argmax_agreement', 1.0):8.4f} "
              f"{(wd if wd is not None else 1.0):10.4f} {acc.get('classes_below_0.98', 0):>6} "
              f"{'pass' if acc.get('gate_passed', True) else 'FAIL':>5}")
    demo = result.get("demo_trained_network")
    if demo:
        print(f"\n{demo['network']}: accuracy vs ORT fp32")
        for key, acc in demo["accuracy_vs_ort_fp32"].items():
            print(f"{key:18} max|Δlogit| {acc['max_abs_logit_diff']:.3g}  argmax {acc['argmax_agreement']:.4f}  "
                  f"worst Dice {acc['worst_class_dice']:.4f}  gate {'pass' if acc['gate_passed'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
