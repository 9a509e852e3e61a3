"""One plan per segmentation (issue 10): the geometry, window grid and cell grid are planned once per call and the
stages downstream consume them; ``segrt run --plan`` prints the plan without segmenting."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from segrt.engine import preprocess as pp
from segrt.engine.cells import CellGrid
from segrt.engine.tiling import WindowPlan
from test_hostile import SPEC, _ct, _tiny_onnx


def _artifact(tmp: Path, **changes) -> Path:
    from segrt.export import export

    spec = json.loads(json.dumps(SPEC))
    for path, value in changes.items():
        d = spec
        keys = path.split(".")
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    src = _tiny_onnx(tmp / "m.onnx")
    return Path(export(src, tmp / "art", spec=spec))


VARIANTS = {
    "labels": {},
    "skip_rule": {"inference.skip_rule": {"kind": "max_below", "threshold": -150.0}},
    "probability_inverter": {"postprocessing.order": "invert_then_argmax", "postprocessing.invert_interp": "bilinear"},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def art(request, tmp_path_factory):
    return _artifact(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])


@pytest.fixture
def counts(monkeypatch):
    """Count every window plan, cell grid, geometry and spacing plan made."""
    c = Counter()

    def counting(cls, name):
        orig = cls.__init__

        def init(self, *a, **k):
            c[name] += 1
            orig(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", init)

    counting(WindowPlan, "windows")
    counting(CellGrid, "cells")
    for fn in ("plan_geometry", "plan_spacing", "plan_orientation"):
        orig = getattr(pp, fn)
        monkeypatch.setattr(pp, fn, lambda *a, _o=orig, _n=fn, **k: (c.update([_n]), _o(*a, **k))[1])
    return c


@pytest.mark.parametrize("max_memory", [None, "4G"])
def test_one_plan_per_segment_call(art, tmp_path, counts, max_memory):
    from segrt import Engine

    ct = _ct(tmp_path / "ct.nii.gz", shape=(40, 33, 21))
    with Engine.load(art, device="cpu", max_memory=max_memory) as eng:
        counts.clear()
        seg = eng.segment(str(ct), progress=False)
    assert seg.metadata["windows"] > 1
    assert dict(counts) == {"windows": 1, "cells": 1, "plan_geometry": 1, "plan_spacing": 1,
                            "plan_orientation": 1}, dict(counts)


def test_plan_from_the_header_is_the_plan_segment_uses(art, tmp_path):
    from segrt import Engine

    ct = _ct(tmp_path / "ct.nii.gz", shape=(40, 33, 21))
    with Engine.load(art, device="cpu") as eng:
        plan = eng.plan(str(ct))
        seg = eng.segment(str(ct), progress=False)
    assert plan.n_windows == seg.metadata["windows"]
    assert list(plan.geometry.output_shape) == seg.metadata["preprocessed_shape"]
    assert plan.memory.to_dict() == seg.metadata["memory_plan"]


def test_segmenting_with_a_plan_does_not_change_the_result(art, tmp_path):
    """The planned geometry handed to preprocess() gives the same image as planning inside it."""
    from segrt import Engine
    from segrt.volume import load_nifti

    vol = load_nifti(_ct(tmp_path / "ct.nii.gz", shape=(40, 33, 21)))
    with Engine.load(art, device="cpu") as eng:
        plan = eng.plan(vol)
        a, _ = pp.preprocess(vol, eng.spec.preprocessing)
        b, _ = pp.preprocess(vol, eng.spec.preprocessing, geometry=plan.geometry)
    np.testing.assert_array_equal(a, b)


def test_cli_plan_prints_without_segmenting(art, tmp_path, capsys):
    from segrt.cli import main

    ct = _ct(tmp_path / "ct.nii.gz", shape=(40, 33, 21))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(art), str(ct), "--plan", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for word in ("windows", "memory", "predicted peak", "time", "preprocessed"):
        assert word in out, out
    assert main(["run", str(art), str(ct), "--plan", "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["windows"] >= 1 and d["predicted_network_seconds"] > 0 and d["memory_plan"]["peak_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_run_without_output_or_plan_is_a_usage_error(art, tmp_path, capsys):
    from segrt.cli import main

    ct = _ct(tmp_path / "ct.nii.gz")
    assert main(["run", str(art), str(ct)]) == 2
    assert "segrt: error: segrt run needs an output" in capsys.readouterr().err


def test_bad_options_are_refused_at_load(art):
    from segrt import Engine, UsageError

    with pytest.raises(UsageError, match="accum_dtype"):
        Engine.load(art, device="cpu", accum_dtype="float8")
    with pytest.raises(UsageError, match="threads"):
        Engine.load(art, device="cpu", threads=0)


def test_device_pipeline_plans_once_and_matches_the_numpy_engine(tmp_path, counts):
    """The torch pipeline (run on torch's CPU device) consumes the same plan: one of each, same labels."""
    torch = pytest.importorskip("torch")
    from segrt.engine.gpu import TorchPipeline
    from segrt.engine.plan import make_plan
    from segrt.spec import Spec
    from segrt.volume import load_nifti

    art_dir = _artifact(tmp_path)
    from segrt import Engine

    vol = load_nifti(_ct(tmp_path / "ct.nii.gz", shape=(40, 33, 21)))
    with Engine.load(art_dir, device="cpu") as eng:
        ref = eng.segment(vol, progress=False)
        spec = eng.spec
        session = eng.backend

        def infer_torch(x):
            return torch.from_numpy(session.infer(x.numpy()))

        pipe = TorchPipeline(spec, infer_torch, "cpu", accum_dtype=torch.float32)
        counts.clear()
        plan = make_plan(spec, vol.affine, vol.spatial_shape, vol.num_channels)
        res = pipe.segment(vol, plan=plan)
    assert isinstance(spec, Spec)
    assert dict(counts) == {"windows": 1, "cells": 1, "plan_geometry": 1, "plan_spacing": 1,
                            "plan_orientation": 1}, dict(counts)
    np.testing.assert_array_equal(res.labels, ref.labels)


def test_run_summary_states_windows_run_and_skipped(tmp_path, capsys):
    from segrt.cli import main

    art = _artifact(tmp_path, **VARIANTS["skip_rule"])
    ct = _ct(tmp_path / "ct.nii.gz", shape=(40, 33, 21))
    assert main(["run", str(art), str(ct), "-o", str(tmp_path / "o.nii.gz"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("wrote "))
    assert " windows run" in line and " of " in line, line
    assert main(["run", str(art), str(ct), "-o", str(tmp_path / "o.nii.gz"), "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    if d["windows_skipped"]:
        assert f"({d['windows_skipped']} skipped by the skip rule)" in line
    assert f"{d['windows_run']} of {d['windows']} windows run" in line
