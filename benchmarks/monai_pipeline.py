"""MONAI's own bundle inference pipeline, timed stage by stage (the reference side of the CPU benchmark).

    python -m benchmarks.monai_pipeline BUNDLE_DIR IMAGE -o OUT_DIR --result RESULT.json
                                        [--override KEY=JSON ...] [--threads N]

It runs what the bundle's ``SupervisedEvaluator`` runs for one image, on the CPU, in float32: the bundle's
``preprocessing`` (LoadImaged ... ScaleIntensityd, reading the NIfTI), collation as its DataLoader does, its
``inferer`` (SlidingWindowInferer) on the network with the weights at ``checkpointloader#load_path``, then
decollation and its ``postprocessing`` (Activationsd, AsDiscreted, Invertd, SaveImaged writing the NIfTI).
RESULT.json gets the stage wall times (s)::

    setup              parse the configs, build the network, load the checkpoint, build the transforms
    load_preprocess    read the NIfTI and run the preprocessing (+ collation)
    infer              sliding-window inference (network calls, blending, padding)
    postprocess_write  softmax, argmax, Invertd and SaveImaged

plus the number of windows the network saw, the preprocessed shape, torch's thread count and the path of
the written label image. (The evaluator's DataLoader worker process is left out on purpose: it would add
a second process to the measured one.)

:func:`bundle_with_weights` makes the copy of a bundle that both this pipeline and ``segrt export`` read,
so that both sides run the same (seeded random) weights.

The same functions are the reference side of the parity tests (tests/parity_util.py): :func:`build_reference`
builds what the bundle's evaluator runs (ConfigParser with the bundle root and its own ``scripts/`` importable,
the network with its checkpoint, the transforms, the inferer) and :func:`run_reference` runs one image through
it, timing the stages and, with ``intermediates=True``, also returning the arrays parity compares (the
preprocessed image, the softmax probabilities on the preprocessed grid, the labels of the bundle's
postprocessing, the probabilities taken through its Invertd) - computed outside the timed regions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def bundle_on_path(bundle: Path):
    """The bundle root importable (its own ``scripts/`` network code), as ``monai.bundle run`` does; undone after."""
    saved = list(sys.path)
    before = set(sys.modules)
    sys.path.insert(1, str(bundle))
    try:
        yield
    finally:
        sys.path[:] = saved
        for name in set(sys.modules) - before:
            if name == "scripts" or name.startswith("scripts."):
                del sys.modules[name]


def checkpoint_path(parser, bundle: Path) -> Path:
    """Where the bundle loads its weights.

    ``checkpointloader#load_path``, else a CheckpointLoader handler's ``load_path``, else ``models/model.pt``.
    """
    if "checkpointloader" in parser:
        return Path(parser.get_parsed_content("checkpointloader#load_path"))
    for i, h in enumerate(parser["handlers"] if "handlers" in parser else []):
        if str(h.get("_target_", "")).endswith("CheckpointLoader"):
            return Path(parser.get_parsed_content(f"handlers#{i}#load_path"))
    return Path(bundle) / "models" / "model.pt"


def config_parser(bundle: Path, overrides: dict | None = None, output_dir: Path | None = None):
    """The bundle's inference config (+ metadata): ``bundle_root`` set, the overrides applied, then ``output_dir``."""
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle)
    for k, v in (overrides or {}).items():
        parser[k] = v
    if output_dir is not None:
        parser["output_dir"] = str(output_dir)
    return parser




def build_network(parser, bundle: Path):
    """``network_def`` instantiated with the bundle root importable (a network in the bundle's own ``scripts/``)."""
    with bundle_on_path(Path(bundle)):
        return parser.get_parsed_content("network_def", instantiate=True)


