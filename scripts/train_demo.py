#!/usr/bin/env python3
"""Train the demo bundle's SegResNet on synthetic phantoms and evaluate it (CPU or CUDA).

The network, the preprocessing and the inferer all come from the bundle's
``configs/inference.json`` (read with ``monai.bundle.ConfigParser``), so what is trained is
exactly what the bundle runs:

* training: phantoms from :func:`segrt.phantom.make_phantom` at random anisotropic spacing
  (1-3.5 mm), random axis codes (RAS, LPS, permuted ones) and random pose, put through the
  bundle's Orientationd / Spacingd / intensity transforms (the geometric ones applied to the
  labels too, with nearest interpolation), then random roi-sized crops balanced over the classes,
  Dice + cross-entropy loss, AdamW with a cosine schedule;
* evaluation: held-out phantoms written as NIfTI and run through the bundle's whole pipeline
  (LoadImaged ... intensity, the SlidingWindowInferer, Activationsd, AsDiscreted, Invertd),
  compared with the ground truth on the original grid; per-class Dice goes to
  ``docs/training_metrics.json``; the weights (a state dict) to ``models/model.pt``.

Usage::

    python scripts/train_demo.py                     # train + evaluate (about 10-15 min on 2 cores)
    python scripts/train_demo.py --eval-only         # evaluate the saved weights
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segrt.phantom import CLASS_NAMES, DEFAULT_FOV_MM, dice_per_class, make_phantom, save_phantom, shape_for_fov  # noqa: E402

BUNDLE = REPO / "segrt" / "data" / "demo_bundle"
NUM_CLASSES = len(CLASS_NAMES)

#: Held-out evaluation cases: (seed, axcodes, spacing). Training seeds start at 100000.
EVAL_CASES = [
    (1, "RAS", (1.5, 1.5, 1.5)),
    (2, "LPS", (1.5, 1.5, 1.5)),
    (3, "RAS", (0.9, 0.9, 3.0)),
    (4, "LPS", (1.2, 1.2, 2.5)),
    (5, "LAS", (2.0, 2.0, 2.0)),
    (6, "SAR", (3.0, 1.0, 1.25)),
]

ORIENTATIONS = ["RAS", "LPS", "LAS", "RPI", "LPI", "SAR", "PIR", "ASL", "IPL", "RSP"]


def parser_for(bundle: Path, device: torch.device | str = "cpu"):
    from monai.bundle import ConfigParser

    cp = ConfigParser()
    cp.read_config(str(bundle / "configs" / "inference.json"))
    cp["bundle_root"] = str(bundle)
    cp["device"] = f"$torch.device('{device}')"
    cp["inferer"]["device"] = f"$torch.device('{device}')"
    return cp


def train_transforms(cp):
    """The bundle's geometric and intensity preprocessing, for an image and its labels."""
    from monai.bundle import ConfigParser

    entries = cp.get("preprocessing")["transforms"]
    names = [e["_target_"] for e in entries]
    start = names.index("EnsureChannelFirstd") + 1
    cfg = []
    for e in entries[start:]:
        e = dict(e)
        if e["_target_"] in ("Orientationd",):
            e["keys"] = ["image", "label"]
        elif e["_target_"] == "Spacingd":
            e["keys"] = ["image", "label"]
            e["mode"] = [e.get("mode", "bilinear"), "nearest"]
        elif e["_target_"] not in ("EnsureTyped",):
            e["keys"] = "image"
        else:
            e["keys"] = ["image", "label"]
        cfg.append(e)
    sub = ConfigParser({"pixdim": cp.get_parsed_content("pixdim"), "t": {"_target_": "Compose", "transforms": cfg}})
    return sub.get_parsed_content("t")


