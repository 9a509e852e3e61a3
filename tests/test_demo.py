"""segrt demo: the shipped bundle, exported like a zoo bundle, segments phantoms with mean Dice ≥ 0.9."""

from __future__ import annotations

import pytest

pytest.importorskip("monai")

# By default: RAS isotropic and LPS anisotropic (both flips and resampling on every axis). Slow (run with -m slow):
# the other two combinations, which exercise no code path the first two and tests/test_preprocess.py do not.
CASES = [("RAS", (1.5, 1.5, 1.5)), pytest.param("LPS", (1.5, 1.5, 1.5), marks=pytest.mark.slow),
         pytest.param("RAS", (0.9, 0.9, 3.0), marks=pytest.mark.slow), ("LPS", (1.1, 1.3, 2.5))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_default_artifact):
    """SEGRT_CACHE holding the demo artifact as ``segrt demo`` caches it: the session's export of the demo bundle
    with the same (default) arguments, shared with test_memory_skip instead of exporting it again."""
    from segrt.demo import DEMO_BUNDLE, _bundle_digest, demo_artifact

    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("cache")
    (d / f"demo-artifact-{_bundle_digest(DEMO_BUNDLE)}").symlink_to(demo_default_artifact, target_is_directory=True)
    mp.setenv("SEGRT_CACHE", str(d))
    hit = demo_artifact(log=lambda msg: pytest.fail(f"expected the cached artifact, got: {msg}"))
    assert hit.resolve() == demo_default_artifact.resolve()
    yield d
    mp.undo()


@pytest.mark.parametrize("orientation,spacing", CASES)
def test_demo_dice(orientation, spacing, cache, tmp_path):
    from segrt.demo import run_demo

    res = run_demo(tmp_path / "demo", orientation=orientation, spacing=spacing, seed=21, quiet=True, device="cpu")
    assert res["mean_dice"] >= 0.9, res["dice"]
    assert (tmp_path / "demo" / "phantom_labels.nii.gz").is_file()
    pytest.importorskip("matplotlib")
    assert res["preview_path"] == str(tmp_path / "demo" / "preview.png")
    assert (tmp_path / "demo" / "preview.png").read_bytes()[:4] == b"\x89PNG"
    assert str(cache) in res["artifact"]


def test_demo_cli_reuses_cached_artifact(cache, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "segrt.cli", "demo", "-o", str(tmp_path / "d"), "--spacing", "2.5"],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "SEGRT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert "mean" in r.stdout and "phantom_labels.nii.gz" in r.stdout
    assert "preview.png" in r.stdout
    assert "exporting the demo bundle" not in r.stdout  # cached by the earlier tests
