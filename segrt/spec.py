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

All semantics follow MONAI 1.6.1 exactly (see ``../shared/MONAI_NOTES.md`` in the project's workspace).
"""

from __future__ import annotations

import dataclasses
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


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise SpecError(f"{where}: missing required key {key!r}")
    return d[key]


def _triple(value, where: str, cast=float) -> tuple:
    if isinstance(value, (int, float)):
        return (cast(value),) * 3
    try:
        vals = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: expected a number or a list of 3 numbers, got {value!r}") from None
    if len(vals) != 3:
        raise SpecError(f"{where}: expected 3 values (one per spatial axis), got {len(vals)}: {value!r}")
    return vals


@dataclass(frozen=True)
class IntensityOp:
    """One intensity transform: ``op`` is a key of :data:`INTENSITY_OPS`, ``params`` its full parameters."""

    op: str
    params: dict

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityOp":
        if not isinstance(d, dict) or "op" not in d:
            raise SpecError(f"intensity op must be an object with an 'op' key, got {d!r}")
        op = d["op"]
        if op not in INTENSITY_OPS:
            raise SpecError(f"unknown intensity op {op!r}; expected one of {sorted(INTENSITY_OPS)}")
        unknown = set(d) - set(INTENSITY_OPS[op]) - {"op"}
        if unknown:
            raise SpecError(f"intensity op {op!r}: unknown parameter(s) {sorted(unknown)}")
        params = dict(INTENSITY_OPS[op])
        params.update({k: v for k, v in d.items() if k != "op"})
        for key in _REQUIRED.get(op, ()):
            if params.get(key) is None:
                raise SpecError(f"intensity op {op!r}: parameter {key!r} is required")
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
            ax = self.orientation
            if (not isinstance(ax, str) or len(ax) != 3
                    or sorted(c for c in ax.upper() if c in "LR") == []
                    or set(ax.upper()) - set("LRAPSI")):
                raise SpecError(f"orientation must be 3 axcodes like 'RAS', got {ax!r}")


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
    def from_dict(cls, d) -> "SkipRule":
        if not isinstance(d, dict):
            raise SpecError(f"skip_rule must be an object like {{'kind': 'max_below', 'threshold': -500}}, got {d!r}")
        unknown = set(d) - {"kind", "threshold", "background_class", "margin"}
        if unknown:
            raise SpecError(f"skip_rule: unknown key(s) {sorted(unknown)}")
        if "threshold" not in d:
            raise SpecError("skip_rule: missing required key 'threshold'")
        return cls(kind=str(d.get("kind", "max_below")), threshold=float(d["threshold"]),
                   background_class=int(d.get("background_class", 0)), margin=float(d.get("margin", 10.0)))


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
        if not isinstance(d, dict):
            raise SpecError(f"spec must be a JSON object, got {type(d).__name__}")
        try:
            pre_d = _need(d, "preprocessing", "spec")
            inf_d = _need(d, "inference", "spec")
            post_d = d.get("postprocessing") or {}
            sp = pre_d.get("spacing")
            pre = Preprocessing(
                orientation=pre_d.get("orientation"),
                spacing=None if sp is None else SpacingSpec(
                    _triple(_need(sp, "pixdim", "spacing"), "spacing.pixdim"), sp.get("mode", "bilinear")),
                intensity=tuple(IntensityOp.from_dict(o) for o in pre_d.get("intensity", [])),
            )
            prof = inf_d.get("importance_profiles")
            inf = InferenceSpec(
                roi_size=_triple(_need(inf_d, "roi_size", "inference"), "inference.roi_size", int),
                sw_batch_size=int(inf_d.get("sw_batch_size", 1)),
                overlap=_triple(inf_d.get("overlap", 0.25), "inference.overlap"),
                blend_mode=inf_d.get("blend_mode", "constant"),
                sigma_scale=_triple(inf_d.get("sigma_scale", 0.125), "inference.sigma_scale"),
                padding_mode=inf_d.get("padding_mode", "constant"),
                cval=float(inf_d.get("cval", 0.0)),
                importance_profiles=None if prof is None else tuple(tuple(float(v) for v in p) for p in prof),
                skip_rule=None if inf_d.get("skip_rule") is None else SkipRule.from_dict(inf_d["skip_rule"]),
            )
            unknown_post = set(post_d) - {"softmax", "order", "invert_interp"}
            if unknown_post:
                raise SpecError(f"postprocessing: unknown key(s) {sorted(unknown_post)}")
            post = Postprocessing(**post_d)
            names = {int(k): str(v) for k, v in (d.get("class_names") or {}).items()}
            return cls(
                in_channels=int(d.get("in_channels", 1)),
                num_classes=int(_need(d, "num_classes", "spec")),
                preprocessing=pre,
                inference=inf,
                postprocessing=post,
                class_names=names,
            )
        except SpecError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SpecError(f"invalid spec: {exc}") from exc
