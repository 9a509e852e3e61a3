"""Parity: MONAI's own bundle pipeline vs segrt (export → ONNX Runtime engine) on the same weights and volume.

The volume has a non-trivial affine: LPS, anisotropic spacing, odd sizes, and after resampling it is larger
than the 96³ roi along the first axis and smaller along the others (so padding and window placement matter).
Spacings are chosen so that nearest inversion has no exact .5 source coordinates (MONAI decides those by
float noise, MONAI_NOTES §6.3); every ratio s_in/s_out here has an odd denominator.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_util import (BUNDLES, FIXTURES, bundle_with_weights, ct_like, lps_affine, run_monai_bundle,
                         top2_margin, write_volume)

pytest.importorskip("monai")

PROB_TOL = 1e-3
LABEL_AGREEMENT = 0.999
TIE_MARGIN = 1e-3

CASES = {
    "spleen": (BUNDLES / "spleen_ct_segmentation", {}),
    "wholebody_small_1.5mm": (FIXTURES / "bundles" / "wholebody_small", {}),
    "wholebody_small_3mm": (FIXTURES / "bundles" / "wholebody_small", {"displayable_configs#highres": False}),
}


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    shape, spacing = (171, 100, 47), (0.9, 1.2, 2.7)
    return write_volume(d / "case_ct.nii.gz", ct_like(shape, seed=3), lps_affine(spacing))


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_monai_pipeline(case, volume_path, tmp_path):
    src, overrides = CASES[case]
    if not src.exists():
        pytest.skip(f"{src} not present (the shared bundles are beside the repo only in CI)")
    from segrt.engine.engine import Engine
    from segrt.export import export

    bundle = bundle_with_weights(src, tmp_path / "bundle", seed=11, overrides=overrides)
    art = export(bundle, tmp_path / "artifact", overrides=overrides or None)
    ref = run_monai_bundle(bundle, volume_path, tmp_path / "monai_out", overrides=overrides)

    with Engine.load(art, device="cpu") as eng:
        seg = eng.segment(volume_path, return_probabilities=True, progress=False)

    probs = seg.probabilities
    assert probs.shape == ref["probs"].shape, (probs.shape, ref["probs"].shape)
    prob_diff = float(np.abs(probs - ref["probs"]).max())

    assert seg.labels.shape == ref["labels"].shape
    agree = seg.labels == ref["labels"].astype(seg.labels.dtype)
    agreement = float(agree.mean())
    margin = top2_margin(ref["inv_probs"])
    bad = ~agree
    max_margin_bad = float(margin[bad].max()) if bad.any() else 0.0
    report = {"case": case, "max_abs_prob_diff": prob_diff, "label_agreement": agreement,
              "disagreeing_voxels": int(bad.sum()), "max_margin_at_disagreement": max_margin_bad,
              "voxels": int(agree.size), "windows": seg.metadata["windows"]}
    print("PARITY", json.dumps(report))
    # the network must actually make decisions here (not one label everywhere)
    assert len(np.unique(ref["labels"])) > 1
    assert prob_diff <= PROB_TOL, report
    assert agreement >= LABEL_AGREEMENT, report
    assert max_margin_bad < TIE_MARGIN, report
    # geometry: labels on the input grid, same affine
    import nibabel as nib

    assert np.allclose(seg.affine, nib.load(str(volume_path)).affine)
