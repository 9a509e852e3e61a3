"""The torch device pipeline (segrt.engine.gpu) against the NumPy engine's components.

Everything runs on torch's CPU device here (the pipeline is device-generic); the ``gpu``-marked tests repeat the
key comparisons on CUDA and are skipped without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from segrt.engine import preprocess as pp  # noqa: E402
from segrt.engine.orchestrator import _softmax_inplace  # noqa: E402
from segrt.engine.gpu import TorchPipeline  # noqa: E402
from segrt.engine.gpu import preprocess as gpp  # noqa: E402
from segrt.engine.gpu.invert import TorchProbabilityInverter  # noqa: E402
from segrt.engine.stitch import sliding_window_stream  # noqa: E402
from segrt.errors import InferenceError, VolumeError  # noqa: E402
from segrt.engine import resample as KR  # noqa: E402
from segrt.engine.gpu.pipeline import TorchOps  # noqa: E402
from segrt.engine.plan import make_plan  # noqa: E402
from segrt.spec import (InferenceSpec, IntensityOp, Postprocessing, Preprocessing, SpacingSpec,  # noqa: E402
                        Spec)
from segrt.volume import Volume  # noqa: E402

torch.set_num_threads(1)

WHOLEBODY_INTENSITY = (IntensityOp.from_dict({"op": "normalize_intensity", "nonzero": True}),
                       IntensityOp.from_dict({"op": "scale_intensity", "minv": -1.0, "maxv": 1.0}))
SPLEEN_INTENSITY = (IntensityOp.from_dict({"op": "scale_intensity_range", "a_min": -57, "a_max": 164,
                                           "b_min": 0.0, "b_max": 1.0, "clip": True}),)


def _affine(spacing, flips=(True, True, False), perm=(0, 1, 2), t=(3.0, -4.0, 5.0)):
    A = np.zeros((4, 4))
    for i, p in enumerate(perm):
        A[p, i] = spacing[i] * (-1.0 if flips[p] else 1.0)
    A[:3, 3] = t
    A[3, 3] = 1
    return A


def _ct(rng, shape):
    x = rng.normal(40.0, 300.0, size=shape).astype(np.float32)
    x[rng.random(shape) < 0.2] = 0.0  # exact zeros: the nonzero mask must see them
    return np.round(x)


class PointwisePredictor:
    """``logits[k] = a_k · x + b_k`` (window-independent), usable from torch and from NumPy."""

    def __init__(self, k, c=1, seed=0, half=False):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(k, c, generator=g) * 4.0
        self.b = torch.randn(k, generator=g) * 0.3
        self.half = half

    def __call__(self, x):
        out = torch.einsum("kc,bcxyz->bkxyz", self.w.to(x.device), x) + self.b.to(x.device)[None, :, None, None, None]
        return out.half() if self.half else out

    def numpy(self, batch):
        return self(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


class ConvPredictor(PointwisePredictor):
    """A tiny 3x3x3 convolution (zero padding): outputs depend on the window, so stitching order matters."""

    def __init__(self, k, c=1, seed=0, half=False):
        super().__init__(k, c, seed, half)
        g = torch.Generator().manual_seed(seed + 1)
        self.kernel = torch.randn(k, c, 3, 3, 3, generator=g)

    def __call__(self, x):
        # one window at a time: a batched conv3d may pick another algorithm per batch size (seen on AVX2 builds of
        # torch: 1e-6 differences between batches of 2 and 3), and these tests compare stitchers, not convolutions
        k, b = self.kernel.to(x.device), self.b.to(x.device)
        out = torch.cat([torch.nn.functional.conv3d(x[i:i + 1], k, b, padding=1) for i in range(x.shape[0])])
        return out.half() if self.half else out


def _spec(k=4, order="argmax_then_invert", interp="nearest", blend="gaussian", pad="replicate", softmax=True,
          roi=(12, 10, 8), overlap=(0.25, 0.5, 0.3), batch=2, pixdim=(1.5, 1.3, 2.0), intensity=WHOLEBODY_INTENSITY,
          orientation="RAS"):
    return Spec(1, k, Preprocessing(orientation, None if pixdim is None else SpacingSpec(pixdim), intensity),
                InferenceSpec(roi, batch, overlap, blend, padding_mode=pad, cval=0.25),
                Postprocessing(softmax, order, interp))


def numpy_engine(spec, vol, predict):
    """The NumPy engine's path (Engine.segment without a backend): labels and full stitched probabilities."""
    image, rec = pp.preprocess(vol, spec.preprocessing)
    k = spec.num_classes
    probs = np.empty((k, *image.shape[1:]), np.float32)
    for x0, slab in sliding_window_stream(image, spec.inference, predict, k):
        if spec.postprocessing.softmax:
            _softmax_inplace(slab)
        probs[:, x0:x0 + slab.shape[1]] = slab
    post = spec.postprocessing
    if post.order == "invert_then_argmax" and post.invert_interp == "bilinear":
        inv = rec.probability_inverter(k, np.dtype(spec.label_dtype))
        inv.push(0, probs)
        labels = rec.unorient(inv.finish())
    else:
        labels = rec.invert_labels(np.argmax(probs, axis=0).astype(spec.label_dtype))
    return labels, probs, rec


