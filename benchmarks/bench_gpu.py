"""GPU benchmark: MONAI's bundle pipeline (fp32 and AMP) vs segrt, same card, same run, same weights.

    python benchmarks/bench_gpu.py                       # wholeBody 1.5 mm, 512x512x397 phantom, on cuda
    python benchmarks/bench_gpu.py --runs 3 --gpu-batch 4 8 16
    python benchmarks/bench_gpu.py --smoke               # tiny fixture bundle + tiny volume on the CPU: checks the script

Set-up (not timed): the bundle's configs are copied with seeded random weights saved where the bundle loads them
(``benchmarks.monai_pipeline.bundle_with_weights``), and ``segrt.export`` makes an artifact from that copy (fp32
ONNX + the torch program), so both sides run the same weights. The phantom (CT-like, int16 HU, LPS) is written
once as ``.nii.gz``.

Two comparisons, each side timed after one warm-up run:

* **volume in memory → labels in memory.** MONAI: the bundle's own objects through ``ConfigParser`` - its
  ``preprocessing`` without ``LoadImaged``/``EnsureChannelFirstd`` on a channel-first MetaTensor (on the CPU,
  where the bundle's DataLoader runs it; reported separately), then ``inferer`` on the GPU and
  ``postprocessing`` without ``SaveImaged``; ``fp32`` plain, ``amp`` under ``torch.autocast`` as the bundle's
  evaluator (``amp: true``). segrt: ``Engine.load(artifact, device="torch-cuda", gpu_batch=B)`` then
  ``engine.segment(volume)`` - the product path (torch program, fp16 autocast, CUDA graph, GPU pipeline).
* **file to file (.nii.gz in, .nii.gz out).** MONAI: ``benchmarks.monai_pipeline.run_pipeline(device="cuda")``
  - LoadImaged ... SaveImaged as the bundle runs them, stage by stage between CUDA synchronisations (its set-up
  excluded). segrt: ``engine.segment(path, output=...)`` with an already loaded engine (what a service or a batch
  job sees), and once ``segrt run`` as a fresh process (``cli_cold``: imports, CUDA context, graph capture).

Per run: stage times (s), peak GPU memory (``torch.cuda.max_memory_allocated``), and label agreement with MONAI
(fraction of voxels). JSON: ``benchmarks/results/gpu_<gpu-name>_<date>.json`` (``--smoke``: ``--out`` or a
temporary directory) with the card's name, versions and the configuration.

On a machine without MONAI/nibabel (e.g. a bare GPU box with torch + triton), carry their wheels and ``pip install
--no-deps`` them first: ``benchmarks/device_session.sh`` does that and runs the GPU tests and this benchmark.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._paths import RESULTS, SMOKE_BUNDLE, WHOLEBODY  # noqa: E402


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
def build_network(parser, device, ckpt: Path):
    import torch

    from benchmarks.monai_pipeline import build_network as build_bundle_network

    net = build_bundle_network(parser, Path(parser["bundle_root"]))  # the bundle's own scripts/ importable
    net.load_state_dict(torch.load(str(ckpt), map_location="cpu", weights_only=True))
    return net.to(device).eval()


def write_ct(path: Path, ct: np.ndarray, affine: np.ndarray) -> Path:
    """The phantom as a CT file: int16 HU ``ct`` (what scanners export), sform = qform = affine."""
    import nibabel as nib

    img = nib.Nifti1Image(ct, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def read_labels(path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def load_engine(artifact: Path, device, gpu_batch: int, accum: str):
    """``Engine.load(device="torch-cuda")``; on a CPU device (``--smoke``) the same engine with the torch program on
    torch's CPU device, forced onto the device-pipeline branch (as tests/test_engine_device.py does)."""
    from segrt.engine.engine import Engine

    if device.type == "cuda":
        return Engine.load(artifact, device="torch-cuda", gpu_batch=gpu_batch, accum_dtype=accum,
                           trust_torch_program=True)  # the artifact this script exported itself
    from segrt.artifact import Artifact
    from segrt.engine.backends.torch_cuda import TorchCudaBackend

    art = Artifact.load(artifact)
    eng = Engine(art, TorchCudaBackend.from_artifact(art, device="cpu", max_batch=gpu_batch),
                 "bench_gpu --smoke: torch program on the CPU", accum_dtype=accum)
    eng.device = "cuda"
    return eng


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


