"""Read a MONAI bundle: its network (with weights) and the segrt :class:`~segrt.spec.Spec` of its pipeline.

The bundle's ``configs/inference.json`` (+ ``configs/metadata.json``) is parsed with MONAI's own
:class:`monai.bundle.ConfigParser`, so references (``@x``), expressions (``$...``) and user overrides
(``{"displayable_configs#highres": False}``) mean exactly what they mean to ``monai.bundle run``.
The pipeline is *not* instantiated: each transform's resolved config is read and translated into the
spec, and every transform or option segrt does not implement is refused with
:class:`~segrt.errors.UnsupportedTransform` naming it. Nothing is ever skipped silently.

torch and monai are imported lazily (inside the functions): importing this module is cheap.

Size: over 400 lines because one translation per supported MONAI transform and SlidingWindowInferer argument, each
with the refusal message for what segrt cannot honour; reading a bundle is one concept whose size is the number of
transforms it understands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segrt.errors import ExportError, SpecError, UnsupportedTransform
from segrt.spec import (
    InferenceSpec,
    IntensityOp,
    Postprocessing,
    Preprocessing,
    SkipRule,
    SpacingSpec,
    Spec,
)

__all__ = [
    "LoadedBundle",
    "load_bundle",
    "load_parser",
    "spec_from_bundle",
    "spec_from_parser",
    "gaussian_profiles",
]

log = logging.getLogger(__name__)

INFERENCE_CONFIG = "configs/inference.json"
METADATA_CONFIG = "configs/metadata.json"
DEFAULT_WEIGHTS = "models/model.pt"

# Config keys of a component that are not constructor arguments.
_SPECIAL_KEYS = {"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"}


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

def _check_bundle_dir(bundle_dir) -> Path:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise ExportError(f"bundle directory {str(root)!r} does not exist or is not a directory "
                          f"(expected a MONAI bundle holding {INFERENCE_CONFIG})")
    if not (root / INFERENCE_CONFIG).is_file():
        raise ExportError(f"{str(root)!r} is not a MONAI bundle: {INFERENCE_CONFIG} is missing")
    return root.resolve()


def load_parser(bundle_dir, overrides: dict | None = None):
    """A :class:`monai.bundle.ConfigParser` holding the bundle's inference + metadata configs.

    ``bundle_root`` is set to the bundle directory, then ``overrides`` (id → value, e.g.
    ``{"displayable_configs#highres": False}``) are applied, exactly like ``monai.bundle run`` does.
    """
    from monai.bundle import ConfigParser

    root = _check_bundle_dir(bundle_dir)
    if overrides is not None and not isinstance(overrides, dict):
        raise ExportError(f"overrides must be a dict of config id -> value, got {type(overrides).__name__}")
    parser = ConfigParser()
    try:
        parser.read_config(str(root / INFERENCE_CONFIG))
        if (root / METADATA_CONFIG).is_file():
            parser.read_meta(str(root / METADATA_CONFIG))
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read the configs of bundle {str(root)!r}: {exc}") from exc
    parser["bundle_root"] = str(root)
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise ExportError(f"override keys must be config ids (str), got {key!r}")
        if not _has(parser, key):  # a typo would otherwise add a new key that nothing reads
            raise ExportError(_unknown_override(parser, key))
        parser[key] = value
    return parser


def _config_ids(config, prefix: str = ""):
    """Every id of a (nested) bundle config: dict keys and list indices joined with ``#``."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in items:
        id_ = f"{prefix}#{k}" if prefix else str(k)
        yield id_
        yield from _config_ids(v, id_)


def _unknown_override(parser, key: str) -> str:
    import difflib

    sep = "::" if "::" in key and "#" not in key else "#"
    ids = [i.replace("#", sep) for i in _config_ids(parser.get())]
    close = difflib.get_close_matches(key, ids, n=1)
    hint = (f"; did you mean {close[0]!r}?" if close else
            " (an override replaces an existing key: nested keys joined with '#', e.g. 'inferer#roi_size')")
    return f"override {key!r} matches no key of the bundle config{hint}"


def _has(parser, id_: str) -> bool:
    try:
        return id_ in parser
    except Exception:  # noqa: BLE001 - ConfigParser.__contains__ may raise on odd ids
        return False


