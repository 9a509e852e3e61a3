"""Where the benchmarks find the zoo bundles, the fixtures and their results folder."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # read-only copy of the zoo configs beside the clone (CI); absent in a user's clone
WHOLEBODY = SHARED / "bundles" / "wholeBody_ct_segmentation"
SMOKE_BUNDLE = REPO / "tests" / "fixtures" / "bundles" / "wholebody_small"
RESULTS = REPO / "benchmarks" / "results"
