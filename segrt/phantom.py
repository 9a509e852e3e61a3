"""Synthetic CT-like abdomen phantoms with ground-truth labels (NumPy only).

The anatomy is defined in RAS world coordinates (millimetres), so the same ``seed`` gives the
same anatomy whatever the voxel grid: spacing, shape and axis codes only decide where the
voxels sample it. A phantom is a body (an elliptic cylinder along the superior axis) of soft
tissue inside a fat layer, in air, holding a liver, a spleen, two kidneys and bones (a spine
column and rib arcs), plus unlabelled distractors (aorta, a gas-filled stomach) whose
intensities overlap the organs', so a model has to use shape and context, not a threshold.

Public API::

    make_phantom(shape, spacing, axcodes="RAS", seed=0, ...) -> (image, labels, affine, class_names)
    save_phantom(path_image, path_labels, **make_phantom_kwargs) -> (image, labels, affine, class_names)
    phantom_affine(shape, spacing, axcodes="RAS", center=(0, 0, 0)) -> 4x4 float64
    shape_for_fov(fov_mm, spacing) -> tuple of 3 ints
    dice_per_class(pred, gt, num_classes) -> {class index: Dice}

Size: over 400 lines because one table of synthetic organs and the geometry that draws them; split, the table would
be separated from the shapes it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_FOV_MM",
    "make_phantom",
    "save_phantom",
    "phantom_affine",
    "shape_for_fov",
    "dice_per_class",
]

#: Label index -> class name, the ``channel_def`` of the demo bundle.
CLASS_NAMES: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "bone",
}

#: Field of view (mm) that holds the whole body cross-section: 320 x 320 x 240 mm.
DEFAULT_FOV_MM = (320.0, 320.0, 240.0)

# Nominal intensities (HU).
_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft": 40.0,
    "liver": 75.0,
    "spleen": 115.0,
    "kidney": 180.0,
    "aorta": 170.0,
    "stomach": 30.0,
    "gas": -850.0,
    "marrow": 300.0,
    "cortex": 750.0,
    "rib": 550.0,
}

_AXIS_OF_CODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _check_triple(name: str, value, kind) -> tuple:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of 3 numbers, got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{name} must have 3 entries, got {len(items)}: {value!r}")
    try:
        out = tuple(kind(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers, got {value!r}") from None
    return out


def _check_axcodes(axcodes: str) -> str:
    if not isinstance(axcodes, str) or len(axcodes) != 3:
        raise ValueError(f"axcodes must be a 3-letter string such as 'RAS' or 'LPS', got {axcodes!r}")
    codes = axcodes.upper()
    if any(c not in _AXIS_OF_CODE for c in codes):
        raise ValueError(f"axcodes letters must be among R/L, A/P, S/I, got {axcodes!r}")
    if len({_AXIS_OF_CODE[c][0] for c in codes}) != 3:
        raise ValueError(f"axcodes must name each of the three world axes once, got {axcodes!r}")
    return codes


def phantom_affine(
    shape: Sequence[int],
    spacing: Sequence[float],
    axcodes: str = "RAS",
    center: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Voxel-to-RAS-world affine of a grid with the given axis codes, centred on ``center`` (mm).

    Voxel axis ``i`` points to the world direction named by ``axcodes[i]`` (nibabel convention:
    "R" means the index grows towards the right, "L" towards the left, ...), with step
    ``spacing[i]``; the centre of the grid, index ``(shape - 1) / 2``, lies at ``center``.
    """
    shape = _check_triple("shape", shape, int)
    spacing = _check_triple("spacing", spacing, float)
    center = _check_triple("center", center, float)
    codes = _check_axcodes(axcodes)
    if any(n < 1 for n in shape):
        raise ValueError(f"shape entries must be >= 1, got {shape}")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing entries must be finite and > 0 mm, got {spacing}")
    aff = np.zeros((4, 4), dtype=np.float64)
    for i, code in enumerate(codes):
        w, sign = _AXIS_OF_CODE[code]
        aff[w, i] = sign * spacing[i]
    aff[3, 3] = 1.0
    mid = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    aff[:3, 3] = np.asarray(center) - aff[:3, :3] @ mid
    return aff