def _near_tie_rows(probs, gap=1e-5):
    s = np.sort(probs, axis=0)
    return (s[-1] - s[-2]) <= gap if probs.shape[0] > 1 else np.zeros(probs.shape[1:], bool)


# ---- preprocessing ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,spacing,perm,pixdim", [
    ((23, 17, 9), (1.1, 0.9, 2.7), (0, 1, 2), (1.5, 1.3, 2.0)),
    ((16, 21, 11), (0.8, 1.7, 1.0), (2, 0, 1), (1.5, 1.5, 1.5)),
    ((9, 8, 30), (2.5, 2.5, 0.7), (1, 2, 0), (1.0, 2.0, 1.1)),
])
def test_preprocess_matches_numpy(shape, spacing, perm, pixdim):
    rng = np.random.default_rng(1)
    arr = _ct(rng, shape)
    vol = Volume.from_array(arr, affine=_affine(spacing, perm=perm))
    spec = _spec(pixdim=pixdim)
    ref, rec = pp.preprocess(vol, spec.preprocessing)
    # geometry + resampling alone: float64 is bit-identical to the NumPy reference
    raw = torch.from_numpy(vol.array)
    img, or_aff, ornt = gpp.orient(raw, vol.affine, "RAS")
    np.testing.assert_array_equal(or_aff, rec.oriented_affine)
    res64 = gpp.resample_linear(img, rec.spacing.M, rec.spacing.out_shape, dtype=torch.float64).numpy()
    oriented, _, _ = pp.orient(vol.array, vol.affine, "RAS")
    ref_res = pp.apply_spacing(oriented, rec.spacing)
    np.testing.assert_array_equal(res64, ref_res)
    assert np.array_equal(res64 == 0, ref_res == 0)  # exact zeros stay exact
    res32 = gpp.resample_linear(img, rec.spacing.M, rec.spacing.out_shape, dtype=torch.float32).numpy()
    np.testing.assert_allclose(res32, ref_res, rtol=1e-5, atol=1e-5 * np.abs(ref_res).max())
    # the whole chain, intensity included
    pipe = TorchPipeline(spec, PointwisePredictor(4), "cpu")
    plan = make_plan(spec, vol.affine, vol.spatial_shape, vol.num_channels)
    ops = TorchOps(pipe, plan)  # the stages orchestrator.run calls
    x = ops.intensity(ops.resample(raw, plan))
    rec2 = plan.geometry
    assert rec2.output_shape == rec.output_shape and rec2.oriented_shape == rec.oriented_shape
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=2e-6)
    assert np.all(vol.array == arr)  # the caller's array is untouched