def _locate(name: str):
    """Import ``package.module.Name`` and return the object, or raise ImportError/AttributeError."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as exc:
            # only keep walking up when it is this very prefix that does not exist
            if exc.name and ".".join(parts[:i]).startswith(exc.name):
                continue
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    return importlib.import_module(name)


def _component(parser, id_: str):
    """The parsed (references and expressions resolved) but not instantiated item ``id_``."""
    try:
        return parser.get_parsed_content(id_, instantiate=False)
    except KeyError as exc:
        raise SpecError(f"bundle config has no {id_!r} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - expressions may raise anything
        raise SpecError(f"cannot resolve bundle config {id_!r}: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Item:
    """One transform / inferer of the config: its class, resolved args, and where it is."""

    where: str
    target: str
    cls: Any
    args: dict

    @property
    def name(self) -> str:
        return getattr(self.cls, "__name__", self.target)


def _item(parser, id_: str) -> _Item | None:
    from monai.bundle.config_item import ConfigComponent

    comp = _component(parser, id_)
    if not isinstance(comp, ConfigComponent):
        raise UnsupportedTransform(
            f"{id_}: expected a component with a '_target_' (a MONAI transform), got "
            f"{type(comp).__name__} {comp!r}; segrt can only read components written as "
            f"{{'_target_': ..., args}}")
    if comp.is_disabled():
        return None
    cfg = comp.get_config()
    mode = cfg.get("_mode_", "default")
    if mode != "default":
        raise UnsupportedTransform(f"{id_}: _mode_={mode!r} is not supported (only the default mode)")
    target = comp.resolve_module_name()
    if isinstance(target, str):
        try:
            cls = _locate(target)
        except (ImportError, AttributeError) as exc:
            raise UnsupportedTransform(f"{id_}: cannot resolve _target_ {cfg.get('_target_')!r} "
                                       f"({type(exc).__name__}: {exc})") from exc
    else:
        cls = target
    args = {k: v for k, v in comp.resolve_args().items() if k not in _SPECIAL_KEYS}
    return _Item(id_, str(cfg.get("_target_")), cls, args)


def _list_items(parser, compose_id: str) -> list[_Item]:
    """The enabled transforms of a Compose at ``compose_id``, in order."""
    from monai.transforms import Compose

    top = _item(parser, compose_id)
    if top is None:
        return []
    if top.cls is not Compose:
        raise UnsupportedTransform(f"{compose_id}: expected a Compose of transforms, got {top.name}")
    extra = set(top.args) - {"transforms", "map_items", "unpack_items", "log_stats", "lazy", "overrides"}
    if extra:
        raise UnsupportedTransform(f"{compose_id}: Compose option(s) {sorted(extra)} are not supported")
    if top.args.get("lazy"):
        raise UnsupportedTransform(f"{compose_id}: Compose(lazy=True) is not supported")
    raw = parser[f"{compose_id}#transforms"]
    if not isinstance(raw, list):
        raise UnsupportedTransform(f"{compose_id}#transforms: expected a list of transforms, got "
                                   f"{type(raw).__name__}")
    items = []
    for i in range(len(raw)):
        it = _item(parser, f"{compose_id}#transforms#{i}")
        if it is not None:
            items.append(it)
    return items


# ---------------------------------------------------------------------------------------------
# per-transform translation
# ---------------------------------------------------------------------------------------------

def _signature_defaults(cls) -> dict:
    import inspect

    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name == "self":
            continue
        out[name] = p.default
    return out


def _same(a, b) -> bool:
    try:
        import numpy as np

        if a is b:
            return True
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
        if (isinstance(a, type) or isinstance(b, type)) and not (a is None or b is None):
            return np.dtype(a) == np.dtype(b)
        if hasattr(a, "value") and not isinstance(a, (int, float)):  # StrEnum members
            a = a.value
        if hasattr(b, "value") and not isinstance(b, (int, float)):
            b = b.value
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _check_options(item: _Item, used: set, ignored: set, allowed: dict | None = None) -> None:
    """Refuse any argument that segrt neither uses nor ignores unless it has MONAI's default value.

    ``allowed`` maps an argument to extra values accepted besides the default.
    """
    defaults = _signature_defaults(item.cls)
    allowed = allowed or {}
    for key, value in item.args.items():
        if key in used or key in ignored:
            continue
        if key not in defaults and key not in allowed:
            raise UnsupportedTransform(f"{item.where}: {item.name} has an argument {key!r} that segrt "
                                       f"does not know (value {value!r})")
        if key in defaults and _same(value, defaults[key]):
            continue
        if any(_same(value, ok) for ok in allowed.get(key, ())):
            continue
        accepted = ([defaults[key]] if key in defaults else []) + list(allowed.get(key, ()))
        raise UnsupportedTransform(
            f"{item.where}: {item.name}({key}={value!r}) is not supported; segrt implements only "
            f"{key} in {accepted!r} for this transform")


def _arg(item: _Item, key: str):
    return item.args.get(key, _signature_defaults(item.cls).get(key))


def _per_key_single(item: _Item, key: str):
    """A per-key argument (str or sequence of str) that must be the same for every key."""
    value = _arg(item, key)
    if isinstance(value, (list, tuple)):
        vals = {str(getattr(v, "value", v)) for v in value}
        if len(vals) != 1:
            raise UnsupportedTransform(f"{item.where}: {item.name} with different {key} per key "
                                       f"({list(value)!r}) is not supported")
        return next(iter(vals))
    return value if value is None else str(getattr(value, "value", value))


def _num(value, where: str):
    """A number, or a (nested) list of numbers, as plain Python floats for JSON."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # keep integers as written (e.g. a_min=-57)
    try:
        import numpy as np

        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: expected a number or list of numbers, got {value!r}") from exc
    return float(arr) if arr.ndim == 0 else arr.tolist()


