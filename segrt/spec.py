"""The artifact's preprocessing / inference / postprocessing specification.

This is the contract between ``segrt.export`` (which derives it from a MONAI bundle, or reads it from
a ``--spec`` JSON file) and ``segrt.engine`` (which executes it without torch or monai). Its JSON form
is exactly the ``"spec"`` member of ``manifest.json`` and the schema of a ``--spec`` file.

JSON schema (all keys shown; ``null`` where optional)::

    {
      "in_channels": 1,
      "num_classes": 105,
      "class_names": {"0": "background", "1": "spleen", ...},
      "preprocessing": {
        "orientation": "RAS",                       # axcodes, or null: keep voxel order
        "spacing": {"pixdim": [1.5, 1.5, 1.5],      # or null: no resampling
                    "mode": "bilinear"},           # "bilinear" (trilinear) | "nearest"
        "intensity": [                              # applied in order
          {"op": "normalize_intensity", "nonzero": true, "channel_wise": false,
           "subtrahend": null, "divisor": null},
          {"op": "scale_intensity", "minv": -1.0, "maxv": 1.0, "factor": null, "channel_wise": false},
          {"op": "scale_intensity_range", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1, "clip": true},
          {"op": "scale_intensity_range_percentiles", "lower": 5, "upper": 95, "b_min": 0, "b_max": 1,
           "clip": false, "relative": false, "channel_wise": false},
          {"op": "shift_intensity", "offset": 0.5}
        ]
      },
      "inference": {
        "roi_size": [96, 96, 96], "sw_batch_size": 1, "overlap": [0.25, 0.25, 0.25],
        "blend_mode": "gaussian",                   # "gaussian" | "constant"
        "sigma_scale": [0.125, 0.125, 0.125],
        "padding_mode": "replicate",                # "constant" | "replicate"
        "cval": 0.0,
        "importance_profiles": [[...], [...], [...]],  # optional: float32 1-D Gaussian profiles
                                                    # computed with torch at export (bit-exact)
        "skip_rule": {"kind": "max_below", "threshold": -500.0,   # optional (absent = never skip): a window
                      "background_class": 0, "margin": 10.0}      # whose resampled, not yet normalised input
      },                                                          # is < threshold everywhere is not run
      "postprocessing": {
        "softmax": true,
        "order": "argmax_then_invert",              # "argmax_then_invert" | "invert_then_argmax"
        "invert_interp": "nearest"                  # "nearest" | "bilinear": how Invertd resamples
      }
    }

``Spec.from_dict`` is strict: an unknown key anywhere (a typo such as ``"overlaps"`` or ``"class_name"``) and
a value of the wrong type (``"softmax": "false"``: a string, not the boolean ``false``; ``NaN``; a fractional
``roi_size``) are refused with a :class:`~segrt.errors.SpecError` that names the key, where it is
(``spec.inference``) and the nearest valid key. ``from_dict(spec.to_dict()) == spec`` for every spec.

All semantics follow MONAI 1.6.1 exactly (``docs/semantics.md`` states them stage by stage, with MONAI source citations).

Size: over 400 lines because the schema of every spec field with its strict check (unknown keys with suggestions,
JSON types, ranges) next to the dataclass it fills; one checker per kind of field keeps the checks from repeating.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from segrt.errors import SpecError

__all__ = [
    "IntensityOp",
    "SpacingSpec",
    "Preprocessing",
    "InferenceSpec",
    "SkipRule",
    "Postprocessing",
    "Spec",
    "INTENSITY_OPS",
]

# Each intensity op, its parameters and their defaults (MONAI's defaults for the same transform).
INTENSITY_OPS: dict[str, dict[str, Any]] = {
    "normalize_intensity": {"nonzero": False, "channel_wise": False, "subtrahend": None, "divisor": None},
    "scale_intensity": {"minv": 0.0, "maxv": 1.0, "factor": None, "channel_wise": False},
    "scale_intensity_range": {"a_min": None, "a_max": None, "b_min": None, "b_max": None, "clip": False},
    "scale_intensity_range_percentiles": {
        "lower": None, "upper": None, "b_min": None, "b_max": None,
        "clip": False, "relative": False, "channel_wise": False,
    },
    "shift_intensity": {"offset": None},
}
_REQUIRED = {
    "scale_intensity_range": ("a_min", "a_max"),
    "scale_intensity_range_percentiles": ("lower", "upper"),
    "shift_intensity": ("offset",),
}
# The type of each intensity parameter: flags are JSON booleans; subtrahend/divisor a number or a (per-channel)
# list of numbers; every other parameter a number. All but the required ones may be null.
_BOOL_PARAMS = frozenset({"nonzero", "channel_wise", "clip", "relative"})
_ARRAY_PARAMS = frozenset({"subtrahend", "divisor"})


# ---- validation helpers (JSON form) -----------------------------------------------------------
#
# ``where`` is the dotted location of a value in the spec (``spec.inference.overlap``); every message names it,
# what was expected and what was found.

def _describe(value) -> str:
    """``value`` as a message shows it: its JSON kind and (shortened) content."""
    def short(v):
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "..."

    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {short(value)}"
    if isinstance(value, numbers.Real):
        return f"the number {short(value)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''} {short(list(value))}"
    if isinstance(value, dict):
        return f"an object with keys {short(list(value))}"
    return f"a {type(value).__name__} {short(value)}"


def _did_you_mean(word, options) -> str:
    """``"; did you mean 'x'?"`` for the option nearest to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(d: dict, valid, where: str) -> None:
    """The one check for unknown keys: each key of ``d`` must be one of ``valid``."""
    valid = tuple(valid)
    for key in d:
        if key not in valid:
            raise SpecError(f"unknown key {key!r} in {where}{_did_you_mean(key, valid)} "
                            f"(valid keys: {', '.join(valid)})")


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise SpecError(f"{where}: missing required key {key!r}")
    return d[key]


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected an object (a JSON {{...}}), got {_describe(value)}")
    return value


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false (a JSON boolean), got {_describe(value)}")
    return value


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _number(value, where: str, ok=None, what: str = "a finite number") -> float:
    """A finite real number (not a boolean, not a string) for which ``ok(value)`` holds."""
    if not _is_real(value) or (ok is not None and not ok(value)):
        raise SpecError(f"{where}: expected {what}, got {_describe(value)}")
    return value