def test_resample_general_matrix_matches_reference():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(2, 11, 9, 7)).astype(np.float32)
    M = np.eye(4)
    M[:3, :3] = [[0.7, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.3]]
    M[:3, 3] = [0.3, -0.2, 0.1]
    out = gpp.resample_linear(gpp.OrientedImage(torch.from_numpy(src)), M, (13, 8, 6)).numpy()
    np.testing.assert_array_equal(out, KR.resample_linear(src, M, (13, 8, 6)))
    near = gpp.resample_nearest(gpp.OrientedImage(torch.from_numpy(src)), M, (13, 8, 6)).numpy()
    np.testing.assert_array_equal(near, KR.resample_nearest(src, M, (13, 8, 6)))


@pytest.mark.parametrize("op", [
    {"op": "normalize_intensity", "nonzero": True, "channel_wise": True},
    {"op": "normalize_intensity", "nonzero": False, "subtrahend": 3.0, "divisor": 0.0},
    {"op": "scale_intensity", "minv": -1.0, "maxv": 1.0, "channel_wise": True},
    {"op": "scale_intensity", "minv": None, "maxv": None, "factor": 0.5},
    {"op": "scale_intensity_range", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1, "clip": True},
    {"op": "scale_intensity_range_percentiles", "lower": 5, "upper": 95, "b_min": 0, "b_max": 1, "clip": True},
    {"op": "shift_intensity", "offset": 0.5},
])
def test_intensity_ops_match_numpy(op):
    rng = np.random.default_rng(3)
    x = _ct(rng, (2, 13, 7, 5))
    ops = (IntensityOp.from_dict(op),)
    ref = pp.apply_intensity(x, ops)
    got = gpp.apply_intensity(torch.from_numpy(x.copy()), ops).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("op", [
    {"op": "normalize_intensity", "nonzero": True},
    {"op": "normalize_intensity", "nonzero": False},
    {"op": "normalize_intensity", "nonzero": True, "channel_wise": True},
    {"op": "normalize_intensity", "nonzero": False, "channel_wise": True},
])
@pytest.mark.parametrize("seed", range(6))
def test_normalize_intensity_statistics_are_the_numpy_engines(op, seed):
    """Both engines normalise with the very same mean and std (the device takes them from the NumPy functions): on
    fresh random volumes (sizes whose float32 pairwise sums differ from the float64 mean) the results are equal."""
    rng = np.random.default_rng(100 + seed)
    x = (rng.normal(40.0, 300.0, size=(2, 37, 29, 23)) * (rng.random((2, 37, 29, 23)) > 0.3)).astype(np.float32)
    ops = (IntensityOp.from_dict(op),)
    ref = pp.apply_intensity(x, ops)
    got = gpp.apply_intensity(torch.from_numpy(x.copy()), ops).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # the statistics themselves are identical
    vals = x[x != 0] if op["nonzero"] else x
    assert gpp._stats(torch.from_numpy(np.ascontiguousarray(vals))) == (pp._mean_f32(vals), pp._std_f32(vals))


def test_constant_image_intensity_edge_cases():
    x = np.full((1, 5, 4, 3), 5.0, np.float32)
    for op in WHOLEBODY_INTENSITY:
        ref = pp.apply_intensity(x, (op,))
        np.testing.assert_array_equal(gpp.apply_intensity(torch.from_numpy(x.copy()), (op,)).numpy(), ref)
    z = np.zeros((1, 5, 4, 3), np.float32)  # all-zero image: nonzero normalisation leaves it alone
    np.testing.assert_array_equal(gpp.apply_intensity(torch.from_numpy(z.copy()), WHOLEBODY_INTENSITY).numpy(),
                                  pp.apply_intensity(z, WHOLEBODY_INTENSITY))


# ---- the whole pipeline -------------------------------------------------------------------------
CASES = [
    # order, interp, blend, padding, shape (one axis smaller than the roi), spacing, perm
    ("argmax_then_invert", "nearest", "gaussian", "replicate", (23, 17, 7), (1.1, 0.9, 2.7), (0, 1, 2)),
    ("argmax_then_invert", "nearest", "constant", "constant", (19, 26, 13), (0.9, 1.2, 1.6), (2, 0, 1)),
    ("invert_then_argmax", "bilinear", "constant", "constant", (21, 15, 11), (1.2, 0.8, 2.1), (0, 1, 2)),
    ("invert_then_argmax", "bilinear", "gaussian", "replicate", (17, 9, 25), (0.7, 1.9, 1.0), (1, 2, 0)),
    ("invert_then_argmax", "nearest", "gaussian", "constant", (15, 22, 10), (1.0, 1.0, 2.2), (0, 1, 2)),
]