def _opt_num(value, where):
    return None if value is None else _num(value, where)


_IGNORED_COMMON = {"keys", "allow_missing_keys"}


def _pre_load(item, state):
    _check_options(item, set(), _IGNORED_COMMON | {
        "meta_keys", "meta_key_postfix", "overwriting", "image_only", "simple_keys",
        "prune_meta_pattern", "prune_meta_sep", "expanduser", "ensure_channel_first"},
        allowed={"reader": ("NibabelReader", "nibabelreader")})


def _pre_ensure_typed(item, state):
    import numpy as np
    import torch

    _check_options(item, set(), _IGNORED_COMMON | {"device", "wrap_sequence", "track_meta"},
                   allowed={"dtype": (np.float32, torch.float32, "float32"),
                            "data_type": ("numpy",)})


def _pre_channel_first(item, state):
    _check_options(item, set(), _IGNORED_COMMON | {"strict_check", "meta_keys", "meta_key_postfix"})


def _pre_orientation(item, state):
    _check_options(item, {"axcodes"}, _IGNORED_COMMON | {"lazy"})
    ax = item.args.get("axcodes")
    if ax is None:
        raise UnsupportedTransform(f"{item.where}: Orientationd without axcodes is not supported")
    if state["spacing"] is not None:
        raise UnsupportedTransform(f"{item.where}: Orientationd after Spacingd is not supported "
                                   f"(segrt orients, then resamples)")
    if state["orientation"] is not None:
        raise UnsupportedTransform(f"{item.where}: a second Orientationd is not supported")
    if state["intensity"]:
        raise UnsupportedTransform(f"{item.where}: Orientationd after an intensity transform is not "
                                   f"supported (segrt applies geometry first)")
    state["orientation"] = str(ax)


def _pre_spacing(item, state):
    _check_options(item, {"pixdim", "mode"}, _IGNORED_COMMON | {"lazy", "ensure_same_shape"})
    if state["spacing"] is not None:
        raise UnsupportedTransform(f"{item.where}: a second Spacingd is not supported")
    if state["intensity"]:
        raise UnsupportedTransform(f"{item.where}: Spacingd after an intensity transform is not "
                                   f"supported (segrt applies geometry first)")
    mode = _per_key_single(item, "mode")
    if mode not in ("bilinear", "nearest"):
        raise UnsupportedTransform(f"{item.where}: Spacingd(mode={mode!r}) is not supported; "
                                   f"expected 'bilinear' or 'nearest'")
    pix = _num(item.args.get("pixdim"), f"{item.where}.pixdim")
    pix = [pix] * 3 if isinstance(pix, (int, float)) else list(pix)
    if len(pix) == 1:
        pix = pix * 3
    if len(pix) != 3:
        raise UnsupportedTransform(f"{item.where}: Spacingd pixdim must have 3 values, got {pix!r}")
    if any(p <= 0 for p in pix):
        raise UnsupportedTransform(f"{item.where}: Spacingd pixdim components <= 0 (keep the input "
                                   f"spacing on that axis) are not supported, got {pix!r}")
    state["spacing"] = SpacingSpec(tuple(pix), mode)


