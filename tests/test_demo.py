"""segrt demo: the shipped bundle, exported like a zoo bundle, segments phantoms with mean Dice ≥ 0.9."""

from __future__ import annotations

import pytest

pytest.importorskip("monai")

CASES = [("RAS", (1.5, 1.5, 1.5)), ("LPS", (1.5, 1.5, 1.5)), ("RAS", (0.9, 0.9, 3.0)), ("LPS", (1.1, 1.3, 2.5))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("cache")
    mp.setenv("SEGRT_CACHE", str(d))
    yield d
    mp.undo()


@pytest.mark.parametrize("orientation,spacing", CASES)
def test_demo_dice(orientation, spacing, cache, tmp_path):
    from segrt.demo import run_demo

    res = run_demo(tmp_path / "demo", orientation=orientation, spacing=spacing, seed=21, quiet=True, device="cpu")
    assert res["mean_dice"] >= 0.9, res["dice"]
    assert (tmp_path / "demo" / "phantom_labels.nii.gz").is_file()
    assert str(cache) in res["artifact"]


def test_demo_cli_reuses_cached_artifact(cache, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "segrt.cli", "demo", "-o", str(tmp_path / "d"), "--spacing", "2.5"],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "SEGRT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert "mean" in r.stdout and "phantom_labels.nii.gz" in r.stdout
    assert "exporting the demo bundle" not in r.stdout  # cached by the earlier tests