@pytest.mark.parametrize("order,interp,blend,pad,shape,spacing,perm", CASES)
@pytest.mark.parametrize("predictor", [PointwisePredictor, ConvPredictor])
def test_pipeline_matches_numpy_engine(order, interp, blend, pad, shape, spacing, perm, predictor):
    rng = np.random.default_rng(sum(shape))
    vol = Volume.from_array(_ct(rng, shape), affine=_affine(spacing, perm=perm))
    spec = _spec(k=5, order=order, interp=interp, blend=blend, pad=pad)
    net = predictor(5, seed=len(order))
    ref_labels, ref_probs, _ = numpy_engine(spec, vol, net.numpy)
    assert len(np.unique(ref_labels)) >= 3  # a test that can fail: several classes win somewhere
    res = TorchPipeline(spec, net, "cpu").segment(vol, return_probabilities=True)
    assert res.labels.dtype == np.uint8 and res.labels.shape == shape
    np.testing.assert_allclose(res.metadata["probabilities"], ref_probs, rtol=0, atol=1e-5)
    # labels: identical except at near-ties of the (float32) probabilities
    if order == "argmax_then_invert" or interp == "nearest":
        ok = ~_near_tie_rows(ref_probs)
        lab_res = np.argmax(res.metadata["probabilities"], 0)
        assert np.array_equal(lab_res[ok], np.argmax(ref_probs, 0)[ok])
    mism = res.labels != ref_labels
    assert mism.mean() <= 0.002, f"{mism.sum()} of {mism.size} labels differ"
    assert set(res.timings) >= {"upload", "preprocess", "infer", "stitch", "invert", "download"}
    assert res.metadata["windows"] > 1


@pytest.mark.parametrize("half", [False, True])
def test_stitched_logits_bit_identical(half):
    """Without softmax the stitched output is the raw blend: bit-identical to the NumPy stitcher, also for
    float16 network outputs (weighted as MONAI's in-place ``pred *= w``)."""
    rng = np.random.default_rng(5)
    vol = Volume.from_array(_ct(rng, (26, 14, 11)), affine=_affine((1.0, 1.4, 1.9)))
    # elementwise intensity ops only: statistics (mean) may differ by an ulp between the two engines
    spec = _spec(k=3, softmax=False, blend="gaussian", pad="replicate", overlap=(0.5, 0.25, 0.7),
                 intensity=SPLEEN_INTENSITY)
    net = ConvPredictor(3, seed=7, half=half)
    _, ref_probs, _ = numpy_engine(spec, vol, net.numpy)
    res = TorchPipeline(spec, net, "cpu").segment(vol, return_probabilities=True)
    np.testing.assert_array_equal(res.metadata["probabilities"], ref_probs)


def test_no_spacing_no_orientation_and_many_classes():
    """UNesT-like: raw voxel order, no resampling, > 256 classes → uint16 labels."""
    rng = np.random.default_rng(6)
    vol = Volume.from_array(_ct(rng, (14, 11, 9)), affine=_affine((1.0, 1.0, 1.0)))
    spec = _spec(k=300, order="invert_then_argmax", interp="bilinear", pixdim=None, orientation=None,
                 blend="constant", pad="constant", roi=(8, 8, 8), overlap=(0.7, 0.7, 0.7))
    net = PointwisePredictor(300, seed=3)
    ref_labels, ref_probs, _ = numpy_engine(spec, vol, net.numpy)
    res = TorchPipeline(spec, net, "cpu").segment(vol, return_probabilities=True)
    assert res.labels.dtype == np.uint16
    ok = ~_near_tie_rows(ref_probs)
    assert np.array_equal(res.labels[ok], ref_labels[ok])