def _pre_normalize(item, state):
    import numpy as np

    _check_options(item, {"nonzero", "channel_wise", "subtrahend", "divisor"}, _IGNORED_COMMON,
                   allowed={"dtype": (np.float32,)})
    # MONAI uses the *truthiness* of these flags: the config string "False" acts as True (notes §4).
    state["intensity"].append(IntensityOp.from_dict({
        "op": "normalize_intensity",
        "nonzero": bool(_arg(item, "nonzero")),
        "channel_wise": bool(_arg(item, "channel_wise")),
        "subtrahend": _opt_num(_arg(item, "subtrahend"), f"{item.where}.subtrahend"),
        "divisor": _opt_num(_arg(item, "divisor"), f"{item.where}.divisor"),
    }))


def _pre_scale(item, state):
    import numpy as np

    _check_options(item, {"minv", "maxv", "factor", "channel_wise"}, _IGNORED_COMMON,
                   allowed={"dtype": (np.float32,)})
    state["intensity"].append(IntensityOp.from_dict({
        "op": "scale_intensity",
        "minv": _opt_num(_arg(item, "minv"), f"{item.where}.minv"),
        "maxv": _opt_num(_arg(item, "maxv"), f"{item.where}.maxv"),
        "factor": _opt_num(_arg(item, "factor"), f"{item.where}.factor"),
        "channel_wise": bool(_arg(item, "channel_wise")),
    }))


def _pre_scale_range(item, state):
    import numpy as np

    _check_options(item, {"a_min", "a_max", "b_min", "b_max", "clip"}, _IGNORED_COMMON,
                   allowed={"dtype": (np.float32,)})
    state["intensity"].append(IntensityOp.from_dict({
        "op": "scale_intensity_range",
        **{k: _opt_num(_arg(item, k), f"{item.where}.{k}") for k in ("a_min", "a_max", "b_min", "b_max")},
        "clip": bool(_arg(item, "clip")),
    }))


def _pre_scale_percentiles(item, state):
    import numpy as np

    _check_options(item, {"lower", "upper", "b_min", "b_max", "clip", "relative", "channel_wise"},
                   _IGNORED_COMMON, allowed={"dtype": (np.float32,)})
    state["intensity"].append(IntensityOp.from_dict({
        "op": "scale_intensity_range_percentiles",
        **{k: _opt_num(_arg(item, k), f"{item.where}.{k}") for k in ("lower", "upper", "b_min", "b_max")},
        **{k: bool(_arg(item, k)) for k in ("clip", "relative", "channel_wise")},
    }))


def _pre_shift(item, state):
    _check_options(item, {"offset"}, _IGNORED_COMMON | {"meta_keys", "meta_key_postfix"})
    state["intensity"].append(IntensityOp.from_dict({
        "op": "shift_intensity", "offset": _num(_arg(item, "offset"), f"{item.where}.offset")}))


def _preprocessing_handlers():
    import monai.transforms as mt

    return {
        mt.LoadImaged: _pre_load,
        mt.EnsureTyped: _pre_ensure_typed,
        mt.EnsureChannelFirstd: _pre_channel_first,
        mt.Orientationd: _pre_orientation,
        mt.Spacingd: _pre_spacing,
        mt.NormalizeIntensityd: _pre_normalize,
        mt.ScaleIntensityd: _pre_scale,
        mt.ScaleIntensityRanged: _pre_scale_range,
        mt.ScaleIntensityRangePercentilesd: _pre_scale_percentiles,
        mt.ShiftIntensityd: _pre_shift,
    }


def _preprocessing(parser) -> Preprocessing:
    handlers = _preprocessing_handlers()
    state: dict = {"orientation": None, "spacing": None, "intensity": []}
    for item in _list_items(parser, "preprocessing"):
        fn = handlers.get(item.cls)  # exact class: a subclass may change the behaviour
        if fn is None:
            raise UnsupportedTransform(
                f"{item.where}: transform {item.target!r} is not supported by segrt (supported: "
                f"{', '.join(sorted(c.__name__ for c in handlers))})")
        fn(item, state)
    return Preprocessing(orientation=state["orientation"], spacing=state["spacing"],
                         intensity=tuple(state["intensity"]))


