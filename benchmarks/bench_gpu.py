"""GPU benchmark: MONAI's bundle pipeline (fp32 and AMP) vs segrt's device pipeline, same card, same run.

    python benchmarks/bench_gpu.py                 # wholeBody 1.5 mm, 512x512x397 phantom, on cuda
    python benchmarks/bench_gpu.py --runs 3        # 3 timed runs of each side (after one warm-up)
    python benchmarks/bench_gpu.py --smoke         # tiny fixture bundle + tiny volume, device cpu: checks the script

Both sides start from the same volume in memory (a CT-like phantom, float32 HU with its affine) and end with labels
in memory; nothing is read from or written to disk.

* **MONAI** (the reference): the bundle's own objects from ``configs/inference.json`` through ``ConfigParser``:
  its ``preprocessing`` without ``LoadImaged``/``EnsureChannelFirstd`` (the input is a channel-first MetaTensor on the
  CPU, where the bundle's DataLoader runs it), collation, ``inferer`` (SlidingWindowInferer, output on the GPU) on
  ``network_def`` (seeded random weights, exactly the bundle's architecture), then decollation and ``postprocessing``
  without ``SaveImaged`` (Activationsd, AsDiscreted, Invertd). ``fp32``: plain; ``amp``: the forward under
  ``torch.autocast("cuda", float16)`` as the bundle's evaluator does with ``amp=True``. Stages: ``preprocess``
  (CPU, once, shared by both modes), ``infer`` (sliding window), ``postprocess``; labels are copied to the host.
* **segrt**: :class:`segrt.engine.gpu.TorchPipeline` with the spec segrt's exporter derives from the same bundle
  (:func:`segrt.export.bundle.spec_from_parser`) and the same module under CUDA autocast (float16 output, channels-last,
  cuDNN autotuning) as ``infer_torch``. Stages come from the pipeline's CUDA events. ``--accum`` picks the stitching
  accumulator dtype(s).

Per run: stage times (s), ``torch.cuda.max_memory_allocated`` during the run (bytes, the network's weights included),
label agreement with MONAI fp32 and MONAI amp (fraction of voxels). JSON goes to
``benchmarks/results/gpu_<gpu-name>_<date>.json`` (``--smoke``: ``--out`` or a temporary directory) with the card's
name, torch/MONAI versions and the configuration.

On a machine without MONAI/nibabel (e.g. a bare GPU box with torch + triton), carry the wheels ``monai==1.6.1`` and
``nibabel`` (and their small pure-Python dependencies) and ``pip install --no-deps`` them first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
WHOLEBODY = SHARED / "bundles" / "wholeBody_ct_segmentation"
SMOKE_BUNDLE = REPO / "tests" / "fixtures" / "bundles" / "wholebody_small"
RESULTS = REPO / "benchmarks" / "results"


# ---- input ---------------------------------------------------------------------------------------
def ct_phantom(shape, spacing, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A fast CT-like float32 HU volume (air, body ellipse, a few organ ellipsoids, bone, noise) in LPS voxel
    order (the usual DICOM-derived NIfTI: x and y flipped), with its affine."""
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    x = ((np.arange(X, dtype=np.float32) - X / 2) * spacing[0])[:, None, None]
    y = ((np.arange(Y, dtype=np.float32) - Y / 2) * spacing[1])[None, :, None]
    z = ((np.arange(Z, dtype=np.float32) - Z / 2) * spacing[2])[None, None, :]
    img = np.full(shape, -1000.0, np.float32)
    body = (x / 170.0) ** 2 + (y / 120.0) ** 2 <= 1.0
    img[np.broadcast_to(body, shape)] = 0.0
    organs = [(-60, 10, 40, 70, 50, 90, 60.0), (70, 20, 30, 55, 45, 60, 45.0), (0, -40, -120, 40, 30, 80, 30.0),
              (0, 50, 0, 18, 18, 400, 700.0), (-40, 0, 150, 60, 70, 70, -800.0), (40, 0, 150, 60, 70, 70, -800.0)]
    for cx, cy, cz, rx, ry, rz, hu in organs:
        m = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
        img[m] = hu
    img += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    np.round(img, out=img)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [X * spacing[0] / 2, Y * spacing[1] / 2, -Z * spacing[2] / 2]
    return img, affine