def random_case(rng: np.random.Generator):
    sp = tuple(float(s) for s in rng.uniform(1.0, 3.5, 3))
    if rng.random() < 0.35:  # in-plane isotropic, thicker slices: the common CT case
        sp = (sp[0], sp[0], sp[2])
    fov = (DEFAULT_FOV_MM[0], DEFAULT_FOV_MM[1], float(rng.uniform(170, 240)))
    axc = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    # permute fov/spacing with the axis codes: codes name world axes per voxel axis
    world_axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    vfov = tuple(fov[world_axis[c]] for c in axc)
    vsp = tuple(sp[world_axis[c]] for c in axc)
    center = tuple(float(c) for c in rng.uniform([-10, -10, -40], [10, 10, 40]))
    return shape_for_fov(vfov, vsp), vsp, axc, center


_WORKER_TF = None


def _worker_init(bundle: str) -> None:
    global _WORKER_TF
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _WORKER_TF = train_transforms(parser_for(Path(bundle)))


def _worker_item(args):
    seed, run_seed = args
    return make_item(seed, run_seed, _WORKER_TF)


def make_item(seed: int, run_seed: int, tf):
    """One preprocessed training phantom; its grid (spacing, axis codes, FOV) is drawn from the seeds."""
    from monai.data import MetaTensor

    rng = np.random.default_rng([run_seed, seed])
    shape, sp, axc, center = random_case(rng)
    noise = float(rng.uniform(8.0, 25.0))
    img, lab, aff, _ = make_phantom(shape, sp, axc, seed=seed, center=center, noise_std=noise)
    a = torch.as_tensor(aff, dtype=torch.float64)
    d = {
        "image": MetaTensor(torch.from_numpy(img)[None], affine=a.clone()),
        "label": MetaTensor(torch.from_numpy(lab.astype(np.float32))[None], affine=a.clone()),
    }
    out = tf(d)
    label = out["label"].as_tensor().round().to(torch.uint8)
    flat = label.reshape(-1).numpy()
    # a few thousand voxel indices per present class, to centre class-balanced crops on
    where = {}
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(flat == c)
        if idx.size:
            where[c] = idx if idx.size <= 4000 else rng.choice(idx, 4000, replace=False)
    return {"image": out["image"].as_tensor().float().contiguous(), "label": label, "where": where}