def _postprocessing(parser, pre: Preprocessing) -> Postprocessing:
    import monai.transforms as mt

    softmax = False
    seen: list[str] = []
    nearest_interp = True
    for item in _list_items(parser, "postprocessing"):
        if item.cls is mt.Activationsd:
            _check_options(item, {"softmax"}, _IGNORED_COMMON)
            if seen:
                raise UnsupportedTransform(f"{item.where}: Activationsd after {seen[-1]} is not supported")
            sm = item.args.get("softmax", False)
            if isinstance(sm, (list, tuple)):
                if len({bool(v) for v in sm}) != 1:
                    raise UnsupportedTransform(f"{item.where}: Activationsd with softmax per key "
                                               f"{sm!r} is not supported")
                sm = sm[0]
            softmax = bool(sm)
        elif item.cls is mt.AsDiscreted:
            _check_options(item, {"argmax"}, _IGNORED_COMMON | {"dtype"},
                           allowed={"dim": (0,), "keepdim": (True,)})
            am = item.args.get("argmax", False)
            if isinstance(am, (list, tuple)):
                am = all(bool(v) for v in am)
            if not am:
                raise UnsupportedTransform(f"{item.where}: AsDiscreted without argmax=True is not "
                                           f"supported (segrt outputs argmax labels)")
            if "argmax" in seen:
                raise UnsupportedTransform(f"{item.where}: a second AsDiscreted is not supported")
            seen.append("argmax")
        elif item.cls is mt.Invertd:
            _check_options(item, {"nearest_interp"}, _IGNORED_COMMON | {
                "transform", "orig_keys", "meta_keys", "orig_meta_keys", "meta_key_postfix",
                "to_tensor", "device"})
            ni = item.args.get("nearest_interp", True)
            if isinstance(ni, (list, tuple)):
                if len({bool(v) for v in ni}) != 1:
                    raise UnsupportedTransform(f"{item.where}: Invertd with nearest_interp per key "
                                               f"{ni!r} is not supported")
                ni = ni[0]
            nearest_interp = bool(ni)
            if "invert" in seen:
                raise UnsupportedTransform(f"{item.where}: a second Invertd is not supported")
            seen.append("invert")
        elif item.cls is mt.SaveImaged:
            continue  # segrt writes its own output
        else:
            raise UnsupportedTransform(
                f"{item.where}: postprocessing transform {item.target!r} is not supported by segrt "
                f"(supported: Activationsd, AsDiscreted, Invertd, SaveImaged)")
    if "argmax" not in seen:
        raise UnsupportedTransform("postprocessing has no AsDiscreted(argmax=True); segrt only produces "
                                   "argmax label maps")
    geometric = pre.orientation is not None or pre.spacing is not None
    if "invert" not in seen and geometric:
        raise UnsupportedTransform("postprocessing has no Invertd although preprocessing reorients/"
                                   "resamples: labels in the resampled grid are not supported")
    order = "argmax_then_invert"
    if "invert" in seen and seen.index("invert") < seen.index("argmax"):
        order = "invert_then_argmax"
    # Invertd(nearest_interp=False) keeps the recorded Spacingd mode; True forces nearest (notes §6.3).
    spacing_mode = pre.spacing.mode if pre.spacing is not None else "bilinear"
    interp = "nearest" if (nearest_interp or spacing_mode == "nearest") else "bilinear"
    if order == "argmax_then_invert" and interp == "bilinear" and geometric:
        # MONAI would interpolate the label *values* (fractional labels): not a segmentation segrt can honour
        raise UnsupportedTransform("postprocessing: AsDiscreted(argmax) before Invertd(nearest_interp=False) "
                                   "interpolates label values bilinearly; segrt supports argmax → Invertd "
                                   "with nearest_interp=True, or Invertd → argmax")
    return Postprocessing(softmax=softmax, order=order, invert_interp=interp)


def gaussian_profiles(roi_size, sigma_scale) -> tuple[tuple[float, ...], ...]:
    """The 1-D float32 Gaussian profiles of MONAI's importance map, computed with torch (bit-exact).

    See :func:`segrt.engine.tiling.torch_gaussian_profiles`; the clamp to ``max(min(map), 1e-3)`` applies
    to the 3-D map and is left to the runtime.
    """
    from segrt.engine.tiling import torch_gaussian_profiles

    return tuple(tuple(p) for p in torch_gaussian_profiles(roi_size, sigma_scale))