# ---- MONAI ---------------------------------------------------------------------------------------
class MonaiPipeline:
    def __init__(self, parser, net, device):
        import monai.transforms as mt

        self.device = device
        self.net = net
        pre = parser.get_parsed_content("preprocessing")
        keep = [t for t in pre.transforms if not isinstance(t, (mt.LoadImaged, mt.EnsureChannelFirstd))]
        self.pre = mt.Compose(keep)
        self.inferer = parser.get_parsed_content("inferer")
        self.inferer.device = device  # the bundle says cuda:0 when available; the same on cpu for --smoke
        post = parser.get_parsed_content("postprocessing")
        self.post = mt.Compose([t for t in post.transforms if not isinstance(t, mt.SaveImaged)])

    def preprocess(self, image: np.ndarray, affine: np.ndarray):
        import torch
        from monai.data import MetaTensor, list_data_collate

        meta = {"original_affine": affine.copy(), "space": "RAS", "spatial_shape": np.array(image.shape),
                "original_channel_dim": float("nan"), "filename_or_obj": "phantom.nii.gz"}
        data = {"image": MetaTensor(torch.from_numpy(image[None].copy()), affine=torch.from_numpy(affine),
                                    meta=meta)}
        return list_data_collate([self.pre(data)])

    def run(self, batch, amp: bool, timer):
        import torch
        from monai.data import decollate_batch

        batch = dict(batch)
        with timer("infer"):
            img = batch["image"].to(self.device)
            with torch.no_grad():
                if amp:
                    with torch.autocast("cuda", dtype=torch.float16):
                        pred = self.inferer(img, self.net)
                else:
                    pred = self.inferer(img, self.net)
        with timer("postprocess"):
            batch["pred"] = pred
            item = decollate_batch(batch)[0]
            with torch.no_grad():
                out = self.post(item)
            labels = out["pred"][0].detach().to("cpu").numpy().astype(np.uint8)
        return labels


