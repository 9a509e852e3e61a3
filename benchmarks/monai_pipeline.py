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
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def _config_parser(bundle: Path, overrides: dict | None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle)
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


# The bundle's own scripts/ importable while its network is built, and where it loads its weights (incl. a
# CheckpointLoader handler): one implementation, shared with the parity tests.
_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
from parity_util import bundle_on_path, checkpoint_path  # noqa: E402


def bundle_with_weights(src: Path, dst: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Copy ``src``'s configs to ``dst`` and save seeded random weights at the checkpoint path it loads.

    BatchNorm running statistics (if any) are drawn away from the trivial (0, 1) as well. Returns the
    checkpoint path.
    """
    import torch

    src, dst = Path(src), Path(dst)
    if not (src / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{src} is not a MONAI bundle: {src / 'configs' / 'inference.json'} is missing")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "configs", dst / "configs")
    parser = _config_parser(dst, overrides)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def", instantiate=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    ckpt = checkpoint_path(parser, dst)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ckpt)
    return ckpt


def run_pipeline(bundle, image, out_dir, overrides: dict | None = None, threads: int | None = None,
                 device: str = "cpu", amp: bool = False) -> dict:
    """Run the bundle's pipeline on ``image``, writing the labels under ``out_dir``; return timings etc.

    ``device="cuda"``: what the bundle's evaluator does on a GPU - the network and the collated image on the
    GPU (``prepare_batch`` moves the batch there), the sliding window, post-processing and Invertd on the GPU
    tensors, SaveImaged from them; ``amp`` wraps the forward in ``torch.autocast("cuda", float16)`` as the
    evaluator does with ``amp=True``. Each stage is timed between CUDA synchronisations, and
    ``peak_gpu_memory_bytes`` is ``torch.cuda.max_memory_allocated`` over the run.
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from monai.data import decollate_batch, list_data_collate

    cuda = str(device).startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    bundle, out_dir = Path(bundle), Path(out_dir)
    timings = {}
    t0 = time.perf_counter()
    parser = _config_parser(bundle, overrides)
    parser["output_dir"] = str(out_dir)
    for key in ("inferer#device", "inferer#sw_device"):  # the device asked for (a CPU benchmark: never a GPU)
        if key in parser:
            parser[key] = str(device)
    torch.manual_seed(0)
    with bundle_on_path(bundle):
        net = parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(torch.load(str(checkpoint_path(parser, bundle)), map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    timings["setup"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    sync()
    t0 = time.perf_counter()
    batch = list_data_collate([pre({"image": str(image)})])
    if cuda:
        batch["image"] = batch["image"].to(device)
    sync()
    timings["load_preprocess"] = time.perf_counter() - t0

    windows = [0]

    def network(x):
        windows[0] += int(x.shape[0])
        if amp:
            with torch.autocast("cuda", dtype=torch.float16):
                return net(x)
        return net(x)

    t0 = time.perf_counter()
    with torch.no_grad():
        batch["pred"] = inferer(batch["image"], network)
    sync()
    timings["infer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    item = decollate_batch(batch)[0]
    shape = list(item["image"].shape[1:])
    with torch.no_grad():
        out = post(item)
    sync()
    timings["postprocess_write"] = time.perf_counter() - t0
    del out, item, batch
    ext = str(parser["output_ext"]) if "output_ext" in parser else ".nii.gz"  # SaveImaged's default
    written = sorted(out_dir.rglob("*" + ext))
    if len(written) != 1:
        raise RuntimeError(f"expected one label image under {out_dir}, found {[str(p) for p in written]}")
    res = {"timings": timings, "windows": windows[0], "preprocessed_shape": shape,
           "threads": torch.get_num_threads(), "output": str(written[0]), "device": str(device), "amp": bool(amp)}
    if cuda:
        res["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
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