def test_fp16_accumulators_agree_with_fp32():
    rng = np.random.default_rng(8)
    vol = Volume.from_array(_ct(rng, (30, 20, 12)), affine=_affine((1.2, 1.0, 1.8)))
    spec = _spec(k=6)
    net = ConvPredictor(6, seed=2, half=True)
    r32 = TorchPipeline(spec, net, "cpu").segment(vol, return_probabilities=True)
    r16 = TorchPipeline(spec, net, "cpu", accum_dtype=torch.float16).segment(vol, return_probabilities=True)
    diff = np.abs(r16.metadata["probabilities"] - r32.metadata["probabilities"]).max()
    assert 0 < diff < 5e-3  # float16 rounding is visible but small
    assert (r16.labels == r32.labels).mean() > 0.99
    assert r16.metadata["stitch_buffer_bytes"]["ring"] * 2 == r32.metadata["stitch_buffer_bytes"]["ring"]


def test_streaming_memory_bound():
    """A long volume: the stitcher's and the inverter's buffers stay a small fraction of K × volume."""
    rng = np.random.default_rng(9)
    shape = (500, 14, 12)
    vol = Volume.from_array(_ct(rng, shape), affine=np.eye(4))
    k = 8
    for order, interp in (("argmax_then_invert", "nearest"), ("invert_then_argmax", "bilinear")):
        spec = _spec(k=k, order=order, interp=interp, roi=(10, 10, 10), pixdim=(1.3, 1.0, 1.0))
        res = TorchPipeline(spec, PointwisePredictor(k), "cpu").segment(vol)
        res_shape = res.metadata["preprocessed_shape"]
        full = 4 * k * int(np.prod(res_shape))
        total = sum(res.metadata["stitch_buffer_bytes"].values())
        assert total < full / 10, (total, full)
        if order == "invert_then_argmax":
            assert res.metadata["inverter_peak_buffer_bytes"] < full / 20


@pytest.mark.parametrize("chunks", [[3, 4, 1, 9], [1] * 17, [17]])
def test_probability_inverter_matches_reference(chunks):
    rng = np.random.default_rng(len(chunks))
    k, src_shape, out_shape = 4, (17, 9, 8), (23, 13, 5)
    probs = rng.random((k, *src_shape)).astype(np.float32)
    M = np.diag([0.72, 0.66, 1.7, 1.0])
    M[:3, 3] = [0.05, -0.2, 0.3]
    ref = KR.invert_probabilities_argmax(probs, M, out_shape, np.uint8)
    inv = TorchProbabilityInverter(M, src_shape, out_shape, k, torch.uint8, "cpu", use_triton=False)
    x0 = 0
    for n in chunks:
        inv.push(x0, torch.from_numpy(probs[:, x0:x0 + n]))
        x0 += n
    np.testing.assert_array_equal(inv.finish().numpy(), ref)
    assert inv.peak_buffer_bytes <= 4 * k * (max(chunks) + 3) * 9 * 8


