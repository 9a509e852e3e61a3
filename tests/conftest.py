from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- exported artifacts, once per session ----------------------------------------------------------------------
def _tree_digest(path: Path) -> str:
    """sha256 over a file or a directory tree (relative names and bytes; __pycache__ left out)."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.relative_to(path) if p != path else p.name).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


class ExportCache:
    """``export(source, **kwargs)`` once per session per (content of ``source``, arguments).

    Exports are the suite's most expensive fixtures and several modules need the same one; each lives under
    the session's tmp dir, keyed by a sha256 of the source bundle's files and the export arguments. A cached
    artifact is shared: tests must not modify it (copy it first, as test_cli / test_export do). Every hand-out
    re-checks the artifact's own digest, so a test that edits one in place fails instead of corrupting others.
    """

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, tuple[Path, str]] = {}

    def __call__(self, source, **kwargs) -> Path:
        from segrt.export import export

        source = Path(source)
        key = hashlib.sha256((_tree_digest(source) + repr(sorted(kwargs.items()))).encode()).hexdigest()[:20]
        if key in self._made:
            path, digest = self._made[key]
            assert _tree_digest(path) == digest, f"a test modified the shared exported artifact {path}"
            return path
        out = self.root / f"{source.name}-{key}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-init warning: tests that check it export themselves
            path = Path(export(source, out, **kwargs))
        self._made[key] = (path, _tree_digest(path))
        return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> ExportCache:
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    return ExportCache(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="session")
def small_artifact(exported):
    """The reduced whole-body fixture bundle, exported once with random weights (one gate sample: the gate itself
    is tested in test_export / test_fp16 / test_cpu_variants; the gate is most of an export's time)."""
    from parity_util import FIXTURES

    return exported(FIXTURES / "bundles" / "wholebody_small", random_init=True, gate_samples=1)


@pytest.fixture(scope="session")
def demo_default_artifact(exported):
    """The shipped demo bundle (trained weights) exported with the defaults, as ``segrt demo`` caches it."""
    from segrt.demo import DEMO_BUNDLE

    return exported(DEMO_BUNDLE)


def pytest_report_header(config):
    if "not slow" in (config.getoption("markexpr") or ""):
        return "slow tests deselected (pyproject addopts): run them with -m slow, or everything with -m ''"
    return None