def save_random_weights(bundle: Path, seed: int = 0, overrides: dict | None = None, perturb_bn: bool = True) -> Path:
    """Build ``bundle``'s network from ``torch.manual_seed(seed)`` and save its state at the checkpoint path it loads.

    ``perturb_bn``: draw BatchNorm running statistics (if any) away from the trivial (0, 1) too. Returns the
    checkpoint path.
    """
    import torch

    bundle = Path(bundle)
    parser = config_parser(bundle, overrides)
    torch.manual_seed(seed)
    net = build_network(parser, bundle)
    if perturb_bn:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.8, 1.2)
    ckpt = checkpoint_path(parser, bundle)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ckpt)
    return ckpt


def bundle_with_weights(src: Path, dst: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Copy ``src``'s configs (and its own ``scripts/``) to ``dst`` and save seeded random weights where it loads them.

    BatchNorm running statistics (if any) are drawn away from the trivial (0, 1) as well. Returns the
    checkpoint path.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{src} is not a MONAI bundle: {src / 'configs' / 'inference.json'} is missing")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "configs", dst / "configs")
    if (src / "scripts").is_dir():
        shutil.copytree(src / "scripts", dst / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return save_random_weights(dst, seed=seed, overrides=overrides)


@dataclass
class Reference:
    """What the bundle's evaluator runs: its parser, network (weights loaded, eval, on ``device``) and transforms."""

    parser: Any
    net: Any
    pre: Any
    inferer: Any
    post: Any
    device: str
    output_dir: Path


def build_reference(bundle, out_dir, overrides: dict | None = None, device: str = "cpu") -> Reference:
    """Parse the bundle, build its network with the checkpoint it loads, its preprocessing, inferer, postprocessing.

    The inferer's ``device``/``sw_device`` are pinned to ``device`` (the bundles say "cuda if available": a CPU
    reference stays on the CPU on every machine).
    """
    import torch

    bundle, out_dir = Path(bundle), Path(out_dir)
    parser = config_parser(bundle, overrides, output_dir=out_dir)
    for key in ("inferer#device", "inferer#sw_device"):
        if key in parser:
            parser[key] = str(device)
    torch.manual_seed(0)
    net = build_network(parser, bundle)
    net.load_state_dict(torch.load(str(checkpoint_path(parser, bundle)), map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    return Reference(parser, net, pre, inferer, post, str(device), out_dir)


def _inverted_probabilities(ref: Reference, item):
    """Softmax of ``item["pred"]`` taken through the bundle's Invertd (nearest or bilinear as the bundle says)."""
    import numpy as np
    from monai.transforms import Activationsd, Compose, Invertd

    inv_cfg = [t for t in ref.parser["postprocessing"]["transforms"] if t["_target_"] == "Invertd"][0]
    inv = Compose([Activationsd(keys="pred", softmax=True),
                   Invertd(keys="pred", transform=ref.pre, orig_keys="image",
                           nearest_interp=bool(inv_cfg.get("nearest_interp", True)), to_tensor=True)])
    return np.asarray(inv(item)["pred"].as_tensor().cpu())


def run_reference(ref: Reference, image, amp: bool = False, intermediates: bool = False) -> dict:
    """Run one image through ``ref`` as the evaluator does; return the stage timings etc.

    Stages (each timed between CUDA synchronisations on a GPU): ``load_preprocess`` (preprocessing + collation,
    the batch moved to the device), ``infer`` (the sliding window; ``amp`` wraps the forward in
    ``torch.autocast("cuda", float16)``), ``postprocess_write`` (decollation, postprocessing incl. Invertd and
    SaveImaged). ``intermediates=True`` adds ``preprocessed`` (the image after preprocessing, (...)), ``probs``
    (softmax of the stitched logits on the preprocessed grid, (K, ...)), ``labels`` (the postprocessing's
    labels on the input grid) and ``inv_probs`` (the probabilities through the bundle's Invertd), all NumPy and
    all computed outside the timed regions.
    """
    import numpy as np
    import torch
    from monai.data import decollate_batch, list_data_collate

    device = ref.device
    cuda = str(device).startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    timings = {}
    extra = {}
    sync()
    t0 = time.perf_counter()
    d = ref.pre({"image": str(image)})
    batch = list_data_collate([d])  # as the bundle's DataLoader does
    pre_image = d["image"] if intermediates else None
    del d
    if cuda:
        batch["image"] = batch["image"].to(device)  # as the evaluator's prepare_batch does
    sync()
    timings["load_preprocess"] = time.perf_counter() - t0
    if intermediates:
        extra["preprocessed"] = pre_image.detach().cpu().numpy()[0]
        del pre_image

    windows = [0]
    net = ref.net

    def network(x):
        windows[0] += int(x.shape[0])
        if amp:
            with torch.autocast("cuda", dtype=torch.float16):
                return net(x)
        return net(x)

    t0 = time.perf_counter()
    with torch.no_grad():
        batch["pred"] = ref.inferer(batch["image"], network)
    sync()
    timings["infer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    item = decollate_batch(batch)[0]  # as the evaluator does before postprocessing
    untimed = 0.0
    if intermediates:  # the copies parity needs, left out of postprocess_write
        sync()
        t1 = time.perf_counter()
        extra["probs"] = torch.softmax(item["pred"].as_tensor().float(), 0).cpu().numpy()
        kept = copy.deepcopy(item)
        untimed = time.perf_counter() - t1
    shape = list(item["image"].shape[1:])
    with torch.no_grad():
        out = ref.post(item)
    sync()
    timings["postprocess_write"] = time.perf_counter() - t0 - untimed
    if intermediates:
        extra["labels"] = np.asarray(out["pred"].as_tensor().cpu())[0]
        with torch.no_grad():
            extra["inv_probs"] = _inverted_probabilities(ref, kept)
        del kept
    del out, item, batch
    parser = ref.parser
    ext = str(parser["output_ext"]) if "output_ext" in parser else ".nii.gz"  # SaveImaged's default
    written = sorted(ref.output_dir.rglob("*" + ext))
    if len(written) != 1:
        raise RuntimeError(f"expected one label image under {ref.output_dir}, found {[str(p) for p in written]}")
    res = {"timings": timings, "windows": windows[0], "preprocessed_shape": shape,
           "threads": torch.get_num_threads(), "output": str(written[0]), "device": str(device), "amp": bool(amp)}
    if cuda:
        res["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    res.update(extra)
    return res


def run_pipeline(bundle, image, out_dir, overrides: dict | None = None, threads: int | None = None,
                 device: str = "cpu", amp: bool = False, intermediates: bool = False) -> dict:
    """Run the bundle's pipeline on ``image``, writing the labels under ``out_dir``; return timings etc.

    :func:`build_reference` (timed as ``setup``) then :func:`run_reference`. ``device="cuda"``: what the
    bundle's evaluator does on a GPU - the network and the collated image on the GPU (``prepare_batch`` moves
    the batch there), the sliding window, post-processing and Invertd on the GPU tensors, SaveImaged from them;
    ``amp`` wraps the forward in ``torch.autocast("cuda", float16)`` as the evaluator does with ``amp=True``.
    Each stage is timed between CUDA synchronisations, and ``peak_gpu_memory_bytes`` is
    ``torch.cuda.max_memory_allocated`` over the run (after set-up).
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    ref = build_reference(bundle, out_dir, overrides, device=device)
    setup = time.perf_counter() - t0
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = run_reference(ref, image, amp=amp, intermediates=intermediates)
    res["timings"] = {"setup": setup, **res["timings"]}
    return res


def _override(text: str):
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"override must look like KEY=VALUE (JSON value), got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.monai_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("image")
    p.add_argument("-o", "--out-dir", required=True, help="output_dir for the bundle's SaveImaged (emptied first)")
    p.add_argument("--result", required=True, help="JSON file for timings and counts")
    p.add_argument("--override", action="append", default=[], type=_override, metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    a = p.parse_args(argv)
    out_dir = Path(a.out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    res = run_pipeline(a.bundle, a.image, out_dir, dict(a.override), a.threads)
    Path(a.result).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