def shape_for_fov(fov_mm: Sequence[float], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Number of voxels per axis that covers ``fov_mm`` at ``spacing`` (at least 1)."""
    fov = _check_triple("fov_mm", fov_mm, float)
    sp = _check_triple("spacing", spacing, float)
    if any(s <= 0 for s in sp) or any(f <= 0 for f in fov):
        raise ValueError(f"fov_mm and spacing must be > 0, got {fov} and {sp}")
    return tuple(max(1, int(round(f / s))) for f, s in zip(fov, sp))


# --------------------------------------------------------------------------------------------
# Random anatomy (drawn from the seed only, never from the grid)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    center: np.ndarray  # (3,) anatomical mm
    radii: np.ndarray  # (3,)
    rot: np.ndarray  # (3, 3) anatomical -> local
    bump_k: np.ndarray  # (n, 3) wave vectors for a smooth surface deformation
    bump_phase: np.ndarray  # (n,)
    bump_amp: float


@dataclass(frozen=True)
class _Anatomy:
    rot: np.ndarray  # world -> anatomical rotation
    shift: np.ndarray  # world position of the anatomical origin
    scale: float
    body_a: float
    body_b: float
    fat: float
    liver: _Ellipsoid
    spleen: _Ellipsoid
    kidney_l: _Ellipsoid
    kidney_r: _Ellipsoid
    stomach: _Ellipsoid
    gas: _Ellipsoid
    aorta_xy: np.ndarray
    aorta_r: float
    spine_xy: np.ndarray
    spine_r: float
    rib_levels: np.ndarray
    rib_r: float
    rib_tilt: float
    tex_k: np.ndarray  # (n, 3) texture wave vectors (1/mm)
    tex_phase: np.ndarray
    tex_amp: dict


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_ellipsoid(rng: np.random.Generator, center, radii, jitter_c: float, jitter_r: float, tilt_deg: float,
                    bump_amp: float) -> _Ellipsoid:
    c = np.asarray(center, float) + rng.uniform(-jitter_c, jitter_c, 3)
    r = np.asarray(radii, float) * rng.uniform(1 - jitter_r, 1 + jitter_r, 3)
    ang = np.deg2rad(rng.uniform(-tilt_deg, tilt_deg, 3))
    k = rng.normal(0.0, 1.0, (3, 3)) * (2 * np.pi / 90.0)
    ph = rng.uniform(0, 2 * np.pi, 3)
    return _Ellipsoid(c, r, _rotation(*ang).T, k, ph, bump_amp)


def _draw_anatomy(seed: int, pose_jitter: bool) -> _Anatomy:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 20240917]))
    # Pose: world = shift + rot.T @ (scale * p), p anatomical.
    if pose_jitter:
        rot = _rotation(*np.deg2rad(rng.uniform([-4, -4, -10], [4, 4, 10])))
        shift = rng.uniform([-15, -15, -20], [15, 15, 20])
        scale = float(rng.uniform(0.9, 1.1))
    else:
        rng.uniform(size=7)  # keep the stream aligned
        rot, shift, scale = np.eye(3), np.zeros(3), 1.0
    body_a = float(rng.uniform(130, 150))
    body_b = float(rng.uniform(92, 108))
    fat = float(rng.uniform(8, 16))
    liver = _draw_ellipsoid(rng, (52, 8, 45), (70, 58, 52), 6, 0.08, 12, 0.06)
    spleen = _draw_ellipsoid(rng, (-78, -22, 55), (30, 44, 46), 5, 0.10, 12, 0.05)
    kidney_l = _draw_ellipsoid(rng, (-58, -48, -8), (24, 20, 48), 5, 0.10, 10, 0.04)
    kidney_r = _draw_ellipsoid(rng, (58, -48, -25), (24, 20, 48), 5, 0.10, 10, 0.04)
    stomach = _draw_ellipsoid(rng, (-35, 35, 55), (35, 28, 38), 6, 0.10, 15, 0.05)
    gas = _Ellipsoid(stomach.center + np.array([0, 14, 10]), stomach.radii * 0.45, stomach.rot,
                     stomach.bump_k, stomach.bump_phase, 0.0)
    aorta_xy = np.array([-12.0, -22.0]) + rng.uniform(-4, 4, 2)
    aorta_r = float(rng.uniform(9, 12))
    spine_xy = np.array([0.0, -62.0]) + rng.uniform(-3, 3, 2)
    spine_r = float(rng.uniform(17, 21))
    first = float(rng.uniform(-10, 10))
    rib_levels = first + 38.0 * np.arange(-1, 5)
    rib_r = float(rng.uniform(6.5, 8.0))
    rib_tilt = float(rng.uniform(0.15, 0.3))
    n_tex = 6
    tex_k = rng.normal(0.0, 1.0, (n_tex, 3)) * (2 * np.pi / 25.0)
    tex_phase = rng.uniform(0, 2 * np.pi, n_tex)
    tex_amp = {name: float(rng.uniform(4, 10)) for name in ("soft", "liver", "spleen", "kidney", "fat")}
    return _Anatomy(rot, shift, scale, body_a, body_b, fat, liver, spleen, kidney_l, kidney_r, stomach, gas,
                    aorta_xy, aorta_r, spine_xy, spine_r, rib_levels, rib_r, rib_tilt, tex_k, tex_phase, tex_amp)


def _inside(e: _Ellipsoid, px, py, pz) -> np.ndarray:
    dx, dy, dz = px - e.center[0], py - e.center[1], pz - e.center[2]
    r = e.rot
    lx = r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz
    ly = r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz
    lz = r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz
    q = (lx / e.radii[0]) ** 2 + (ly / e.radii[1]) ** 2 + (lz / e.radii[2]) ** 2
    if e.bump_amp:
        bump = np.zeros_like(q)
        for k, ph in zip(e.bump_k, e.bump_phase):
            bump += np.cos(k[0] * dx + k[1] * dy + k[2] * dz + ph)
        q = q * (1.0 + e.bump_amp * bump / len(e.bump_phase) * 2.0)
    return q <= 1.0


def _paint(anat: _Anatomy, px, py, pz) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU and labels at anatomical points (arrays of equal shape, float32)."""
    tex = np.zeros(px.shape, np.float32)
    for k, ph in zip(anat.tex_k, anat.tex_phase):
        tex += np.cos(k[0] * px + k[1] * py + k[2] * pz + ph).astype(np.float32)
    tex /= np.sqrt(len(anat.tex_phase) / 2.0)

    hu = np.full(px.shape, _HU["air"], np.float32)
    lab = np.zeros(px.shape, np.uint8)
    # Body: elliptic cylinder whose radii breathe slowly along z.
    wob = 1.0 + 0.04 * np.sin(pz / 70.0)
    rho = np.sqrt((px / (anat.body_a * wob)) ** 2 + (py / (anat.body_b * wob)) ** 2)
    body = rho <= 1.0
    inner = np.sqrt((px / (anat.body_a * wob - anat.fat)) ** 2 + (py / (anat.body_b * wob - anat.fat)) ** 2) <= 1.0
    hu[body] = _HU["fat"] + anat.tex_amp["fat"] * tex[body]
    hu[inner] = _HU["soft"] + anat.tex_amp["soft"] * tex[inner]

    def put(mask, value, label=None, amp=0.0):
        mask &= inner
        hu[mask] = value + amp * tex[mask]
        if label is not None:
            lab[mask] = label

    put(_inside(anat.stomach, px, py, pz), _HU["stomach"], 0, anat.tex_amp["soft"])
    put(_inside(anat.gas, px, py, pz), _HU["gas"], 0, 20.0)
    put(_inside(anat.liver, px, py, pz), _HU["liver"], 1, anat.tex_amp["liver"])
    put(_inside(anat.spleen, px, py, pz), _HU["spleen"], 2, anat.tex_amp["spleen"])
    put(_inside(anat.kidney_l, px, py, pz), _HU["kidney"], 3, anat.tex_amp["kidney"])
    put(_inside(anat.kidney_r, px, py, pz), _HU["kidney"], 4, anat.tex_amp["kidney"])
    aorta = (px - anat.aorta_xy[0]) ** 2 + (py - anat.aorta_xy[1]) ** 2 <= anat.aorta_r**2
    put(aorta, _HU["aorta"], 0, 5.0)

    # Spine: a vertebral-body cylinder (cortical shell, marrow core) and a posterior process.
    sx, sy = px - anat.spine_xy[0], py - anat.spine_xy[1]
    d2 = sx**2 + sy**2
    vert = d2 <= anat.spine_r**2
    put(vert, _HU["cortex"], 5, 30.0)
    put(d2 <= (anat.spine_r - 5.0) ** 2, _HU["marrow"], 5, 30.0)
    process = (np.abs(sx) <= 5.0) & (sy <= -anat.spine_r + 2.0) & (sy >= -anat.spine_r - 24.0)
    put(process, _HU["cortex"], 5, 30.0)

    # Ribs: tubes following an ellipse inside the body, descending anteriorly, with an
    # anterior gap (no sternum).
    ra, rb = 0.86 * anat.body_a * wob, 0.86 * anat.body_b * wob
    r_norm = np.sqrt((px / ra) ** 2 + (py / rb) ** 2)
    d_xy = (r_norm - 1.0) * (0.5 * (ra + rb))
    ang = np.abs(np.arctan2(px, py))  # 0 = anterior
    arc = (ang > np.deg2rad(28)) & (ang < np.deg2rad(160))
    zrel = pz + anat.rib_tilt * py
    rib = np.zeros(px.shape, bool)
    near = arc & (np.abs(d_xy) <= anat.rib_r)
    if near.any():
        for lv in anat.rib_levels:
            rib |= near & (d_xy**2 + ((zrel - lv) * 0.8) ** 2 <= anat.rib_r**2)
    put(rib, _HU["rib"], 5, 30.0)
    return hu, lab


def make_phantom(
    shape: Sequence[int] = (160, 160, 120),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    axcodes: str = "RAS",
    seed: int = 0,
    *,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    noise_std: float = 15.0,
    pose_jitter: bool = True,
    chunk: int = 24,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """Make a CT-like phantom and its labels on the grid ``shape`` x ``spacing`` with ``axcodes``.

    Returns ``(image, labels, affine, class_names)``: ``image`` float32 HU and ``labels`` uint8
    (values in :data:`CLASS_NAMES`), both indexed like the grid (``shape``), ``affine`` the 4x4
    voxel-to-RAS-world matrix (float64) of :func:`phantom_affine`, ``class_names`` a copy of
    :data:`CLASS_NAMES`. The anatomy (pose, sizes, texture) depends on ``seed`` only; the white
    noise of std ``noise_std`` HU is drawn per voxel from ``seed`` and the grid shape.

    ``center`` is the world point (mm) at the centre of the grid (moving it moves the field of view,
    not the anatomy); ``pose_jitter=False`` puts the anatomy in its nominal pose (no random rotation,
    translation or global scale; organ sizes still vary with the seed); ``chunk`` is the number of
    slices along the last voxel axis evaluated at once (memory only, no effect on the result).
    """
    shape = _check_triple("shape", shape, int)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0 HU, got {noise_std!r}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    affine = phantom_affine(shape, spacing, axcodes, center)
    anat = _draw_anatomy(int(seed), bool(pose_jitter))

    image = np.empty(shape, np.float32)
    labels = np.empty(shape, np.uint8)
    # Anatomical coordinates p = rot @ (world - shift) / scale, world = A[:3,:3] @ ijk + t.
    m = anat.rot @ affine[:3, :3] / anat.scale
    off = anat.rot @ (affine[:3, 3] - anat.shift) / anat.scale
    i = np.arange(shape[0], dtype=np.float64)[:, None, None]
    j = np.arange(shape[1], dtype=np.float64)[None, :, None]
    for k0 in range(0, shape[2], int(chunk)):
        k = np.arange(k0, min(k0 + int(chunk), shape[2]), dtype=np.float64)[None, None, :]
        p = [(m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + off[a]).astype(np.float32) for a in range(3)]
        p = [np.broadcast_to(c, (shape[0], shape[1], k.shape[2])) for c in p]
        hu, lab = _paint(anat, *p)
        image[:, :, k0:k0 + k.shape[2]] = hu
        labels[:, :, k0:k0 + k.shape[2]] = lab
    if noise_std > 0:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7, *shape]))
        image += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_std)
    return image, labels, affine, dict(CLASS_NAMES)