def _inference(parser) -> InferenceSpec:
    from monai.inferers import SlidingWindowInferer

    item = _item(parser, "inferer")
    if item is None or item.cls is not SlidingWindowInferer:
        raise UnsupportedTransform(f"inferer: {item.target if item else 'disabled inferer'!r} is not "
                                   f"supported (segrt implements SlidingWindowInferer only)")
    _check_options(item, {"roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode",
                          "cval"}, {"device", "sw_device", "progress", "cache_roi_weight_map", "cpu_thresh"})
    roi = _arg(item, "roi_size")
    roi = [roi] * 3 if isinstance(roi, int) else list(roi)
    if len(roi) != 3 or any(int(r) != r or r < 1 for r in roi):
        raise UnsupportedTransform(f"inferer: roi_size must be 3 positive integers, got {roi!r}")
    roi = tuple(int(r) for r in roi)

    def triple(v, name):
        v = _num(v, f"inferer.{name}")
        v = [v] * 3 if isinstance(v, (int, float)) else list(v)
        if len(v) == 1:
            v = v * 3
        if len(v) != 3:
            raise UnsupportedTransform(f"inferer: {name} must be one value or 3, got {v!r}")
        return tuple(v)

    mode = str(getattr(_arg(item, "mode"), "value", _arg(item, "mode")))
    pad = str(getattr(_arg(item, "padding_mode"), "value", _arg(item, "padding_mode")))
    if mode not in ("constant", "gaussian"):
        raise UnsupportedTransform(f"inferer: SlidingWindowInferer(mode={mode!r}) is not supported")
    if pad not in ("constant", "replicate"):
        raise UnsupportedTransform(f"inferer: SlidingWindowInferer(padding_mode={pad!r}) is not supported "
                                   f"(expected 'constant' or 'replicate')")
    sigma = triple(_arg(item, "sigma_scale"), "sigma_scale")
    return InferenceSpec(
        roi_size=roi,
        sw_batch_size=int(_arg(item, "sw_batch_size")),
        overlap=triple(_arg(item, "overlap"), "overlap"),
        blend_mode=mode,
        sigma_scale=sigma,
        padding_mode=pad,
        cval=float(_arg(item, "cval")),
        importance_profiles=gaussian_profiles(roi, sigma) if mode == "gaussian" else None,
    )


def _metadata(parser) -> dict:
    try:
        meta = parser["_meta_"]
    except KeyError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _class_names(meta: dict) -> dict[int, str]:
    try:
        cdef = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError):
        return {}
    if not isinstance(cdef, dict):
        return {}
    out = {}
    for k, v in cdef.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise SpecError(f"metadata channel_def key {k!r} is not an integer") from None
    return out


def _network_channels(parser, meta: dict) -> tuple[int, int]:
    """(in_channels, out_channels) from the parsed network_def args, metadata as fallback."""
    args: dict = {}
    if _has(parser, "network_def"):
        comp = _component(parser, "network_def")
        if hasattr(comp, "resolve_args"):
            args = comp.resolve_args()
    fmt = meta.get("network_data_format", {}) if isinstance(meta, dict) else {}

    def from_meta(kind, key):
        try:
            return int(fmt[kind][key]["num_channels"])
        except (KeyError, TypeError, ValueError):
            return None

    cin = args.get("in_channels", from_meta("inputs", "image"))
    cout = args.get("out_channels", args.get("num_classes", from_meta("outputs", "pred")))
    if cout is None:
        raise SpecError("cannot tell the number of output classes: network_def has no out_channels and "
                        "metadata.json has no network_data_format.outputs.pred.num_channels")
    return int(cin if cin is not None else 1), int(cout)


def spec_from_parser(parser) -> Spec:
    """Derive the :class:`Spec` of a parsed bundle (see :func:`load_parser`)."""
    meta = _metadata(parser)
    pre = _preprocessing(parser)
    inf = _inference(parser)
    post = _postprocessing(parser, pre)
    cin, cout = _network_channels(parser, meta)
    names = _class_names(meta)
    if names and (max(names) >= cout or min(names) < 0):
        raise SpecError(f"metadata channel_def names labels {sorted(names)[:3]}...{max(names)} but the "
                        f"network has {cout} output channels")
    rule = ct_skip_rule(meta, pre, names)
    if rule is not None:
        inf = dataclasses.replace(inf, skip_rule=rule)
    return Spec(in_channels=cin, num_classes=cout, preprocessing=pre, inference=inf,
                postprocessing=post, class_names=names)