def class_balanced_crop(item, roi, rng: np.random.Generator):
    """A roi-sized crop centred (as far as the borders allow) on a voxel of a random present class."""
    img, lab = item["image"], item["label"]
    shape = img.shape[1:]
    c = list(item["where"])[int(rng.integers(len(item["where"])))]
    centre = np.unravel_index(int(rng.choice(item["where"][c])), shape)
    sl = []
    for n, r, m in zip(shape, roi, centre):
        lo = int(min(max(m - r // 2, 0), max(n - r, 0)))
        sl.append(slice(lo, lo + r))
    x, y = img[(slice(None), *sl)], lab[(slice(None), *sl)]
    pad = []
    for n, r in zip(reversed(x.shape[1:]), reversed(roi)):
        pad += [0, max(r - n, 0)]
    if any(pad):  # a volume smaller than the roi: replicate its edge, as the inferer pads
        x = torch.nn.functional.pad(x[None], pad, mode="replicate")[0]
        y = torch.nn.functional.pad(y[None].float(), pad, mode="replicate")[0].to(torch.uint8)
    return x, y


def save_weights(net, path: Path) -> None:
    """State dict on CPU, written to a temporary name and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(path)


def evaluate(net, cp, cases, workdir: Path, log) -> dict:
    from monai.transforms import Compose

    pre = cp.get_parsed_content("preprocessing")
    inferer = cp.get_parsed_content("inferer")
    post_all = cp.get_parsed_content("postprocessing")
    post = Compose([t for t in post_all.transforms if type(t).__name__ != "SaveImaged"])
    net.eval()
    results = []
    for seed, axc, sp in cases:
        shape = shape_for_fov(
            tuple(DEFAULT_FOV_MM[{"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[c]] for c in axc), sp
        )
        pi, pl = workdir / f"case{seed}_img.nii.gz", workdir / f"case{seed}_lab.nii.gz"
        _, gt, _, _ = save_phantom(pi, pl, shape=shape, spacing=sp, axcodes=axc, seed=seed)
        t0 = time.time()
        d = pre({"image": str(pi)})
        with torch.no_grad():
            dev = next(net.parameters()).device
            d["pred"] = inferer(d["image"][None].to(dev), net)[0].cpu()
            d["image"] = d["image"].cpu()
        d = post(d)
        pred = d["pred"].as_tensor().numpy()[0].astype(np.int64)
        secs = time.time() - t0
        if pred.shape != gt.shape:
            raise RuntimeError(f"inverted prediction has shape {pred.shape}, expected {gt.shape}")
        dice = dice_per_class(pred, gt, NUM_CLASSES)
        fg = [dice[c] for c in range(1, NUM_CLASSES)]
        res = {
            "seed": seed, "axcodes": axc, "spacing": list(sp), "shape": list(shape), "seconds": round(secs, 2),
            "dice": {CLASS_NAMES[c]: round(dice[c], 4) for c in range(1, NUM_CLASSES)},
            "mean_dice": round(float(np.nanmean(fg)), 4),
        }
        log(f"eval seed={seed} {axc} {sp} shape={shape}: mean Dice {res['mean_dice']:.4f} {res['dice']} ({secs:.1f}s)")
        results.append(res)
    per_class = {
        CLASS_NAMES[c]: round(float(np.nanmean([r["dice"][CLASS_NAMES[c]] for r in results])), 4)
        for c in range(1, NUM_CLASSES)
    }
    return {
        "cases": results,
        "per_class_mean": per_class,
        "mean_dice": round(float(np.mean([r["mean_dice"] for r in results])), 4),
        "min_case_mean_dice": round(float(np.min([r["mean_dice"] for r in results])), 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--pool", type=int, default=12, help="phantoms kept in memory")
    ap.add_argument("--refresh-every", type=int, default=15, help="steps between replacing one pooled phantom")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="processes making phantoms (1: in the main process)")
    ap.add_argument("--device", default="cpu", help="torch device for training and evaluation (default cpu)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training early after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-cases", type=int, default=len(EVAL_CASES), help="evaluate the first N held-out cases")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (state dict)")
    args = ap.parse_args(argv)
    if not 1 <= args.eval_cases <= len(EVAL_CASES):
        ap.error(f"--eval-cases must be between 1 and {len(EVAL_CASES)}, got {args.eval_cases}")
    if args.steps < 1 or args.batch < 1 or args.pool < 1 or args.refresh_every < 1 or args.workers < 1:
        ap.error("--steps, --batch, --pool, --refresh-every and --workers must be >= 1")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=args.seed)
    bundle = args.bundle.resolve()
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    (bundle / "docs").mkdir(parents=True, exist_ok=True)
    log_path = bundle / "docs" / "training_log.txt"
    logf = open(log_path, "a" if args.eval_only else "w")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    device = torch.device(args.device)
    cp = parser_for(bundle, device)
    net = cp.get_parsed_content("network_def").to(device)
    model_path = bundle / "models" / cp.get_parsed_content("modelname")
    roi = tuple(cp.get_parsed_content("inferer#roi_size"))
    n_params = sum(p.numel() for p in net.parameters())
    log(f"network: SegResNet, {n_params} parameters; roi {roi}; threads {args.threads}")
    train_info = None

    if args.eval_only:
        net.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        old = bundle / "docs" / "training_metrics.json"
        if old.exists():
            train_info = json.loads(old.read_text()).get("training")
    else:
        if args.init is not None:
            net.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        tf = train_transforms(cp)
        rng = np.random.default_rng(args.seed)
        first_seed = next_seed = 100000 + 1000 * args.seed
        t_start = time.time()
        workers = None
        if args.workers > 1:
            import multiprocessing as mp

            workers = mp.get_context("spawn").Pool(args.workers, initializer=_worker_init, initargs=(str(bundle),))
            pool = workers.map(_worker_item, [(first_seed + i, args.seed) for i in range(args.pool)])
        else:
            tf = train_transforms(cp)
            pool = [make_item(first_seed + i, args.seed, tf) for i in range(args.pool)]
        next_seed = first_seed + args.pool
        pending = []  # phantoms being made ahead of time; consumed in submission order (deterministic)
        lag = max(1, args.workers)
        log(f"pool of {args.pool} phantoms ready in {time.time() - t_start:.1f}s")
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
        warm = min(30, args.steps // 10)

        def lr_at(step):
            if step < warm:
                return args.lr * (step + 1) / warm
            return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

        net.train()
        losses = []
        t_loop = time.time()
        step = 0
        while step < args.steps:
            if args.max_minutes is not None and step == 40:
                # fit the schedule into the time budget: cosine decay must reach its end
                per_step = (time.time() - t_loop) / step
                left = 60 * args.max_minutes - (time.time() - t_start)
                fit = step + max(1, int(0.97 * left / per_step))
                if fit < args.steps:
                    log(f"{per_step:.3f}s per step: {args.steps} steps do not fit in {args.max_minutes} min, "
                        f"training {fit} steps")
                    args.steps = fit
            if step and step % args.refresh_every == 0:
                if workers is None:
                    fresh = make_item(next_seed, args.seed, tf)
                else:
                    while len(pending) < lag:  # pending[i] makes phantom next_seed + i
                        pending.append(workers.apply_async(_worker_item, ((next_seed + len(pending), args.seed),)))
                    fresh = pending.pop(0).get()
                pool[int(rng.integers(len(pool)))] = fresh
                next_seed += 1
                if workers is not None:
                    while len(pending) < lag:
                        pending.append(workers.apply_async(_worker_item, ((next_seed + len(pending), args.seed),)))
            xs, ys = [], []
            for _ in range(args.batch):
                cx, cy = class_balanced_crop(pool[int(rng.integers(len(pool)))], roi, rng)
                xs.append(cx)
                ys.append(cy)
            x = torch.stack(xs).float().to(device)
            y = torch.stack(ys).long().to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == args.steps - 1:
                log(f"step {step:4d} loss {np.mean(losses[-20:]):.4f} lr {lr_at(step):.2e} "
                    f"elapsed {time.time() - t_start:.0f}s")
            if step % 100 == 99:
                save_weights(net, model_path)
            step += 1
            if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes + 30:
                log(f"stopping early at step {step}: --max-minutes {args.max_minutes} exceeded")
                break
        save_weights(net, model_path)
        if workers is not None:
            workers.terminate()
        train_secs = time.time() - t_start
        train_info = {
            "steps": args.steps, "steps_done": step, "device": str(device), "batch": args.batch, "roi": list(roi), "lr": args.lr, "pool": args.pool,
            "refresh_every": args.refresh_every, "phantoms_seen": next_seed - first_seed,
            "seed": args.seed, "threads": args.threads, "workers": args.workers, "seconds": round(train_secs, 1),
            "final_loss_mean_last_50": round(float(np.mean(losses[-50:])), 4),
            "spacing_range_mm": [1.0, 3.5], "orientations": ORIENTATIONS,
        }
        log(f"training done in {train_secs:.0f}s; weights -> {model_path}")

    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate(net, cp, EVAL_CASES[: args.eval_cases], Path(tmp), log)
    out = {
        "model": {"file": "models/model.pt", "parameters": n_params,
                  "bytes": model_path.stat().st_size, "roi": list(roi)},
        "training": train_info,
        "evaluation": metrics,
        "classes": {str(k): v for k, v in CLASS_NAMES.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "monai": __import__("monai").__version__, "machine": platform.machine(),
                        "processor": platform.processor()},
    }
    (bundle / "docs" / "training_metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"mean Dice over held-out cases {metrics['mean_dice']:.4f} (worst case {metrics['min_case_mean_dice']:.4f}); "
        f"per class {metrics['per_class_mean']}")
    logf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