def save_phantom(path_image: str | Path, path_labels: str | Path, **kwargs) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray, dict[int, str]]:
    """Make a phantom with ``make_phantom(**kwargs)`` and write image and labels as NIfTI files.

    Both files carry the phantom affine as sform and qform (code 1); the image is stored as
    float32 HU, the labels as uint8. Returns what :func:`make_phantom` returned.
    """
    import nibabel as nib

    image, labels, affine, names = make_phantom(**kwargs)
    for data, path in ((image, path_image), (labels, path_labels)):
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    return image, labels, affine, names


def dice_per_class(pred, gt, num_classes: int) -> dict[int, float]:
    """Dice of every class ``0 .. num_classes - 1`` between two label maps of equal shape.

    ``Dice = 2 |P ∩ G| / (|P| + |G|)``; a class absent from both maps gets ``nan`` (no evidence
    either way), so ``np.nanmean`` over the foreground classes gives the usual mean Dice.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    for name, arr in (("pred", pred), ("gt", gt)):
        if arr.dtype.kind not in "iub":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                continue
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes - 1}], got range [{arr.min()}, {arr.max()}]"
            )
    p = pred.astype(np.int64).ravel()
    g = gt.astype(np.int64).ravel()
    n_p = np.bincount(p, minlength=num_classes)
    n_g = np.bincount(g, minlength=num_classes)
    n_pg = np.bincount(p[p == g], minlength=num_classes)
    out: dict[int, float] = {}
    for c in range(num_classes):
        denom = n_p[c] + n_g[c]
        out[c] = float("nan") if denom == 0 else float(2.0 * n_pg[c] / denom)
    return out