class WallTimer:
    """Wall-clock stage timer that synchronises the device at both ends of each stage."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _C:
            def __enter__(self_):
                timer._sync()
                self_.t = time.perf_counter()

            def __exit__(self_, *exc):
                timer._sync()
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self_.t
                return False

        return _C()

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


# ---- helpers ----------------------------------------------------------------------------------------
def build_network(parser, device, seed: int):
    import torch

    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def", instantiate=True)
    return net.to(device).eval()


def make_infer(net, device, amp: bool):
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        net_cl = net.to(memory_format=torch.channels_last_3d)

        def infer(x):
            x = x.contiguous(memory_format=torch.channels_last_3d)
            if amp:
                with torch.autocast("cuda", dtype=torch.float16):
                    return net_cl(x)
            return net_cl(x)
    else:
        def infer(x):
            return net(x)
    return infer


def machine(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_bytes=int(p.total_memory), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("nan")
    return float(np.mean(a == b))


# ---- main -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny fixture bundle and volume on the CPU")
    ap.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --smoke)")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--shape", type=int, nargs=3, default=None)
    ap.add_argument("--spacing", type=float, nargs=3, default=None)
    ap.add_argument("--runs", type=int, default=1, help="timed runs per side after one warm-up")
    ap.add_argument("--accum", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    ap.add_argument("--no-monai-fp32", action="store_true", help="skip MONAI's fp32 mode (saves time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)

    import torch

    from segrt.engine.gpu import TorchPipeline
    from segrt.export.bundle import load_parser, spec_from_parser
    from segrt.volume import Volume

    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible to torch; use --smoke (cpu) or --device cpu", file=sys.stderr)
        return 2
    if args.smoke:
        bundle = args.bundle or SMOKE_BUNDLE
        shape, spacing = tuple(args.shape or (40, 36, 30)), tuple(args.spacing or (3.0, 3.0, 3.5))
        overrides = {}
    else:
        bundle = args.bundle or WHOLEBODY
        shape, spacing = tuple(args.shape or (512, 512, 397)), tuple(args.spacing or (0.84, 0.84, 1.5))
        overrides = {"displayable_configs#highres": True}
    parser = load_parser(bundle, overrides)
    spec = spec_from_parser(load_parser(bundle, overrides))  # its own parser: it parses without instantiating
    net = build_network(parser, device, args.seed)
    n_params = sum(p.numel() for p in net.parameters())

    t0 = time.perf_counter()
    image, affine = ct_phantom(shape, spacing, args.seed)
    phantom_s = time.perf_counter() - t0
    vol = Volume.from_array(image, affine=affine)
    print(f"bench_gpu: {bundle.name}, {n_params / 1e6:.1f} M params, input {shape} at {spacing} mm "
          f"(phantom {phantom_s:.1f} s), device {device}", flush=True)

    modes = ["fp32", "amp"] if cuda else ["fp32"]
    if args.no_monai_fp32 and cuda:
        modes = ["amp"]
    result = {"machine": machine(device), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "config": {"bundle": bundle.name, "input_shape": list(shape), "input_spacing": list(spacing),
                         "runs": args.runs, "seed": args.seed, "smoke": args.smoke, "device": str(device),
                         "spec": spec.to_dict() | {"class_names": len(spec.class_names)}},
              "monai": {}, "segrt": {}}

    # ---- MONAI ----
    mp = MonaiPipeline(parser, net, device)
    wt = WallTimer(cuda)
    with wt("preprocess"):
        batch = mp.preprocess(image, affine)
    pre_s = wt.times["preprocess"]
    res_shape = list(batch["image"].shape[2:])
    print(f"  monai preprocess (cpu) {pre_s:.2f} s → {res_shape}", flush=True)
    monai_labels = {}
    for mode in modes:
        runs = []
        for r in range(args.runs + 1):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t = WallTimer(cuda)
            labels = mp.run(batch, amp=(mode == "amp"), timer=t)
            rec = {"stages": dict(t.times), "total_gpu_side": sum(t.times.values()),
                   "total_with_cpu_preprocess": sum(t.times.values()) + pre_s}
            if cuda:
                rec["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
            if r > 0 or args.runs == 0:
                runs.append(rec)
            print(f"  monai {mode} run {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in t.times.items())
                  + (f", peak {rec.get('peak_gpu_memory_bytes', 0) / 2**30:.2f} GiB" if cuda else ""), flush=True)
            monai_labels[mode] = labels
        result["monai"][mode] = {"preprocess_cpu_s": pre_s, "runs": runs,
                                 "median_total_gpu_side": statistics.median(x["total_gpu_side"] for x in runs)}
    del batch
    if "fp32" in monai_labels and "amp" in monai_labels:
        result["monai"]["agreement_fp32_vs_amp"] = agreement(monai_labels["fp32"], monai_labels["amp"])

    # ---- segrt ----
    infer = make_infer(net, device, amp=cuda)
    for acc_name in args.accum:
        pipe = TorchPipeline(spec, infer, device, accum_dtype=getattr(torch, acc_name))
        runs = []
        labels = None
        for r in range(args.runs + 1):
            if cuda:
                torch.cuda.empty_cache()
            res = pipe.segment(vol)
            labels = res.labels
            rec = {"stages": res.timings, "peak_gpu_memory_bytes": res.metadata.get("peak_gpu_memory_bytes"),
                   "stitch_buffer_bytes": res.metadata["stitch_buffer_bytes"], "windows": res.metadata["windows"]}
            if r > 0 or args.runs == 0:
                runs.append(rec)
            print(f"  segrt accum={acc_name} run {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res.timings.items())
                  + (f", peak {rec['peak_gpu_memory_bytes'] / 2**30:.2f} GiB" if cuda else ""), flush=True)
        entry = {"runs": runs, "median_total": statistics.median(x["stages"]["total"] for x in runs),
                 "labels_dtype": str(labels.dtype)}
        for mode, ml in monai_labels.items():
            entry[f"agreement_vs_monai_{mode}"] = agreement(labels, ml)
        result["segrt"][f"accum_{acc_name}"] = entry
        print(f"  segrt accum={acc_name}: median total {entry['median_total']:.3f} s; agreement "
              + ", ".join(f"{m} {entry[f'agreement_vs_monai_{m}']:.5f}" for m in monai_labels), flush=True)

    # ---- ratios + write ----
    ref_mode = "amp" if "amp" in result["monai"] else "fp32"
    ref = result["monai"][ref_mode]
    for key, entry in result["segrt"].items():
        entry[f"speedup_vs_monai_{ref_mode}_gpu_side"] = ref["median_total_gpu_side"] / entry["median_total"]
        entry[f"speedup_vs_monai_{ref_mode}_with_cpu_preprocess"] = (
            (ref["median_total_gpu_side"] + ref["preprocess_cpu_s"]) / entry["median_total"])
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="bench_gpu_")) / "gpu_smoke.json"
    else:
        name = result["machine"].get("gpu", "cpu").replace(" ", "_").replace("/", "_")
        out = RESULTS / f"gpu_{name}_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)
    print(f"bench_gpu: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
