"""Shared helpers for parity tests: run MONAI's own bundle pipeline next to segrt on the same weights."""

from __future__ import annotations

import contextlib
import copy
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BUNDLES = SHARED / "bundles"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


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
    """Where the bundle loads its weights: ``checkpointloader#load_path``, a CheckpointLoader handler, or the default."""
    if "checkpointloader" in parser:
        return Path(parser.get_parsed_content("checkpointloader#load_path"))
    for i, h in enumerate(parser["handlers"] if "handlers" in parser else []):
        if str(h.get("_target_", "")).endswith("CheckpointLoader"):
            return Path(parser.get_parsed_content(f"handlers#{i}#load_path"))
    return bundle / "models" / "model.pt"


def bundle_with_weights(src: Path, dst: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Copy a bundle's configs (and its own ``scripts/``) to ``dst`` with seeded random weights where it loads them."""
    import torch
    from monai.bundle import ConfigParser

    shutil.copytree(src / "configs", dst / "configs")
    if (src / "scripts").is_dir():
        shutil.copytree(src / "scripts", dst / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    parser = ConfigParser()
    parser.read_config(dst / "configs" / "inference.json")
    parser["bundle_root"] = str(dst)
    for k, v in (overrides or {}).items():
        parser[k] = v
    torch.manual_seed(seed)
    with bundle_on_path(dst):
        net = parser.get_parsed_content("network_def", instantiate=True)
    ckpt = checkpoint_path(parser, dst)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    # perturb BatchNorm statistics too, so they are not the trivial (0, 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    torch.save(net.state_dict(), ckpt)
    return dst


def write_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def lps_affine(spacing, origin=(12.5, -30.25, 7.0)) -> np.ndarray:
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def ct_like(shape, seed=0) -> np.ndarray:
    """Random CT-like intensities: air outside an ellipsoid body, tissue with structures and noise."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (g[0] ** 2 / 0.8 + g[1] ** 2 / 0.6) < 1.0
    x = np.full(shape, -1000.0, np.float32)
    x[body] = 40.0
    blob = ((g[0] - 0.2) ** 2 + (g[1] + 0.1) ** 2 + g[2] ** 2) < 0.15
    x[blob & body] = 140.0
    bone = ((g[0] + 0.3) ** 2 + (g[1] - 0.2) ** 2) < 0.02
    x[bone & body] = 700.0
    x += rng.normal(0, 25, shape).astype(np.float32)
    return np.round(x).astype(np.float32)


def oblique_affine(spacing, angles_deg=(12.0, -7.0, 20.0), origin=(-90.5, 126.25, -72.0)) -> np.ndarray:
    """A rotated (about all three axes), flipped, anisotropic affine: no axis-aligned shortcut applies."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rz @ ry @ rx @ np.diag([-spacing[0], spacing[1], spacing[2]])
    a[:3, 3] = origin
    return a


def mri_like(shape, seed=0) -> np.ndarray:
    """Random T1-like intensities: exact-zero background (skull-stripped), a head of grey/white matter and CSF."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = g[0] ** 2 / 0.85 + g[1] ** 2 / 0.7 + g[2] ** 2 / 0.9
    x = np.zeros(shape, np.float32)
    head = r2 < 1.0
    x[head] = 300.0 + 120.0 * np.cos(6 * g[0] + 2 * g[1])[head]  # cortical folding-like variation
    x[(r2 < 0.45) & head] = 520.0  # white matter
    ventricles = (g[0] ** 2 + (g[1] - 0.1) ** 2 / 0.3 + g[2] ** 2 / 2) < 0.03
    x[ventricles] = 90.0
    x[head] += rng.normal(0, 30, int(head.sum())).astype(np.float32)
    return np.clip(x, 0, None).astype(np.float32)


def run_monai_bundle(bundle: Path, image_path: Path, out_dir: Path, overrides: dict | None = None):
    """Run the bundle's own preprocessing, inferer and postprocessing (as its SupervisedEvaluator does).

    Returns dict with ``probs`` (softmax of stitched logits on the preprocessed grid, (K, ...)),
    ``labels`` (final labels on the input grid, from the bundle's postprocessing incl. Invertd and SaveImaged),
    ``inv_probs`` (probabilities taken through the bundle's Invertd, for near-tie margins on the input grid).
    """
    import torch
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate
    from monai.transforms import Activationsd, Compose, Invertd

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = str(out_dir)
    for k, v in (overrides or {}).items():
        parser[k] = v
    torch.manual_seed(0)
    with bundle_on_path(bundle):
        net = parser.get_parsed_content("network_def", instantiate=True)
    ckpt = checkpoint_path(parser, bundle)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    net.eval()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    d = pre({"image": str(image_path)})
    batch = list_data_collate([d])  # as the bundle's DataLoader does
    with torch.no_grad():
        batch["pred"] = inferer(batch["image"], net)
    item = decollate_batch(batch)[0]  # as the evaluator does before postprocessing
    probs = torch.softmax(item["pred"].as_tensor().float(), 0).numpy()
    out = post(copy.deepcopy(item))
    labels = np.asarray(out["pred"].as_tensor())[0]
    # probabilities through the same Invertd (nearest or bilinear as the bundle says)
    inv_cfg = [t for t in parser["postprocessing"]["transforms"] if t["_target_"] == "Invertd"][0]
    inv = Compose([Activationsd(keys="pred", softmax=True),
                   Invertd(keys="pred", transform=pre, orig_keys="image",
                           nearest_interp=bool(inv_cfg.get("nearest_interp", True)), to_tensor=True)])
    inv_probs = np.asarray(inv(copy.deepcopy(item))["pred"].as_tensor())
    return {"probs": probs, "labels": labels, "inv_probs": inv_probs, "preprocessed": d["image"].numpy()[0]}


def top2_margin(probs: np.ndarray) -> np.ndarray:
    s = np.sort(probs, axis=0)
    return s[-1] - s[-2]
