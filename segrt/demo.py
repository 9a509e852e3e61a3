"""``segrt demo``: phantom CT → export the shipped demo bundle (cached) → segment → Dice against truth.

Needs the ``[export]`` extra the first time (the shipped bundle is exported with torch + monai, exactly as a
zoo bundle would be); later runs reuse the cached artifact and need only the runtime.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["DEMO_BUNDLE", "demo_artifact", "run_demo"]

DEMO_BUNDLE = Path(__file__).resolve().parent / "data" / "demo_bundle"


def _cache_root() -> Path:
    root = os.environ.get("SEGRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "segrt")
    return Path(root)


def _bundle_digest(bundle: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(bundle.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(bundle)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def demo_artifact(log=print) -> Path:
    """Export the shipped demo bundle once per bundle content and return the cached artifact directory."""
    from segrt.artifact import Artifact
    from segrt.errors import ArtifactError

    target = _cache_root() / f"demo-artifact-{_bundle_digest(DEMO_BUNDLE)}"
    if target.exists():
        try:
            Artifact.load(target)
            return target
        except ArtifactError:
            import shutil

            shutil.rmtree(target)
    log(f"exporting the demo bundle {DEMO_BUNDLE} → {target} (once)")
    from segrt.export import export

    target.parent.mkdir(parents=True, exist_ok=True)
    export(DEMO_BUNDLE, target)
    return target


def run_demo(out_dir="segrt-demo", orientation: str = "LPS", spacing=(0.9, 0.9, 2.5), seed: int = 7,
             quiet: bool = False, device: str = "auto") -> dict:
    from segrt.engine.engine import Engine
    from segrt.phantom import DEFAULT_FOV_MM, dice_per_class, make_phantom, shape_for_fov
    from segrt.volume import Volume, save_labels, save_volume

    say = (lambda *a, **k: None) if quiet else print
    from segrt.errors import OutputError
    from segrt.safety import check_output_dir

    out = Path(out_dir)
    if not out.exists():
        try:
            out.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create the demo directory {str(out)!r}: {exc.strerror or exc}") from None
    check_output_dir(out, what="demo directory")
    t0 = time.perf_counter()
    shape = shape_for_fov(DEFAULT_FOV_MM, tuple(spacing))  # the whole phantom body at this spacing
    image, truth, affine, names = make_phantom(shape=shape, spacing=tuple(spacing), axcodes=orientation, seed=seed)
    img_path, truth_path, lab_path = out / "phantom_ct.nii.gz", out / "phantom_truth.nii.gz", out / "phantom_labels.nii.gz"
    save_volume(Volume.from_array(image, affine=affine), img_path)
    save_labels(truth.astype(np.uint8), affine, truth_path)
    say(f"phantom CT {image.shape[0]}×{image.shape[1]}×{image.shape[2]} voxels, spacing "
        f"{' × '.join(f'{s:g}' for s in spacing)} mm, orientation {orientation} ({time.perf_counter() - t0:.1f} s)")

    art = demo_artifact(log=say)
    with Engine.load(art, device=device) as eng:
        seg = eng.segment(img_path, output=lab_path, progress=not quiet and sys.stderr.isatty())
        seg.timings["load"] += eng.load_seconds
    num_classes = eng.spec.num_classes
    dice = dice_per_class(seg.labels, truth, num_classes)
    fg = [d for k, d in dice.items() if k != 0]
    mean = float(np.nanmean(fg))
    say("")
    say("  class               Dice   volume (mL)")
    vols = seg.volumes_ml()
    for k, d in dice.items():
        if k == 0:
            continue
        name = eng.spec.class_name(k)
        say(f"  {name:<18} {d:6.3f}   {vols.get(name, 0.0):10.1f}")
    say(f"  {'mean':<18} {mean:6.3f}")
    say("")
    from segrt.report import print_timings

    if not quiet:
        print_timings(seg.timings)
    say("")
    preview_path, files = out / "preview.png", [img_path, truth_path, lab_path]
    try:
        seg.write_preview(preview_path, title=f"segrt demo: phantom CT, mean Dice {mean:.3f}")
        files.append(preview_path)
    except OutputError as exc:  # matplotlib missing: the demo itself has succeeded
        preview_path = None
        say(f"(no preview.png: {exc})")
    say(f"files in {out.resolve()}:")
    for p in files:
        say(f"  {p.name}")
    if preview_path is not None:
        say(f"preview: {preview_path.resolve()}")
    return {"dice": dice, "mean_dice": mean, "timings": seg.timings, "labels_path": str(lab_path),
            "preview_path": None if preview_path is None else str(preview_path), "artifact": str(art)}