def profile_segrt(artifact: Path, device, gpu_batch: int, accum: str, vol, out: Path) -> Path:
    """One warm-up and one profiled ``engine.segment(vol)``; the kernels sorted by self device (or CPU) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    eng = load_engine(artifact, device, gpu_batch, accum)
    eng.segment(vol, progress=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        eng.segment(vol, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    eng.close()
    avg = prof.key_averages()
    table = None
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()) + \
            ("self_cpu_time_total",):
        try:
            table = avg.table(sort_by=key, row_limit=30)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"segrt in-memory run, gpu_batch {gpu_batch}, accum {accum}, device {device}\n{table}\n")
    print(f"  profile written to {out}", flush=True)
    return out


# ---- main -------------------------------------------------------------------------------------------
def _median(xs):
    return statistics.median(xs) if xs else None


def _timed_runs(n_runs: int, fn, label: str):
    """One warm-up then ``n_runs`` timed calls of ``fn() -> (record, labels)``; records of the timed ones."""
    runs, labels = [], None
    for r in range(n_runs + 1):
        rec, labels = fn()
        print(f"  {label} run {r}{' (warm-up)' if r == 0 else ''}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in rec["stages"].items())
              + f"  | total {rec['total_s']:.3f} s"
              + (f", peak {rec['peak_gpu_memory_bytes'] / 2**30:.2f} GiB" if rec.get("peak_gpu_memory_bytes") else ""),
              flush=True)
        if r > 0 or n_runs == 0:
            runs.append(rec)
    return {"runs": runs, "median_total_s": _median([x["total_s"] for x in runs])}, labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny fixture bundle and volume on the CPU")
    ap.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --smoke)")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--shape", type=int, nargs=3, default=None)
    ap.add_argument("--spacing", type=float, nargs=3, default=None)
    ap.add_argument("--runs", type=int, default=1, help="timed runs per case after one warm-up")
    ap.add_argument("--gpu-batch", type=int, nargs="+", default=[4, 8], help="segrt windows per network call")
    ap.add_argument("--accum", nargs="+", default=["float16"], choices=["float16", "float32"])
    ap.add_argument("--no-monai-fp32", action="store_true", help="skip MONAI's fp32 mode (saves time)")
    ap.add_argument("--no-file", action="store_true", help="skip the file-to-file comparison")
    ap.add_argument("--no-cli", action="store_true", help="skip the cold 'segrt run' process")
    ap.add_argument("--work", type=Path, default=None, help="directory for the bundle copy, artifact and files "
                                                            "(default: a temporary one; reused when given)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also profile one segrt in-memory run (torch.profiler; first --gpu-batch and --accum) and "
                         "write the top kernels table to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.monai_pipeline import bundle_with_weights, config_parser, run_pipeline
    from segrt.export import export
    from segrt.export.bundle import spec_from_parser
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
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)

    # ---- set-up (not timed against anything) ----
    t0 = time.perf_counter()
    wbundle = work / "bundle"
    ckpt = bundle_with_weights(bundle, wbundle, seed=args.seed, overrides=overrides)
    artifact = work / "artifact"
    export(wbundle, artifact, overrides=overrides or None, variants=("fp32",), torch_program=True,
           gate_samples=1, force=True)
    export_s = time.perf_counter() - t0
    parser = config_parser(wbundle, overrides)
    spec = spec_from_parser(config_parser(wbundle, overrides))
    net = build_network(parser, device, ckpt)
    n_params = sum(p.numel() for p in net.parameters())
    image, affine = ct_phantom(shape, spacing, args.seed)
    ct16 = np.round(image).astype(np.int16)
    image = ct16.astype(np.float32)  # in memory, the values the int16 file holds
    vol = Volume.from_array(image, affine=affine)
    t0 = time.perf_counter()
    ct_path = write_ct(work / "ct.nii.gz", ct16, affine)
    del ct16
    print(f"bench_gpu: {bundle.name}, {n_params / 1e6:.1f} M params, input {shape} at {spacing} mm, "
          f"{ct_path.stat().st_size / 2**20:.0f} MiB .nii.gz (written in {time.perf_counter() - t0:.1f} s), "
          f"bundle copy + export {export_s:.1f} s, device {device}", flush=True)

    modes = ["fp32", "amp"] if cuda else ["fp32"]
    if args.no_monai_fp32 and cuda:
        modes = ["amp"]
    result = {"machine": machine(device), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "config": {"bundle": bundle.name, "input_shape": list(shape), "input_spacing": list(spacing),
                         "input_file_bytes": ct_path.stat().st_size, "runs": args.runs, "seed": args.seed,
                         "smoke": args.smoke, "device": str(device), "gpu_batch": args.gpu_batch,
                         "accum": args.accum, "export_s": export_s,
                         "spec": spec.to_dict() | {"class_names": len(spec.class_names)}},
              "monai": {"in_memory": {}, "file": {}}, "segrt": {"in_memory": {}, "file": {}}}
    monai_labels = {}

    # ---- MONAI, volume in memory ----
    mp = MonaiPipeline(parser, net, device)
    wt = WallTimer(cuda)
    with wt("preprocess"):
        batch = mp.preprocess(image, affine)
    pre_s = wt.times["preprocess"]
    print(f"  monai preprocess (cpu) {pre_s:.2f} s → {list(batch['image'].shape[2:])}", flush=True)
    for mode in modes:
        def one(mode=mode):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t = WallTimer(cuda)
            labels = mp.run(batch, amp=(mode == "amp"), timer=t)
            rec = {"stages": dict(t.times), "total_s": sum(t.times.values()),
                   "total_with_cpu_preprocess_s": sum(t.times.values()) + pre_s}
            if cuda:
                rec["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
            return rec, labels
        entry, labels = _timed_runs(args.runs, one, f"monai in-memory {mode}")
        entry["preprocess_cpu_s"] = pre_s
        result["monai"]["in_memory"][mode] = entry
        monai_labels[mode] = labels
    batch = mp = None  # free the MONAI buffers before segrt runs
    if cuda:
        net.cpu()
        torch.cuda.empty_cache()

    # ---- MONAI, file to file ----
    if not args.no_file:
        for mode in modes:
            def one(mode=mode):
                out_dir = work / f"monai_out_{mode}"
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                res = run_pipeline(wbundle, ct_path, out_dir, overrides, device=str(device), amp=(mode == "amp"))
                stages = {k: v for k, v in res["timings"].items() if k != "setup"}
                rec = {"stages": stages, "total_s": sum(stages.values()), "setup_s": res["timings"]["setup"],
                       "windows": res["windows"]}
                if "peak_gpu_memory_bytes" in res:
                    rec["peak_gpu_memory_bytes"] = res["peak_gpu_memory_bytes"]
                return rec, read_labels(res["output"])
            entry, labels = _timed_runs(args.runs, one, f"monai file {mode}")
            result["monai"]["file"][mode] = entry
            monai_labels.setdefault(f"file_{mode}", labels)
            if cuda:
                torch.cuda.empty_cache()

    # ---- segrt ----
    for gb in args.gpu_batch:
        for acc in args.accum:
            key = f"batch{gb}_{acc}"
            eng = load_engine(artifact, device, gb, acc)

            def in_memory():
                t0 = time.perf_counter()
                seg = eng.segment(vol, progress=False)
                total = time.perf_counter() - t0
                rec = {"stages": {k: v for k, v in seg.timings.items()}, "total_s": total,
                       "peak_gpu_memory_bytes": seg.metadata.get("peak_gpu_memory_bytes"),
                       "windows": seg.metadata["windows"], "backend": seg.metadata["backend"]}
                return rec, seg.labels

            entry, labels = _timed_runs(args.runs, in_memory, f"segrt in-memory {key}")
            for m in modes:
                entry[f"agreement_vs_monai_{m}"] = agreement(labels, monai_labels[m])
            result["segrt"]["in_memory"][key] = entry
            if not args.no_file:
                out = work / f"segrt_{key}.nii.gz"

                def file_to_file():
                    t0 = time.perf_counter()
                    seg = eng.segment(ct_path, output=out, progress=False)
                    total = time.perf_counter() - t0
                    rec = {"stages": dict(seg.timings), "total_s": total,
                           "peak_gpu_memory_bytes": seg.metadata.get("peak_gpu_memory_bytes")}
                    return rec, None

                entry, _ = _timed_runs(args.runs, file_to_file, f"segrt file {key}")
                written = read_labels(out)
                for m in modes:
                    if f"file_{m}" in monai_labels:
                        entry[f"agreement_vs_monai_file_{m}"] = agreement(written, monai_labels[f"file_{m}"])
                result["segrt"]["file"][key] = entry
            eng.close()
            eng = None
            if cuda:
                torch.cuda.empty_cache()

    # ---- where segrt's GPU time goes (kernel table) ----
    if args.profile is not None:
        result["segrt"]["profile"] = str(profile_segrt(artifact, device, args.gpu_batch[0], args.accum[0], vol,
                                                       args.profile))

    # ---- segrt run, a fresh process ----
    if not args.no_cli:
        cmd = [sys.executable, "-m", "segrt.cli", "run", str(artifact), str(ct_path), "-o",
               str(work / "segrt_cli.nii.gz"), "--json", "--quiet", "--device", "torch-cuda" if cuda else "cpu",
               "--trust-torch-program"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            result["segrt"]["cli_cold"] = {"returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
        else:
            rep = json.loads(proc.stdout)
            result["segrt"]["cli_cold"] = {"wall_s": wall, "timings": rep["timings"], "backend": rep.get("backend")}
            print(f"  segrt run (fresh process): {wall:.2f} s wall; " +
                  ", ".join(f"{k} {v:.3f}" for k, v in rep["timings"].items()), flush=True)

    # ---- ratios + write ----
    ratios = {}
    for scope in ("in_memory", "file"):
        for m, ref in result["monai"][scope].items():
            for key, entry in result["segrt"][scope].items():
                ratios[f"{scope}:{key}_vs_monai_{m}"] = ref["median_total_s"] / entry["median_total_s"]
    for m, ref in result["monai"]["in_memory"].items():
        for key, entry in result["segrt"]["in_memory"].items():
            ratios[f"in_memory_with_cpu_preprocess:{key}_vs_monai_{m}"] = (
                (ref["median_total_s"] + ref["preprocess_cpu_s"]) / entry["median_total_s"])
    result["speedups"] = ratios
    for k, v in ratios.items():
        print(f"  speed-up {k}: {v:.2f}x")
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = work / "gpu_smoke.json"
    else:
        name = result["machine"].get("gpu", "cpu").replace(" ", "_").replace("/", "_")
        out = RESULTS / f"gpu_{name}_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)
    print(f"bench_gpu: wrote {out}")
    if args.work is None and not args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
