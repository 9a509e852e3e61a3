"""Strict specs and overrides: a typo or a value of the wrong type is an error that names the key, where it is
and the nearest valid key, never a silently ignored setting (a ``--spec`` JSON or a bundle config override)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from segrt.errors import ExportError, SpecError
from segrt.spec import INTENSITY_OPS, Spec

REPO = Path(__file__).resolve().parent.parent
FIXTURE_BUNDLES = REPO / "tests" / "fixtures" / "bundles"
WHOLEBODY_SMALL = FIXTURE_BUNDLES / "wholebody_small"
SHARED_BUNDLES = REPO.parent / "shared" / "bundles"

ROI = 8


def _valid() -> dict:
    """A spec with every key of the schema set (all five intensity ops, a skip rule, importance profiles)."""
    return {
        "in_channels": 1,
        "num_classes": 3,
        "class_names": {"0": "background", "1": "liver", "2": "spleen"},
        "preprocessing": {
            "orientation": "RAS",
            "spacing": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            "intensity": [
                {"op": "normalize_intensity", "nonzero": True, "channel_wise": False, "subtrahend": None,
                 "divisor": None},
                {"op": "scale_intensity_range", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
                 "clip": True},
                {"op": "scale_intensity_range_percentiles", "lower": 5, "upper": 95, "b_min": 0, "b_max": 1,
                 "clip": False, "relative": False, "channel_wise": False},
                {"op": "scale_intensity", "minv": -1.0, "maxv": 1.0, "factor": None, "channel_wise": False},
                {"op": "shift_intensity", "offset": 0.5},
            ],
        },
        "inference": {
            "roi_size": [ROI] * 3, "sw_batch_size": 2, "overlap": [0.25, 0.5, 0.25], "blend_mode": "gaussian",
            "sigma_scale": 0.125, "padding_mode": "replicate", "cval": 0.0,
            "importance_profiles": [[0.5] * ROI, [0.25] * ROI, [1.0] * ROI],
            "skip_rule": {"kind": "max_below", "threshold": -500.0, "background_class": 0, "margin": 10.0},
        },
        "postprocessing": {"softmax": True, "order": "argmax_then_invert", "invert_interp": "nearest"},
    }


def _set(path: str, value):
    """A mutation of the valid spec: ``"inference.overlap"`` = value (list indices as numbers)."""
    def mutate(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[int(last) if isinstance(d, list) else last] = value
    return mutate


def _rename(path: str, new: str):
    """A typo: the key at ``path`` renamed to ``new`` (its value kept)."""
    def mutate(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[new] = d.pop(last)
    return mutate


INT = "preprocessing.intensity"
CASES = [
    # ---- unknown keys, everywhere: the key, where it is and the nearest valid key --------------------------
    pytest.param(_rename("class_names", "class_name"), ["'class_name'", "in spec;", "'class_names'"], id="top"),
    pytest.param(_rename("preprocessing.orientation", "orientaton"),
                 ["'orientaton'", "spec.preprocessing", "'orientation'"], id="preprocessing"),
    pytest.param(_rename("preprocessing.intensity", "intensities"),
                 ["'intensities'", "spec.preprocessing", "'intensity'"], id="preprocessing-intensity"),
    pytest.param(_rename("preprocessing.spacing.pixdim", "pixdims"),
                 ["'pixdims'", "spec.preprocessing.spacing", "'pixdim'"], id="spacing"),
    pytest.param(_rename(f"{INT}.0.nonzero", "non_zero"),
                 ["'non_zero'", "spec.preprocessing.intensity[0]", "'nonzero'"], id="intensity-param"),
    pytest.param(_rename(f"{INT}.1.a_min", "amin"),
                 ["'amin'", "spec.preprocessing.intensity[1]", "'a_min'"], id="intensity-param-2"),
    pytest.param(_set(f"{INT}.0.op", "normalise_intensity"),
                 ["spec.preprocessing.intensity[0].op", "'normalise_intensity'", "'normalize_intensity'"],
                 id="intensity-op-name"),
    pytest.param(_rename("inference.overlap", "overlaps"),
                 ["unknown key 'overlaps' in spec.inference; did you mean 'overlap'?", "valid keys:"],
                 id="inference"),
    pytest.param(_rename("inference.sw_batch_size", "sw_batchsize"),
                 ["'sw_batchsize'", "spec.inference", "'sw_batch_size'"], id="inference-2"),
    pytest.param(_rename("inference.skip_rule.threshold", "treshold"),
                 ["'treshold'", "spec.inference.skip_rule", "'threshold'"], id="skip_rule"),
    pytest.param(_rename("postprocessing.softmax", "softmx"),
                 ["'softmx'", "spec.postprocessing", "'softmax'"], id="postprocessing"),
    # ---- choices: the value found and the nearest valid one -----------------------------------------------
    pytest.param(_set("inference.blend_mode", "gausian"),
                 ["spec.inference.blend_mode", "'gausian'", "did you mean 'gaussian'"], id="blend_mode"),
    pytest.param(_set("preprocessing.spacing.mode", "bilinar"),
                 ["spec.preprocessing.spacing.mode", "'bilinar'", "did you mean 'bilinear'"], id="spacing-mode"),
    pytest.param(_set("postprocessing.order", "argmax_then_inverts"),
                 ["spec.postprocessing.order", "did you mean 'argmax_then_invert'"], id="order"),
    pytest.param(_set("inference.skip_rule.kind", "max_bellow"),
                 ["spec.inference.skip_rule.kind", "did you mean 'max_below'"], id="skip-kind"),
    # ---- booleans are JSON booleans ------------------------------------------------------------------------
    pytest.param(_set("postprocessing.softmax", "false"),
                 ["spec.postprocessing.softmax: expected true or false (a JSON boolean), got the string 'false'"],
                 id="softmax-string"),
    pytest.param(_set("postprocessing.softmax", 0), ["spec.postprocessing.softmax", "the number 0"],
                 id="softmax-number"),
    pytest.param(_set(f"{INT}.0.nonzero", "True"), ["spec.preprocessing.intensity[0].nonzero", "JSON boolean",
                                                    "the string 'True'"], id="nonzero"),
    pytest.param(_set(f"{INT}.0.channel_wise", 1), ["intensity[0].channel_wise", "the number 1"],
                 id="channel_wise"),
    pytest.param(_set(f"{INT}.1.clip", "true"), ["spec.preprocessing.intensity[1].clip", "the string 'true'"],
                 id="clip"),
    pytest.param(_set(f"{INT}.2.relative", None), ["spec.preprocessing.intensity[2].relative", "null"],
                 id="relative"),
    # ---- numbers are finite real numbers -------------------------------------------------------------------
    pytest.param(_set(f"{INT}.1.a_min", "-57"), ["intensity[1].a_min", "expected a finite number",
                                                 "the string '-57'"], id="a_min-string"),
    pytest.param(_set(f"{INT}.4.offset", True), ["intensity[4].offset", "the boolean true"], id="offset-bool"),
    pytest.param(_set(f"{INT}.3.minv", math.nan), ["intensity[3].minv", "nan"], id="minv-nan"),
    pytest.param(_set(f"{INT}.2.upper", 150), ["intensity[2]", "lower <= upper <= 100"], id="percentile-range"),
    pytest.param(_set("inference.cval", "0"), ["spec.inference.cval", "the string '0'"], id="cval"),
    pytest.param(_set("inference.skip_rule.threshold", "low"), ["spec.inference.skip_rule.threshold",
                                                                "the string 'low'"], id="threshold"),
    pytest.param(_set("inference.skip_rule.margin", 0), ["spec.inference.skip_rule.margin", "a number > 0"],
                 id="margin"),
    pytest.param(_set("inference.skip_rule.background_class", 0.5),
                 ["spec.inference.skip_rule.background_class", "an integer >= 0"], id="background_class"),
    # ---- per-axis values: a number or 3 of them ------------------------------------------------------------
    pytest.param(_set("inference.roi_size", [8, 8, 8.5]), ["spec.inference.roi_size[2]", "a positive integer",
                                                           "8.5"], id="roi-fraction"),
    pytest.param(_set("inference.roi_size", [8, 8]), ["spec.inference.roi_size", "3 values"], id="roi-two"),
    pytest.param(_set("inference.roi_size", "8"), ["spec.inference.roi_size", "the string '8'"], id="roi-string"),
    pytest.param(_set("inference.roi_size", [0, 8, 8]), ["spec.inference.roi_size[0]", "a positive integer"],
                 id="roi-zero"),
    pytest.param(_set("inference.roi_size", [True, 8, 8]), ["spec.inference.roi_size[0]", "the boolean true"],
                 id="roi-bool"),
    pytest.param(_set("inference.overlap", 1.0), ["spec.inference.overlap", "in [0, 1)"], id="overlap-one"),
    pytest.param(_set("inference.overlap", [0.25, "0.5", 0.25]), ["spec.inference.overlap[1]",
                                                                  "the string '0.5'"], id="overlap-string"),
    pytest.param(_set("inference.sigma_scale", 0), ["spec.inference.sigma_scale", "a number > 0"], id="sigma"),
    pytest.param(_set("preprocessing.spacing.pixdim", [1.5, -1.0, 2.0]),
                 ["spec.preprocessing.spacing.pixdim[1]", "a number > 0", "-1.0"], id="pixdim-negative"),
    pytest.param(_set("preprocessing.spacing.pixdim", math.inf), ["spec.preprocessing.spacing.pixdim", "inf"],
                 id="pixdim-inf"),
    # ---- counts are positive integers ----------------------------------------------------------------------
    pytest.param(_set("in_channels", 0), ["spec.in_channels", "a positive integer", "the number 0"],
                 id="in_channels"),
    pytest.param(_set("num_classes", "3"), ["spec.num_classes", "the string '3'"], id="num_classes-string"),
    pytest.param(_set("num_classes", True), ["spec.num_classes", "the boolean true"], id="num_classes-bool"),
    pytest.param(_set("inference.sw_batch_size", 1.5), ["spec.inference.sw_batch_size", "a positive integer"],
                 id="sw_batch_size"),
    # ---- class names: integer labels of this model → strings ----------------------------------------------
    pytest.param(_set("class_names", {"0": "background", "liver": "1"}), ["spec.class_names", "'liver'",
                                                                          "not a label number"],
                 id="class_names-key"),
    pytest.param(_set("class_names", {"0": "background", "3": "kidney"}), ["spec.class_names", "'3'",
                                                                           "num_classes is 3"],
                 id="class_names-range"),
    pytest.param(_set("class_names", {"0": "background", "1": 7}), ["spec.class_names.1", "the number 7"],
                 id="class_names-value"),
    pytest.param(_set("class_names", ["background", "liver"]), ["spec.class_names", "expected an object"],
                 id="class_names-list"),
    # ---- orientation, importance profiles, nesting ---------------------------------------------------------
    pytest.param(_set("preprocessing.orientation", "RAR"), ["spec.preprocessing.orientation", "'RAR'",
                                                            "axcodes"], id="orientation"),
    pytest.param(_set("preprocessing.orientation", "ras"), ["spec.preprocessing.orientation", "upper case"],
                 id="orientation-lower"),
    pytest.param(_set("inference.importance_profiles", [[0.5] * ROI, [0.5] * ROI, [0.5] * (ROI - 1) + [-1]]),
                 ["spec.inference.importance_profiles[2][7]", ">= 0"], id="profiles-negative"),
    pytest.param(_set("inference.importance_profiles", [[0.5] * ROI, [0.5] * 3, [0.5] * ROI]),
                 ["spec.inference.importance_profiles[1]", f"a list of {ROI} numbers"], id="profiles-length"),
    pytest.param(_set("inference", [8, 8, 8]), ["spec.inference", "expected an object"], id="inference-list"),
    pytest.param(_set(f"{INT}.0", "normalize_intensity"), ["spec.preprocessing.intensity[0]",
                                                           "expected an object"], id="intensity-string"),
]


@pytest.mark.parametrize("mutate,fragments", CASES)
def test_spec_typos_and_types_are_refused(mutate, fragments):
    d = _valid()
    Spec.from_dict(copy.deepcopy(d))  # the unmodified spec is valid
    mutate(d)
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_unknown_key_message_in_full():
    d = _valid()
    d["inference"]["overlaps"] = d["inference"].pop("overlap")
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    assert str(info.value) == (
        "unknown key 'overlaps' in spec.inference; did you mean 'overlap'? (valid keys: roi_size, sw_batch_size, "
        "overlap, blend_mode, sigma_scale, padding_mode, cval, importance_profiles, skip_rule)")
    d = _valid()
    d["postprocessing"]["zzz"] = 1  # nothing near: no suggestion, the valid keys still listed
    with pytest.raises(SpecError, match=r"^unknown key 'zzz' in spec.postprocessing \(valid keys: softmax, order, "
                                        r"invert_interp\)$"):
        Spec.from_dict(d)


def test_lenient_forms_that_stay_valid():
    d = _valid()
    d["inference"]["roi_size"] = 8.0  # an integral float is that integer; one number stands for all three axes
    d["inference"]["overlap"] = 0
    d["class_names"] = {0: "background", "2": "spleen"}  # integer keys as written by Python
    d["preprocessing"]["intensity"][0]["subtrahend"] = [1.0]  # a per-channel list
    d["preprocessing"]["spacing"] = None
    for key in ("importance_profiles", "skip_rule"):
        d["inference"][key] = None
    d["postprocessing"] = None
    s = Spec.from_dict(d)
    assert s.inference.roi_size == (8, 8, 8) and all(type(r) is int for r in s.inference.roi_size)
    assert s.inference.overlap == (0.0, 0.0, 0.0) and s.class_names == {0: "background", 2: "spleen"}
    assert s.inference.skip_rule is None and s.postprocessing.softmax is True
    assert Spec.from_dict(s.to_dict()) == s


def test_intensity_op_python_constructor():
    """``IntensityOp.from_dict`` outside a spec JSON keeps values as given (a MONAI config's ``"True"`` string
    flag, which the engine tests for truth like MONAI) but refuses unknown parameters all the same."""
    from segrt.spec import IntensityOp

    op = IntensityOp.from_dict({"op": "normalize_intensity", "nonzero": "True"})
    assert op.params["nonzero"] == "True"
    with pytest.raises(SpecError, match="intensity op.nonzero: expected true or false"):
        IntensityOp.from_dict({"op": "normalize_intensity", "nonzero": "True"}, strict=True)
    with pytest.raises(SpecError, match=r"unknown key 'nonzeros' in intensity op \(normalize_intensity\); "
                                        r"did you mean 'nonzero'\?"):
        IntensityOp.from_dict({"op": "normalize_intensity", "nonzeros": True})
    with pytest.raises(SpecError, match="'offset' is required"):
        IntensityOp.from_dict({"op": "shift_intensity"})


def _repo_specs():
    """Every spec in the repository: the full schema example above, the spec of each fixture / shipped bundle
    (and of the full bundles of the workspace, when present)."""
    yield "schema", Spec.from_dict(_valid())
    from segrt.export.bundle import spec_from_bundle

    bundles = sorted(p for p in FIXTURE_BUNDLES.iterdir() if (p / "configs").is_dir())
    bundles.append(REPO / "segrt" / "data" / "demo_bundle")
    if SHARED_BUNDLES.is_dir():
        bundles += sorted(p for p in SHARED_BUNDLES.iterdir() if (p / "configs" / "inference.json").is_file())
    for b in bundles:
        yield b.name, spec_from_bundle(b)


def test_every_repo_spec_round_trips():
    names = []
    for name, spec in _repo_specs():
        d = spec.to_dict()
        assert Spec.from_dict(d) == spec, name
        assert Spec.from_dict(json.loads(json.dumps(d))) == spec, name  # through JSON text, as in a manifest
        names.append(name)
    assert {"schema", "wholebody_small", "brain_small", "demo_bundle"} <= set(names)


def test_every_intensity_op_is_in_the_schema_example():
    assert {op["op"] for op in _valid()["preprocessing"]["intensity"]} == set(INTENSITY_OPS)


# ---- bundle config overrides --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,fragments", [
    ("displayable_configs#hires",
     ["override 'displayable_configs#hires' matches no key of the bundle config; "
      "did you mean 'displayable_configs#highres'?"]),
    ("inferer#roi_sizes", ["'inferer#roi_sizes'", "did you mean 'inferer#roi_size'?"]),
    ("displayable_configs::hires", ["did you mean 'displayable_configs::highres'?"]),  # MONAI's other separator
    ("displayable_configs#highres#x", ["'displayable_configs#highres#x'", "matches no key"]),  # below a scalar
    ("qqqqzzzz", ["'qqqqzzzz'", "matches no key", "an override replaces an existing key"]),
])
def test_override_typo_is_refused(key, fragments):
    from segrt.export.bundle import load_parser

    with pytest.raises(ExportError) as info:
        load_parser(WHOLEBODY_SMALL, {key: False})
    for fragment in fragments:
        assert fragment in str(info.value)


def test_overrides_of_existing_keys_still_apply():
    from segrt.export.bundle import load_parser

    p = load_parser(WHOLEBODY_SMALL, {"displayable_configs#highres": False, "inferer#roi_size": [32, 32, 32],
                                      "network_def#out_channels": 105, "displayable_configs::highres": False})
    assert p["displayable_configs#highres"] is False and p["inferer#roi_size"] == [32, 32, 32]
    assert p["network_def#out_channels"] == 105
    # an override may set a key that an earlier override of the same call created
    p = load_parser(WHOLEBODY_SMALL, {"displayable_configs": {"highres": True, "extra": 1},
                                      "displayable_configs#extra": 2})
    assert p["displayable_configs#extra"] == 2


# ---- the command line: one error line, exit 2, nothing written ---------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segrt: error: "), err
    return lines[0]


def test_cli_spec_typo(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    import segrt.export
    from segrt.cli import main

    model = tmp_path / "tiny.ts"
    torch.jit.trace(torch.nn.Conv3d(1, 3, 1).eval(), torch.zeros(1, 1, 4, 4, 4)).save(str(model))
    spec = _valid()
    spec["inference"]["overlaps"] = spec["inference"].pop("overlap")
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    def no_export_work(*a, **k):
        raise AssertionError("the spec must be checked before the model is loaded")

    monkeypatch.setattr(segrt.export, "_load_torchscript", no_export_work)
    out = tmp_path / "art"
    rc = main(["export", str(model), "-o", str(out), "--spec", str(tmp_path / "spec.json")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "unknown key 'overlaps' in spec.inference; did you mean 'overlap'?" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.json", "tiny.ts"]


def test_cli_override_typo(tmp_path, capsys):
    from segrt.cli import main

    out = tmp_path / "art"
    rc = main(["export", str(WHOLEBODY_SMALL), "-o", str(out), "--random-init",
               "--override", "displayable_configs#hires=false"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert line == ("segrt: error: override 'displayable_configs#hires' matches no key of the bundle config; "
                    "did you mean 'displayable_configs#highres'?")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_label_inversion_cannot_be_bilinear():
    """argmax then invert moves labels, which only nearest can resample: refused instead of silently nearest."""
    from segrt.spec import Postprocessing

    with pytest.raises(SpecError, match="only 'nearest'"):
        Postprocessing(order="argmax_then_invert", invert_interp="bilinear")
    assert Postprocessing(order="invert_then_argmax", invert_interp="bilinear").invert_interp == "bilinear"