#: Air threshold (HU) of the skip rule derived for CT bundles: air is about -1000 HU, lung parenchyma about
#: -850 HU but always with vessels above -500 HU in any 96-voxel window, fat -100 HU, soft tissue > 0 HU.
CT_AIR_THRESHOLD_HU = -500.0


def ct_skip_rule(meta: dict, pre: Preprocessing, names: dict[int, str]) -> SkipRule | None:
    """The skip rule of a CT bundle, or None.

    A bundle is CT when ``metadata.json`` names the modality of an input ``"CT"``
    (``network_data_format.inputs.*.modality``), or, when it names no modality, when its intensity transforms
    hold a Hounsfield window (``scale_intensity_range`` with ``a_min <= -100``). Its windows whose resampled (not yet normalised)
    input is below -500 HU everywhere are skipped and count as class 0 — only when class 0 is the background
    (named "background", or unnamed).
    """
    modalities = []
    try:
        for entry in (meta.get("network_data_format", {}).get("inputs") or {}).values():
            if isinstance(entry, dict) and entry.get("modality") is not None:
                modalities.append(str(entry["modality"]).strip().upper())
    except AttributeError:
        modalities = []
    hu_window = any(op.op == "scale_intensity_range" and op.params.get("a_min") is not None
                    and float(op.params["a_min"]) <= -100 for op in pre.intensity)
    is_ct = "CT" in modalities or (hu_window and not modalities)
    if not is_ct:
        return None
    if names and names.get(0, "background").strip().lower() not in ("background", "bg"):
        return None
    return SkipRule(kind="max_below", threshold=CT_AIR_THRESHOLD_HU, background_class=0)


def spec_from_bundle(bundle_dir, overrides: dict | None = None) -> Spec:
    """The segrt :class:`Spec` of a MONAI bundle directory (no network is built, no weights read)."""
    return spec_from_parser(load_parser(bundle_dir, overrides))


# ---------------------------------------------------------------------------------------------
# network + weights
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _bundle_importable(root: Path, top: str):
    """Make ``root`` importable (for the bundle's own ``scripts/``) during the block only.

    Modules named ``top`` (or ``top.*``) that are already imported - e.g. another project's
    ``scripts`` package - are set aside so they cannot shadow the bundle's, and are put back after;
    ``sys.path`` is restored and the bundle's modules are dropped from ``sys.modules``.
    """
    saved_path = list(sys.path)
    shadowed = {n: m for n, m in sys.modules.items() if n == top or n.startswith(top + ".")}
    for n in shadowed:
        del sys.modules[n]
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in list(sys.modules):
            if name in before:
                continue
            mod = sys.modules[name]
            mfile = str(getattr(mod, "__file__", None) or "")
            mpath = [str(p) for p in (getattr(mod, "__path__", None) or [])]
            if (name == top or name.startswith(top + ".") or mfile.startswith(str(root))
                    or any(p.startswith(str(root)) for p in mpath)):
                del sys.modules[name]
        sys.modules.update(shadowed)


@dataclass
class LoadedBundle:
    """A bundle's network (CPU, eval mode) with its weights, spec and provenance."""

    root: Path
    network: Any
    spec: Spec
    weights: dict
    metadata: dict
    overrides: dict = field(default_factory=dict)

    @property
    def version(self) -> str | None:
        v = self.metadata.get("version")
        return None if v is None else str(v)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.root.name)


def _weights_path(parser, root: Path) -> Path:
    for id_ in ("checkpointloader#load_path",):
        if _has(parser, id_):
            try:
                p = parser.get_parsed_content(id_)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"cannot resolve {id_!r}: {type(exc).__name__}: {exc}") from exc
            return Path(str(p))
    # some bundles load the checkpoint from a handler (e.g. the UNesT bundle)
    handlers = parser["handlers"] if _has(parser, "handlers") else None
    if isinstance(handlers, list):
        for i, h in enumerate(handlers):
            if isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointLoader") \
                    and "load_path" in h:
                try:
                    return Path(str(parser.get_parsed_content(f"handlers#{i}#load_path")))
                except Exception:  # noqa: BLE001
                    break
    return root / DEFAULT_WEIGHTS