def test_bad_inputs_raise():
    spec = _spec()
    pipe = TorchPipeline(spec, PointwisePredictor(4), "cpu")
    with pytest.raises(VolumeError, match="channel"):
        pipe.segment(Volume(np.zeros((2, 8, 8, 8), np.float32), np.eye(4)))
    bad = np.zeros((8, 8, 8), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        pipe.segment(Volume.from_array(bad))
    with pytest.raises(VolumeError, match="Volume"):
        pipe.segment(np.zeros((8, 8, 8), np.float32))


# ---- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("order,interp,blend,pad,shape,spacing,perm", CASES[:4])
def test_cuda_pipeline_matches_numpy_engine(order, interp, blend, pad, shape, spacing, perm):
    rng = np.random.default_rng(sum(shape))
    vol = Volume.from_array(_ct(rng, shape), affine=_affine(spacing, perm=perm))
    spec = _spec(k=5, order=order, interp=interp, blend=blend, pad=pad)
    net = ConvPredictor(5, seed=1)
    ref_labels, ref_probs, _ = numpy_engine(spec, vol, net.numpy)
    res = TorchPipeline(spec, net, "cuda").segment(vol, return_probabilities=True)
    np.testing.assert_allclose(res.metadata["probabilities"], ref_probs, rtol=0, atol=1e-4)
    assert (res.labels != ref_labels).mean() <= 0.005
    assert res.metadata["peak_gpu_memory_bytes"] > 0


@pytest.mark.gpu
def test_cuda_resampling_bit_identical_and_fp16_accumulators():
    rng = np.random.default_rng(11)
    vol = Volume.from_array(_ct(rng, (41, 37, 29)), affine=_affine((0.8, 0.9, 1.7)))
    spec = _spec(k=6, roi=(16, 16, 16))
    raw = torch.from_numpy(vol.array).cuda()
    _, rec = pp.preprocess(vol, spec.preprocessing)
    img, _, _ = gpp.orient(raw, vol.affine, "RAS")
    oriented, _, _ = pp.orient(vol.array, vol.affine, "RAS")
    got = gpp.resample_linear(img, rec.spacing.M, rec.spacing.out_shape).cpu().numpy()
    np.testing.assert_array_equal(got, pp.apply_spacing(oriented, rec.spacing))
    net = ConvPredictor(6, seed=2, half=True)
    r32 = TorchPipeline(spec, net, "cuda").segment(vol)
    r16 = TorchPipeline(spec, net, "cuda", accum_dtype=torch.float16).segment(vol)
    assert (r16.labels == r32.labels).mean() > 0.99


def test_rotated_affine_matches_numpy_engine():
    """A rotated (non-sheared) affine: θ has ~1e-17 off-diagonal terms; near-tie planes and near-zero voxels
    take the exact per-voxel path, as in the reference."""
    rng = np.random.default_rng(12)
    c, s_ = np.cos(0.3), np.sin(0.3)
    A = np.eye(4)
    A[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]) @ np.diag([0.75, 1.0, 2.0])
    vol = Volume.from_array(_ct(rng, (24, 18, 9)), affine=A)
    spec = _spec(k=5, pixdim=(1.5, 2.0, 2.0))
    net = ConvPredictor(5, seed=4)
    ref_labels, ref_probs, rec = numpy_engine(spec, vol, net.numpy)
    res = TorchPipeline(spec, net, "cpu").segment(vol, return_probabilities=True)
    np.testing.assert_allclose(res.metadata["probabilities"], ref_probs, rtol=0, atol=1e-5)
    assert (res.labels != ref_labels).mean() <= 0.002


def test_batch_size_does_not_change_the_stitched_result():
    """The GPU path runs more windows per call than sw_batch_size; the stitched output must be identical."""
    from segrt.engine.gpu.stitch import TorchStitcher
    from segrt.spec import InferenceSpec

    rng = np.random.default_rng(3)
    img = torch.from_numpy(rng.normal(size=(1, 37, 29, 23)).astype(np.float32))
    spec = InferenceSpec(roi_size=(16, 12, 10), sw_batch_size=1, overlap=(0.5, 0.25, 0.4), blend_mode="gaussian",
                         padding_mode="replicate")
    calls = []

    def infer(x):
        calls.append(x.shape[0])
        return torch.cat([2 * x + 1, x * x, -x], dim=1)

    def run(bs):
        out = torch.zeros((3, 37, 29, 23))
        for x0, slab in TorchStitcher(img, spec, infer, 3, batch_size=bs):
            out[:, x0:x0 + slab.shape[1]] = slab
        return out

    a = run(None)
    n1 = len(calls)
    b = run(5)
    assert max(calls[:n1]) == 1 and max(calls[n1:]) == 5
    assert torch.equal(a, b)


