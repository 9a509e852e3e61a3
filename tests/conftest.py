from __future__ import annotations

import sys
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


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory):
    """The reduced whole-body fixture bundle, exported once with random weights."""
    pytest.importorskip("torch")
    from parity_util import FIXTURES
    from segrt.export import export

    out = tmp_path_factory.mktemp("art") / "wholebody_small"
    return Path(export(FIXTURES / "bundles" / "wholebody_small", out, random_init=True))
