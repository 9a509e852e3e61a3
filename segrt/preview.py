"""A quick-look PNG of a segmentation (:func:`write_preview`): three orthogonal slices (axial, coronal, sagittal)
through the centroid of the segmented structures (the volume's centre when there are none), the input image in
grey (windowed at its 1st-99th percentiles) under a semi-transparent colour per label, and a legend of the classes
visible in the three slices.

Orientation: the arrays are first reoriented to RAS with :mod:`nibabel.orientations` (the nearest axes: an oblique
grid is shown on its own voxel axes, unrotated), then shown the radiological way: axial and coronal with the
patient's right on the left of the picture, anterior (axial) or superior (coronal, sagittal) at the top, sagittal
with anterior on the left; each panel's edges are lettered (R/L, A/P, S/I). Pixels keep the voxel spacing's aspect
ratio. A volume stored LPS (or any axis order) gives the same picture as its RAS copy.

Colours (:func:`label_colour`) depend on the label value only, so a class has the same colour in every preview:
18 distinct hand-picked colours (matplotlib's tab20 without its greys) for labels 1-18, then golden-angle hues.

matplotlib is an optional dependency (``pip install 'segrt[preview]'``), imported only here, and used through its
object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no global state. The picture is 1500x600 px, written
through a temporary name and ``os.replace``.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np

from segrt.errors import OutputError
from segrt.safety import atomic_write
from segrt.stats import _check_affine, _check_image, _check_labels

__all__ = ["write_preview", "label_colour", "OVERLAY_ALPHA", "MAX_LEGEND"]

#: opacity of the label colours over the grey image
OVERLAY_ALPHA = 0.45
#: legend entries shown (beyond: "+N more")
MAX_LEGEND = 30
FIGSIZE_IN, DPI = (15.0, 6.0), 100
_WINDOW_PERCENTILES = (1.0, 99.0)
_WINDOW_SAMPLES = 2_000_000

_PALETTE = [  # matplotlib's tab20, dark then light, without the two greys (invisible over a grey image)
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
]


def label_colour(label: int) -> tuple[float, float, float]:
    """The RGB colour (0-1) of a label value: a fixed palette, then golden-angle hues with varied saturation and
    value (neighbouring labels get distinct colours)."""
    label = int(label)
    if 1 <= label <= len(_PALETTE):
        h = _PALETTE[label - 1]
        return tuple(int(h[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
    hue = (label * 0.6180339887498949) % 1.0
    sat = (0.85, 0.55, 0.7)[label % 3]
    val = (0.95, 0.75)[(label // 3) % 2]
    return colorsys.hsv_to_rgb(hue, sat, val)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise OutputError("--preview needs matplotlib: pip install 'segrt[preview]'") from exc
    return Figure, FigureCanvasAgg, Patch


def _to_ras(labels, image, affine):
    """Views of ``labels`` and ``image`` with axes reordered / flipped to RAS, and their affine."""
    import nibabel.orientations as nio

    tr = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    lab = nio.apply_orientation(labels, tr)
    img = None if image is None else nio.apply_orientation(image, tr)
    return lab, img, affine @ nio.inv_ornt_aff(tr, labels.shape)


def _centre(lab: np.ndarray) -> tuple[int, int, int]:
    """The voxel nearest the centroid of the foreground (the middle voxel when there is none)."""
    fg = lab != 0
    prof_ij = np.count_nonzero(fg, axis=2)
    n = int(prof_ij.sum())
    if n == 0:
        return tuple(s // 2 for s in lab.shape)
    profs = [prof_ij.sum(axis=1), prof_ij.sum(axis=0), np.count_nonzero(fg, axis=(0, 1))]
    return tuple(int(min(max(round(float(np.arange(len(p)) @ p) / n), 0), len(p) - 1)) for p in profs)


def _window(img: np.ndarray | None) -> tuple[float, float]:
    if img is None:
        return 0.0, 1.0
    step = max(1, int(np.ceil((img.size / _WINDOW_SAMPLES) ** (1 / 3))))
    sample = np.asarray(img[::step, ::step, ::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, _WINDOW_PERCENTILES))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _display(a: np.ndarray) -> np.ndarray:
    """A RAS slice (u, v) as shown: rows = v descending (A or S at the top), columns = u descending (R, or A for the
    sagittal, on the left)."""
    return np.asarray(a).T[::-1, ::-1]


def _compose(grey: np.ndarray | None, lab: np.ndarray, window, colours: dict) -> np.ndarray:
    lo, hi = window
    if grey is None:
        g = np.zeros(lab.shape, np.float64)
    else:
        g = np.clip((np.asarray(grey, np.float64) - lo) / (hi - lo), 0.0, 1.0)
        g[~np.isfinite(g)] = 0.0
    rgb = np.repeat(g[..., None], 3, axis=2)
    for value, col in colours.items():
        m = lab == value
        if m.any():
            rgb[m] = (1.0 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * np.asarray(col)
    return rgb


def _render(labels, affine, image, class_names, title):
    """The Figure (with its Agg canvas) and what it shows: ``{"centre": (i, j, k) in RAS voxels, "legend":
    [(label, name), ...], "window": (lo, hi)}``."""
    Figure, FigureCanvasAgg, Patch = _matplotlib()
    labels = _check_labels(labels)
    aff = _check_affine(affine)
    image = _check_image(image, labels.shape)
    lab, img, raff = _to_ras(labels, image, aff)
    sp = np.sqrt((raff[:3, :3] ** 2).sum(axis=0))
    ci, cj, ck = _centre(lab)
    world = raff[:3, :3] @ np.array([ci, cj, ck], np.float64) + raff[:3, 3]
    window = _window(img)
    # (name, RAS slice of the labels, of the image, spacing (u, v), edge letters left/right/top/bottom)
    panels = [
        (f"axial  z = {world[2]:.1f} mm", lab[:, :, ck], None if img is None else img[:, :, ck], (sp[0], sp[1]),
         "RLAP"),
        (f"coronal  y = {world[1]:.1f} mm", lab[:, cj, :], None if img is None else img[:, cj, :], (sp[0], sp[2]),
         "RLSI"),
        (f"sagittal  x = {world[0]:.1f} mm", lab[ci, :, :], None if img is None else img[ci, :, :],
         (sp[1], sp[2]), "APSI"),
    ]
    shown = sorted({int(v) for _, ls, _, _, _ in panels for v in np.unique(ls) if v != 0})
    colours = {v: label_colour(v) for v in shown}

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.62], left=0.01, right=0.99, bottom=0.02, top=0.9,
                          wspace=0.04)
    for c, (name, ls, gs2d, (su, sv), letters) in enumerate(panels):
        ax = fig.add_subplot(gs[0, c])
        nu, nv = ls.shape
        rgb = _compose(None if gs2d is None else _display(gs2d), _display(ls), window, colours)
        ax.imshow(rgb, origin="upper", extent=(0, nu * su, 0, nv * sv), interpolation="nearest", aspect="equal")
        ax.set_axis_off()
        ax.set_title(name, color="white", fontsize=11)
        style = dict(color="yellow", fontsize=10, fontweight="bold", transform=ax.transAxes)
        ax.text(0.01, 0.5, letters[0], ha="left", va="center", **style)
        ax.text(0.99, 0.5, letters[1], ha="right", va="center", **style)
        ax.text(0.5, 0.99, letters[2], ha="center", va="top", **style)
        ax.text(0.5, 0.01, letters[3], ha="center", va="bottom", **style)
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    legend = [(v, names.get(v, f"class_{v}")) for v in shown]
    lax = fig.add_subplot(gs[0, 3])
    lax.set_axis_off()
    entries = legend if len(legend) <= MAX_LEGEND else legend[:MAX_LEGEND - 1]
    handles = [Patch(facecolor=colours[v], edgecolor="none", label=f"{v}  {n}") for v, n in entries]
    if len(entries) < len(legend):
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"+{len(legend) - len(entries)} more"))
    if handles:
        lax.legend(handles=handles, loc="upper left", frameon=False, fontsize=9, labelcolor="white",
                   handlelength=1.6, handleheight=1.1, borderaxespad=0.0)
    else:
        lax.text(0.0, 1.0, "no structure in these slices", color="white", fontsize=10, va="top",
                 transform=lax.transAxes)
    fig.suptitle(title if title is not None else
                 f"segrt - slices through ({world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f}) mm RAS",
                 color="white", fontsize=13)
    return fig, {"centre": (ci, cj, ck), "legend": legend, "window": window}


def write_preview(labels: np.ndarray, affine, image: np.ndarray | None, path: str | os.PathLike,
                  class_names: dict[int, str] | None = None, *, title: str | None = None) -> Path:
    """Write a 1500x600 px PNG of three orthogonal slices of ``labels`` ((X, Y, Z) integers on ``affine``'s grid)
    over ``image`` ((X, Y, Z) or (C, X, Y, Z) whose first channel is used; None: black) to ``path`` (``.png``).
    Needs matplotlib (else :class:`OutputError`); an unknown extension is an :class:`OutputError`."""
    out = Path(path)
    if not out.name.lower().endswith(".png") or len(out.name) <= 4:
        raise OutputError(f"preview {str(out)!r} has an unknown extension; expected a name ending with .png")
    fig, _ = _render(labels, affine, image, class_names, title)
    return atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=DPI, facecolor=fig.get_facecolor()),
                        ext=".png")