def _state_dict(obj, path: Path) -> dict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise ExportError(f"{path}: expected a state dict (optionally wrapped as {{'model': ...}}), "
                          f"got {type(obj).__name__}")
    # checkpoints saved from DataParallel / DDP prefix every key with "module."
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _network_target(parser, root: Path) -> tuple:
    """(raw _target_, its top-level package, whether that package lives in the bundle, refers scripts.*).

    Raises :class:`ExportError` when the target points into a ``scripts/`` package the bundle lacks.
    """
    if not _has(parser, "network_def"):
        raise ExportError(f"bundle {str(root)!r}: configs/inference.json has no 'network_def'")
    raw_target = parser["network_def#_target_"] if isinstance(parser["network_def"], dict) else None
    top = str(raw_target).split(".")[0] if isinstance(raw_target, str) else ""
    local_pkg = bool(top) and "." in str(raw_target) and (
        (root / top).is_dir() or (root / f"{top}.py").is_file())
    refers_scripts = isinstance(raw_target, str) and str(raw_target).startswith("scripts.")
    if refers_scripts and not local_pkg:
        raise ExportError(
            f"bundle {str(root)!r}: network_def._target_ {raw_target!r} points into the bundle's own "
            f"network code (scripts/...), which is missing from {str(root / 'scripts')!r}; copy the "
            f"bundle's scripts/ package (and its weights) into the bundle directory")
    return raw_target, top, local_pkg, refers_scripts


def _instantiate_network(parser, root: Path):
    raw_target, top, local_pkg, refers_scripts = _network_target(parser, root)
    ctx = _bundle_importable(root, top) if local_pkg else contextlib.nullcontext()
    with ctx:
        try:
            net = parser.get_parsed_content("network_def", lazy=False)
        except Exception as exc:  # noqa: BLE001 - instantiation errors are arbitrary
            msg = f"{type(exc).__name__}: {exc}"
            if refers_scripts or "scripts" in msg:
                raise ExportError(f"bundle {str(root)!r}: cannot build network_def {raw_target!r} from the "
                                  f"bundle's network code (scripts/...): {msg}") from exc
            raise ExportError(f"bundle {str(root)!r}: cannot build network_def {raw_target!r}: {msg}") from exc
    import torch

    if not isinstance(net, torch.nn.Module):
        raise ExportError(f"bundle {str(root)!r}: network_def built a {type(net).__name__}, "
                          f"expected a torch.nn.Module")
    return net


def load_bundle(bundle_dir, overrides: dict | None = None, *, random_init: bool = False,
                seed: int = 0) -> LoadedBundle:
    """Parse a bundle, derive its spec, build its network (CPU, eval) and load its weights.

    Weights come from the parsed ``checkpointloader#load_path`` (so overrides such as
    ``modelname`` apply), else ``models/model.pt``. A missing file raises :class:`ExportError`
    unless ``random_init`` is true; the network then keeps its (seeded) random initialisation.
    """
    import torch

    from segrt.artifact import sha256_file

    root = _check_bundle_dir(bundle_dir)
    parser = load_parser(root, overrides)
    spec = spec_from_parser(parser)
    _network_target(parser, root)  # missing network code is reported before missing weights
    wpath = _weights_path(parser, root)
    exists = wpath.is_file()
    if not exists and not random_init:
        raise ExportError(
            f"bundle {str(root)!r}: weights file {str(wpath)!r} is missing; download it (see the "
            f"bundle's large_files.yml) or export with random_init=True (--random-init) for random weights")
    torch.manual_seed(seed)
    net = _instantiate_network(parser, root)
    net = net.to("cpu").eval()
    if exists:  # real weights win even with random_init (it only permits their absence)
        try:
            obj = torch.load(str(wpath), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"cannot read weights {str(wpath)!r}: {type(exc).__name__}: {exc}") from exc
        try:
            net.load_state_dict(_state_dict(obj, wpath), strict=True)
        except RuntimeError as exc:
            raise ExportError(f"weights {str(wpath)!r} do not fit network_def: {exc}") from exc
        weights = {"random_init": False, "path": _rel(wpath, root), "sha256": sha256_file(wpath)}
    else:
        weights = {"random_init": True, "path": None, "sha256": None, "seed": int(seed),
                   "expected_path": _rel(wpath, root)}
    meta = _metadata(parser)
    return LoadedBundle(root=root, network=net, spec=spec, weights=weights, metadata=meta,
                        overrides=dict(overrides or {}))


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root))
    except ValueError:
        return str(p)