def _integer(value, where: str, minimum: int = 1) -> int:
    """An integer >= ``minimum``; an integral float (``96.0``) is taken as that integer."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if not _is_real(value) or value != int(value) or value < minimum:
        raise SpecError(f"{where}: expected {what}, got {_describe(value)}")
    return int(value)


def _choice(value, where: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
        raise SpecError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {_describe(value)}{hint}")
    return value


def _numbers(value, where: str):
    """A number or a (nested) list of numbers, e.g. a per-channel subtrahend."""
    if isinstance(value, (list, tuple)) and value:
        return [_numbers(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _number(value, where, what="a finite number or a list of them")


def _triple(value, where: str, cast=float, ok=None, what: str | None = None) -> tuple:
    """One value per spatial axis: a number (for all three) or a list of 3 numbers.

    ``cast=int`` asks for positive integers (an integral float counts); otherwise ``ok``/``what`` narrow the
    accepted finite numbers, e.g. ``ok=lambda v: v > 0, what="a number > 0"``.
    """
    def one(v, w):
        if cast is int:
            return _integer(v, w)
        return float(_number(v, w, ok, what or "a finite number"))

    if not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        value = list(value)  # a list, a tuple, or a NumPy array from the Python API
        if len(value) != 3:
            raise SpecError(f"{where}: expected 3 values (one per spatial axis), got {_describe(value)}")
        return tuple(one(v, f"{where}[{i}]") for i, v in enumerate(value))
    if not _is_real(value):
        kind = "a positive integer" if cast is int else (what or "a number")
        raise SpecError(f"{where}: expected {kind} or a list of 3 of them, got {_describe(value)}")
    return (one(value, where),) * 3


def _check_axcodes(ax, where: str) -> None:
    if (not isinstance(ax, str) or len(ax) != 3
            or sorted(_AXIS_OF.get(c, "?") for c in ax) != ["AP", "LR", "SI"]):
        raise SpecError(f"{where}: expected 3 axcodes like 'RAS' (one of L/R, one of A/P and one of S/I, "
                        f"upper case), got {_describe(ax)}")


_AXIS_OF = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# ---- the spec ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IntensityOp:
    """One intensity transform: ``op`` is a key of :data:`INTENSITY_OPS`, ``params`` its full parameters."""

    op: str
    params: dict

    @classmethod
    def from_dict(cls, d: dict, where: str = "intensity op", *, strict: bool = False) -> "IntensityOp":
        """Parse ``{"op": ..., **params}``. Unknown parameters are always refused (with the nearest valid one).

        ``strict`` (the JSON form, :meth:`Spec.from_dict`) also checks each value's type: flags are JSON
        booleans, every other parameter a finite number (subtrahend / divisor: or a list of them), null where
        optional. Without it values are kept as given, e.g. a MONAI config's string ``"True"`` for a flag, which
        the engine tests for truth as MONAI does.
        """
        _object(d, where)
        op = _choice(_need(d, "op", where), f"{where}.op", tuple(INTENSITY_OPS))
        _check_keys(d, ("op", *INTENSITY_OPS[op]), f"{where} ({op})")
        required = _REQUIRED.get(op, ())
        params = dict(INTENSITY_OPS[op])
        for key, value in d.items():
            if key == "op":
                continue
            w = f"{where}.{key}"
            if not strict or (value is None and key not in required and key not in _BOOL_PARAMS):
                params[key] = value
            elif key in _BOOL_PARAMS:
                params[key] = _bool(value, w)
            elif key in _ARRAY_PARAMS:
                params[key] = _numbers(value, w)
            else:
                params[key] = _number(value, w)
        for key in required:
            if params.get(key) is None:
                raise SpecError(f"{where} ({op}): parameter {key!r} is required (a number)")
        if strict and op == "scale_intensity_range_percentiles":
            lo, hi = params["lower"], params["upper"]
            if not 0 <= lo <= hi <= 100:
                raise SpecError(f"{where} ({op}): expected 0 <= lower <= upper <= 100, got lower={lo!r}, "
                                f"upper={hi!r}")
        return cls(op, params)

    def to_dict(self) -> dict:
        return {"op": self.op, **self.params}


@dataclass(frozen=True)
class SpacingSpec:
    pixdim: tuple[float, float, float]
    mode: Literal["bilinear", "nearest"] = "bilinear"

    def __post_init__(self):
        if self.mode not in ("bilinear", "nearest"):
            raise SpecError(f"spacing mode must be 'bilinear' or 'nearest', got {self.mode!r}")


@dataclass(frozen=True)
class Preprocessing:
    orientation: str | None = None
    spacing: SpacingSpec | None = None
    intensity: tuple[IntensityOp, ...] = ()

    def __post_init__(self):
        if self.orientation is not None:
            _check_axcodes(self.orientation, "orientation")


SKIP_KINDS = ("max_below",)


@dataclass(frozen=True)
class SkipRule:
    """When a window is not run (``segrt.engine.stitch``, "Skipping"): ``max_below`` — every voxel of the window's
    input, *before* the intensity transforms (after orientation and resampling; for CT: Hounsfield units), is
    below ``threshold``. A skipped window contributes the constant logits ``0`` for ``background_class`` and
    ``-margin`` for every other class, blended like a network output."""

    kind: str = "max_below"
    threshold: float = -500.0
    background_class: int = 0
    margin: float = 10.0

    def __post_init__(self):
        if self.kind not in SKIP_KINDS:
            raise SpecError(f"skip_rule.kind must be one of {list(SKIP_KINDS)}, got {self.kind!r}")
        if not self.background_class >= 0:
            raise SpecError(f"skip_rule.background_class must be >= 0, got {self.background_class}")
        if not self.margin > 0:
            raise SpecError(f"skip_rule.margin must be > 0, got {self.margin}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "skip_rule") -> "SkipRule":
        if not isinstance(d, dict):
            raise SpecError(f"{where}: expected an object like {{'kind': 'max_below', 'threshold': -500}}, "
                            f"got {_describe(d)}")
        _check_keys(d, _field_names(cls), where)
        return cls(kind=_choice(d.get("kind", "max_below"), f"{where}.kind", SKIP_KINDS),
                   threshold=float(_number(_need(d, "threshold", where), f"{where}.threshold")),
                   background_class=_integer(d.get("background_class", 0), f"{where}.background_class", 0),
                   margin=float(_number(d.get("margin", 10.0), f"{where}.margin", lambda v: v > 0,
                                        "a number > 0")))


@dataclass(frozen=True)
class InferenceSpec:
    roi_size: tuple[int, int, int]
    sw_batch_size: int = 1
    overlap: tuple[float, float, float] = (0.25, 0.25, 0.25)
    blend_mode: Literal["constant", "gaussian"] = "constant"
    sigma_scale: tuple[float, float, float] = (0.125, 0.125, 0.125)
    padding_mode: Literal["constant", "replicate"] = "constant"
    cval: float = 0.0
    importance_profiles: tuple[tuple[float, ...], ...] | None = None
    skip_rule: SkipRule | None = None

    def __post_init__(self):
        if any(r < 1 for r in self.roi_size):
            raise SpecError(f"roi_size must be positive, got {self.roi_size}")
        if self.sw_batch_size < 1:
            raise SpecError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if any(not (0.0 <= o < 1.0) for o in self.overlap):
            raise SpecError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.blend_mode not in ("constant", "gaussian"):
            raise SpecError(f"blend_mode must be 'constant' or 'gaussian', got {self.blend_mode!r}")
        if self.padding_mode not in ("constant", "replicate"):
            raise SpecError(f"padding_mode must be 'constant' or 'replicate', got {self.padding_mode!r}")
        if self.importance_profiles is not None:
            if len(self.importance_profiles) != 3 or any(
                len(p) != r for p, r in zip(self.importance_profiles, self.roi_size)
            ):
                raise SpecError("importance_profiles must hold one profile per axis, of roi_size length")
        if self.skip_rule is not None and not isinstance(self.skip_rule, SkipRule):
            raise SpecError(f"skip_rule must be a SkipRule, got {type(self.skip_rule).__name__}")

    @classmethod
    def from_dict(cls, d, where: str = "inference") -> "InferenceSpec":
        _object(d, where)
        _check_keys(d, _field_names(cls), where)
        roi = _triple(_need(d, "roi_size", where), f"{where}.roi_size", int)
        prof = d.get("importance_profiles")
        if prof is not None:
            w = f"{where}.importance_profiles"
            if not isinstance(prof, (list, tuple)) or len(prof) != 3:
                raise SpecError(f"{w}: expected null or 3 lists (one per axis) of roi_size length, "
                                f"got {_describe(prof)}")
            for axis, (p, r) in enumerate(zip(prof, roi)):
                if not isinstance(p, (list, tuple)) or len(p) != r:
                    raise SpecError(f"{w}[{axis}]: expected a list of {r} numbers (roi_size[{axis}]), "
                                    f"got {_describe(p)}")
                for i, v in enumerate(p):
                    # >= 0, not > 0: a float32 Gaussian of a tiny sigma_scale underflows to 0 at the window
                    # border (the runtime clamps the 3-D map, as MONAI does)
                    _number(v, f"{w}[{axis}][{i}]", lambda x: x >= 0, "a finite number >= 0")
            prof = tuple(tuple(float(v) for v in p) for p in prof)
        skip = d.get("skip_rule")
        return cls(
            roi_size=roi,
            sw_batch_size=_integer(d.get("sw_batch_size", 1), f"{where}.sw_batch_size"),
            overlap=_triple(d.get("overlap", 0.25), f"{where}.overlap", ok=lambda v: 0 <= v < 1,
                            what="a number in [0, 1)"),
            blend_mode=_choice(d.get("blend_mode", "constant"), f"{where}.blend_mode", ("constant", "gaussian")),
            sigma_scale=_triple(d.get("sigma_scale", 0.125), f"{where}.sigma_scale", ok=lambda v: v > 0,
                                what="a number > 0"),
            padding_mode=_choice(d.get("padding_mode", "constant"), f"{where}.padding_mode",
                                 ("constant", "replicate")),
            cval=float(_number(d.get("cval", 0.0), f"{where}.cval")),
            importance_profiles=prof,
            skip_rule=None if skip is None else SkipRule.from_dict(skip, f"{where}.skip_rule"),
        )


@dataclass(frozen=True)
class Postprocessing:
    softmax: bool = True
    order: Literal["argmax_then_invert", "invert_then_argmax"] = "argmax_then_invert"
    invert_interp: Literal["nearest", "bilinear"] = "nearest"

    def __post_init__(self):
        if self.order not in ("argmax_then_invert", "invert_then_argmax"):
            raise SpecError(f"postprocessing order must be 'argmax_then_invert' or 'invert_then_argmax', "
                            f"got {self.order!r}")
        if self.invert_interp not in ("nearest", "bilinear"):
            raise SpecError(f"invert_interp must be 'nearest' or 'bilinear', got {self.invert_interp!r}")
        if self.order == "argmax_then_invert" and self.invert_interp == "bilinear":
            # labels cannot be interpolated: the engine would silently invert them with nearest
            raise SpecError("postprocessing: order 'argmax_then_invert' inverts labels, which only 'nearest' can "
                            "resample; got invert_interp 'bilinear' (use order 'invert_then_argmax' to invert "
                            "probabilities bilinearly, as MONAI's Invertd before AsDiscreted does)")

    @classmethod
    def from_dict(cls, d, where: str = "postprocessing") -> "Postprocessing":
        _object(d, where)
        _check_keys(d, _field_names(cls), where)
        return cls(
            softmax=_bool(d.get("softmax", True), f"{where}.softmax"),
            order=_choice(d.get("order", "argmax_then_invert"), f"{where}.order",
                          ("argmax_then_invert", "invert_then_argmax")),
            invert_interp=_choice(d.get("invert_interp", "nearest"), f"{where}.invert_interp",
                                  ("nearest", "bilinear")),
        )


def _preprocessing_from_dict(d, where: str) -> Preprocessing:
    _object(d, where)
    _check_keys(d, _field_names(Preprocessing), where)
    ax = d.get("orientation")
    if ax is not None:
        _check_axcodes(ax, f"{where}.orientation")
    sp = d.get("spacing")
    if sp is not None:
        w = f"{where}.spacing"
        _object(sp, w)
        _check_keys(sp, _field_names(SpacingSpec), w)
        sp = SpacingSpec(_triple(_need(sp, "pixdim", w), f"{w}.pixdim", ok=lambda v: v > 0, what="a number > 0"),
                         _choice(sp.get("mode", "bilinear"), f"{w}.mode", ("bilinear", "nearest")))
    ops = d.get("intensity", [])
    if not isinstance(ops, (list, tuple)):
        raise SpecError(f"{where}.intensity: expected a list of intensity ops, got {_describe(ops)}")
    return Preprocessing(
        orientation=ax, spacing=sp,
        intensity=tuple(IntensityOp.from_dict(o, f"{where}.intensity[{i}]", strict=True)
                        for i, o in enumerate(ops)))


_LABEL = re.compile(r"[+-]?[0-9]+")


def _class_names_from_dict(d, num_classes: int, where: str) -> dict[int, str]:
    _object(d, where)
    names: dict[int, str] = {}
    for key, name in d.items():
        if isinstance(key, int) and not isinstance(key, bool):
            label = key
        elif isinstance(key, str) and _LABEL.fullmatch(key):
            label = int(key)
        else:
            raise SpecError(f"{where}: key {key!r} is not a label number (expected an integer from 0 to "
                            f"{num_classes - 1} as a string, like \"1\")")
        if not 0 <= label < num_classes:
            raise SpecError(f"{where}: label {key!r} is not a class of this model (expected 0 to "
                            f"{num_classes - 1}: num_classes is {num_classes})")
        if label in names:
            raise SpecError(f"{where}: label {label} is named twice")
        if not isinstance(name, str):
            raise SpecError(f"{where}.{key}: expected a class name (a string), got {_describe(name)}")
        names[label] = name
    return names


@dataclass(frozen=True)
class Spec:
    in_channels: int
    num_classes: int
    preprocessing: Preprocessing
    inference: InferenceSpec
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    class_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.in_channels < 1:
            raise SpecError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < 1:
            raise SpecError(f"num_classes must be >= 1, got {self.num_classes}")
        rule = self.inference.skip_rule
        if rule is not None and rule.background_class >= self.num_classes:
            raise SpecError(f"skip_rule.background_class {rule.background_class} is not a class of this model "
                            f"(num_classes {self.num_classes})")

    @property
    def label_dtype(self) -> str:
        return "uint8" if self.num_classes <= 256 else "uint16"

    def class_name(self, label: int) -> str:
        return self.class_names.get(int(label), f"class_{int(label)}")

    # ---- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        pre = self.preprocessing
        inf = self.inference
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
            "preprocessing": {
                "orientation": pre.orientation,
                "spacing": None if pre.spacing is None else {
                    "pixdim": list(pre.spacing.pixdim), "mode": pre.spacing.mode},
                "intensity": [op.to_dict() for op in pre.intensity],
            },
            "inference": {
                "roi_size": list(inf.roi_size),
                "sw_batch_size": inf.sw_batch_size,
                "overlap": list(inf.overlap),
                "blend_mode": inf.blend_mode,
                "sigma_scale": list(inf.sigma_scale),
                "padding_mode": inf.padding_mode,
                "cval": inf.cval,
                "importance_profiles": None if inf.importance_profiles is None
                else [list(p) for p in inf.importance_profiles],
                **({} if inf.skip_rule is None else {"skip_rule": inf.skip_rule.to_dict()}),
            },
            "postprocessing": dataclasses.asdict(self.postprocessing),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        """Parse the JSON form. Strict: an unknown key anywhere (a typo such as ``overlaps``) or a value of the
        wrong type (``"softmax": "false"``, a string, is not the boolean ``false``) is a :class:`SpecError`
        naming the key and where it is, with the nearest valid key as a suggestion."""
        where = "spec"
        if not isinstance(d, dict):
            raise SpecError(f"spec must be a JSON object, got {_describe(d)}")
        try:
            _check_keys(d, _field_names(cls), where)
            num_classes = _integer(_need(d, "num_classes", where), f"{where}.num_classes")
            in_channels = _integer(d.get("in_channels", 1), f"{where}.in_channels")
            pre = _preprocessing_from_dict(_need(d, "preprocessing", where), f"{where}.preprocessing")
            inf = InferenceSpec.from_dict(_need(d, "inference", where), f"{where}.inference")
            post_d = d.get("postprocessing")
            post = Postprocessing() if post_d is None else Postprocessing.from_dict(post_d, f"{where}.postprocessing")
            names_d = d.get("class_names")
            names = {} if names_d is None else _class_names_from_dict(names_d, num_classes, f"{where}.class_names")
            return cls(in_channels=in_channels, num_classes=num_classes, preprocessing=pre, inference=inf,
                       postprocessing=post, class_names=names)
        except SpecError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SpecError(f"invalid spec: {exc}") from exc