# ---- skipping empty windows (the artifact's skip rule) --------------------------------------------
def _air_ct(rng, shape):
    """CT with a body in one corner: many windows see only air (-1000 HU)."""
    x = np.full(shape, -1000.0, np.float32)
    body = tuple(slice(0, max(3, n * 2 // 5)) for n in shape)
    x[body] = np.round(rng.normal(40.0, 200.0, size=x[body].shape))
    return x


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("bs", [None, 3])
def test_stitcher_skip_is_the_numpy_stitchers_bit_for_bit(half, bs):
    from segrt.engine.gpu.stitch import TorchStitcher
    from segrt.engine.tiling import plan_windows
    from segrt.spec import InferenceSpec

    rng = np.random.default_rng(11)
    img = rng.normal(size=(1, 37, 29, 23)).astype(np.float32)
    spec = InferenceSpec(roi_size=(16, 12, 10), sw_batch_size=2, overlap=(0.5, 0.25, 0.4), blend_mode="gaussian",
                         padding_mode="replicate")
    net = ConvPredictor(4, seed=3, half=half)
    n_win = plan_windows(img.shape[1:], spec).n_windows
    skip = rng.random(n_win) < 0.4
    skip[0] = skip[-1] = True  # first and last windows skipped too
    assert 0 < skip.sum() < n_win
    ref = np.empty((4, *img.shape[1:]), np.float32)
    for x0, slab in sliding_window_stream(img, spec, net.numpy, 4, skip=skip, background_class=2, skip_margin=7.0):
        ref[:, x0:x0 + slab.shape[1]] = slab
    calls = []

    def infer(x):
        calls.append(x.shape[0])
        return net(x)

    got = torch.zeros((4, *img.shape[1:]))
    for x0, slab in TorchStitcher(torch.from_numpy(img), spec, infer, 4, batch_size=bs, skip=skip,
                                  background_class=2, skip_margin=7.0):
        got[:, x0:x0 + slab.shape[1]] = slab
    np.testing.assert_array_equal(got.numpy(), ref)
    assert sum(calls) == int((~skip).sum())  # skipped windows never reach the network
    with pytest.raises(InferenceError, match="one flag per window"):
        TorchStitcher(torch.from_numpy(img), spec, infer, 4, skip=skip[:-1])


def test_pipeline_skip_rule_matches_numpy_engine():
    """TorchPipeline(skip_empty=True) decides the same windows as the NumPy engine (window maxima of the resampled
    input before the intensity ops) and stitches them the same way."""
    import dataclasses

    from segrt.engine.cells import window_maxima
    from segrt.engine.tiling import plan_windows
    from segrt.spec import SkipRule

    rng = np.random.default_rng(12)
    vol = Volume.from_array(_air_ct(rng, (41, 35, 19)), affine=_affine((1.1, 0.9, 2.7)))
    base = _spec(k=4, softmax=False, overlap=(0.25, 0.25, 0.25), intensity=SPLEEN_INTENSITY)
    spec = dataclasses.replace(base, inference=dataclasses.replace(
        base.inference, skip_rule=SkipRule(threshold=-500.0, background_class=0, margin=10.0)))
    net = ConvPredictor(4, seed=5)
    raw = {}
    image, _ = pp.preprocess(vol, spec.preprocessing, raw_hook=lambda a: raw.setdefault("a", a.copy()))
    maxima = window_maxima(raw["a"], plan_windows(raw["a"].shape[1:], spec.inference))
    skip = maxima < -500.0
    assert 0 < skip.sum() < skip.size
    ref = np.empty((4, *image.shape[1:]), np.float32)
    for x0, slab in sliding_window_stream(image, spec.inference, net.numpy, 4, skip=skip):
        ref[:, x0:x0 + slab.shape[1]] = slab
    res = TorchPipeline(spec, net, "cpu", skip_empty=True).segment(vol, return_probabilities=True)
    assert res.metadata["windows_skipped"] == int(skip.sum()) and res.metadata["skip_rule"]["threshold"] == -500.0
    np.testing.assert_array_equal(res.metadata["probabilities"], ref)
    off = TorchPipeline(spec, net, "cpu").segment(vol)
    assert off.metadata["windows_skipped"] == 0 and off.metadata["skip_rule"] is None
