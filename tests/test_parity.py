"""Parity: MONAI's own bundle pipeline vs segrt (export → ONNX Runtime engine) on the same weights and volume.

The volume has a non-trivial affine: LPS, anisotropic spacing, odd sizes, and after resampling it is larger
than the 96³ roi along the first axis and smaller along the others (so padding and window placement matter).
The float32 volume's spacings (0.9, 1.2, 2.7; float32 in the NIfTI header) give no exact .5 source coordinates
for nearest inversion. The int16 variant is integer CT with many exact-0 voxels at spacings NIfTI stores exactly
(0.75, 1.25, 2.5): many source coordinates fall on exact integers and .5 ties, where MONAI's float64 noise decides
which voxels stay 0 for NormalizeIntensityd(nonzero=True) and which way nearest rounds (docs/semantics.md §3.6, §6);
segrt follows torch's coordinate arithmetic, so both must still agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_util import (BUNDLES, FIXTURES, affine_grid_replicated, bundle_with_weights, ct_like, lps_affine, mri_like,
                         oblique_affine, run_monai_bundle, top2_margin, write_volume)

pytest.importorskip("monai")

PROB_TOL = 1e-3
LABEL_AGREEMENT = 0.999
TIE_MARGIN = 1e-3

CASES = {  # name: (bundle, config overrides, input volume)
    "spleen": (BUNDLES / "spleen_ct_segmentation", {}, "float32"),
    "wholebody_small_1.5mm": (FIXTURES / "bundles" / "wholebody_small", {}, "float32"),
    # slow (-m slow): the 3 mm config is checked by default by the int16 case below, the float32 volume by 1.5 mm
    "wholebody_small_3mm": (FIXTURES / "bundles" / "wholebody_small", {"displayable_configs#highres": False},
                            "float32"),
    "wholebody_small_3mm_int16": (FIXTURES / "bundles" / "wholebody_small", {"displayable_configs#highres": False},
                                  "int16"),
    # whole-brain UNesT settings (no geometry, NormalizeIntensityd(nonzero="True", channel_wise="True"),
    # overlap 0.7, sw_batch 4, softmax → Invertd (no-op) → argmax), with the bundle's own scripts/ transformer
    "brain_small": (FIXTURES / "bundles" / "brain_small", {}, "mri"),
}


def _write_int16(path, array, affine):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    assert nib.load(str(path)).get_data_dtype() == np.int16
    return path


@pytest.fixture(scope="module")
def volume_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    shape = (171, 100, 47)
    ct = ct_like(shape, seed=3)
    # int16 variant: body at ~0 HU; |HU| < 12 set to exactly 0 (water), so a large share of voxels is exactly 0
    hu = ct - 40.0
    hu[np.abs(hu) < 12] = 0.0
    return {"float32": write_volume(d / "case_ct.nii.gz", ct, lps_affine((0.9, 1.2, 2.7))),
            "int16": _write_int16(d / "case_ct_int16.nii.gz", hu, lps_affine((0.75, 1.25, 2.5))),
            # larger than the 32³ roi on two axes, smaller on the third (padded); ~half the voxels exactly 0
            "mri": write_volume(d / "case_t1.nii.gz", mri_like((61, 45, 27), seed=5),
                                oblique_affine((1.0, 1.2, 1.5)))}


SLOW = {"wholebody_small_3mm"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_parity_with_monai_pipeline(case, volume_paths, tmp_path):
    src, overrides, vol_kind = CASES[case]
    volume_path = volume_paths[vol_kind]
    if not src.exists():
        pytest.skip(f"{src} not present (the shared bundles are beside the repo only in CI)")
    from segrt.engine.engine import Engine
    from segrt.export import export

    bundle = bundle_with_weights(src, tmp_path / "bundle", seed=11, overrides=overrides)
    # one gate sample: the gate is tested elsewhere (test_export) and is most of an export's time
    art = export(bundle, tmp_path / "artifact", overrides=overrides or None, gate_samples=1)
    ref = run_monai_bundle(bundle, volume_path, tmp_path / "monai_out", overrides=overrides)

    with Engine.load(art, device="cpu", skip_empty=False) as eng:  # parity: every window runs
        seg = eng.segment(volume_path, return_probabilities=True, progress=False)
        pre_spec = eng.spec.preprocessing

    # the preprocessed image: exact zeros (NormalizeIntensityd nonzero masks) and values
    from segrt.engine.preprocess import preprocess
    from segrt.volume import load_nifti

    vol = load_nifti(volume_path)
    input_zero_fraction = float(np.mean(vol.array == 0))
    pre, _ = preprocess(vol, pre_spec)
    ref_pre = ref["preprocessed"]
    assert pre[0].shape == ref_pre.shape
    zero_mismatch = (pre[0] == 0) != (ref_pre == 0)
    pre_zero_mismatch = int(zero_mismatch.sum())
    pre_diff = float(np.abs(pre[0] - ref_pre)[~zero_mismatch].max())

    probs = seg.probabilities
    assert probs.shape == ref["probs"].shape, (probs.shape, ref["probs"].shape)
    prob_diff = float(np.abs(probs - ref["probs"]).max())

    assert seg.labels.shape == ref["labels"].shape
    agree = seg.labels == ref["labels"].astype(seg.labels.dtype)
    agreement = float(agree.mean())
    margin = top2_margin(ref["inv_probs"])
    bad = ~agree
    max_margin_bad = float(margin[bad].max()) if bad.any() else 0.0
    report = {"case": case, "input_zero_fraction": round(input_zero_fraction, 4),
              "preprocessed_zero_mismatch": pre_zero_mismatch, "preprocessed_max_abs_diff": pre_diff,
              "max_abs_prob_diff": prob_diff, "label_agreement": agreement,
              "disagreeing_voxels": int(bad.sum()), "max_margin_at_disagreement": max_margin_bad,
              "voxels": int(agree.size), "windows": seg.metadata["windows"]}
    print("PARITY", json.dumps(report))
    # the network must actually make decisions here (not one label everywhere)
    assert len(np.unique(ref["labels"])) > 1
    if affine_grid_replicated(theta_diagonal=True):  # these volumes' resampling θ is diagonal (or there is none)
        assert pre_zero_mismatch == 0, report
    else:  # torch's affine_grid rounds otherwise here (parity_util.torch_arithmetic): only values within its ulp
        # noise of 0 can be exactly 0 on one side alone, a vanishing share of the voxels
        assert pre_zero_mismatch <= 1e-4 * zero_mismatch.size, report
    assert pre_diff <= 1e-5, report
    assert prob_diff <= PROB_TOL, report
    assert agreement >= LABEL_AGREEMENT, report
    assert max_margin_bad < TIE_MARGIN, report
    # geometry: labels on the input grid, same affine
    import nibabel as nib

    assert np.allclose(seg.affine, nib.load(str(volume_path)).affine)
