"""Reference resampling kernels against MONAI 1.6.1 (Spacingd forward, Invertd nearest / bilinear)."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest

from segrt.engine.preprocess import orient, plan_spacing, preprocess
from segrt.kernels import reference as K
from segrt.spec import Preprocessing, SpacingSpec
from segrt.volume import Volume

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
torch.set_num_threads(1)

from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose, Invertd, Orientationd, Spacingd  # noqa: E402


def _rot(deg):
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", deg, degrees=True).as_matrix()


def _affine(kind):
    if kind == "ras":
        return np.diag([0.8, 0.8, 2.5, 1.0])
    if kind == "lps":
        a = np.diag([-0.7, -0.7, 3.0, 1.0])
        a[:3, 3] = [10, -20, 5]
        return a
    if kind == "permuted":
        return np.array([[0, 0, 2.0, 1], [-1.0, 0, 0, 2], [0, 1.2, 0, 3], [0, 0, 0, 1]])
    if kind == "rotated":
        a = np.eye(4)
        a[:3, :3] = _rot([20, -10, 35]) @ np.diag([0.9, 1.1, 2.2])
        a[:3, 3] = [3, 4, 5]
        return a
    if kind == "sheared":
        a = np.eye(4)
        a[:3, :3] = [[1, 0.2, 0], [0, 1, 0.1], [0, 0, 2]]
        return a
    raise ValueError(kind)


def _monai_pre(pixdim):
    return Compose([Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=pixdim, mode="bilinear")])


def _mt(x, affine):
    return MetaTensor(torch.from_numpy(np.array(x, copy=True)), affine=torch.as_tensor(affine))


CASES = [
    ("ras", (20, 17, 9), (1.5, 1.5, 2.0)),
    ("lps", (21, 18, 11), (1.5, 1.5, 2.0)),
    ("permuted", (13, 16, 10), (1.5, 1.5, 1.5)),
    ("rotated", (17, 19, 13), (1.5, 1.5, 1.5)),
    ("sheared", (15, 14, 12), (1.5, 1.5, 1.5)),
    ("ras", (9, 11, 7), (0.5, 0.6, 1.0)),  # upsampling
]


@pytest.mark.parametrize("kind,shape,pixdim", CASES)
def test_forward_bilinear_matches_spacingd(kind, shape, pixdim):
    rng = np.random.default_rng(zlib.crc32(repr((kind, shape)).encode()))
    x = rng.normal(size=(2, *shape)).astype(np.float32) * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_t = _monai_pre(pixdim)({"image": _mt(x, _affine(kind))})["image"]
    ref = ref_t.numpy()
    a, aff, _ = orient(x, _affine(kind), "RAS")
    plan = plan_spacing(aff, a.shape[1:], pixdim)
    assert not plan.noop
    assert K.is_diagonal(plan.M) == (kind != "sheared")
    out = K.resample_linear(a, plan.M, plan.out_shape)
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(plan.out_affine, ref_t.affine.numpy(), rtol=0, atol=1e-12)
    diff = np.abs(out.astype(np.float64) - ref)
    rel = diff / np.maximum(np.abs(ref), 1.0)
    exact = np.mean(out == ref)
    print(f"[forward {kind} {shape}->{out.shape[1:]}] max|d|={diff.max():.3g} max rel={rel.max():.3g} "
          f"bit-exact={100 * exact:.2f}%")
    assert rel.max() <= 1e-5
    assert exact >= 0.95


def test_forward_bilinear_integer_ct_is_nearly_bit_exact():
    rng = np.random.default_rng(3)
    x = rng.integers(-1024, 2000, size=(1, 40, 37, 23)).astype(np.float32)
    aff = np.diag([0.77, 0.77, 2.5, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _monai_pre((1.5, 1.5, 1.5))({"image": _mt(x, aff)})["image"].numpy()
    a, aff2, _ = orient(x, aff, "RAS")
    plan = plan_spacing(aff2, a.shape[1:], (1.5, 1.5, 1.5))
    out = K.resample_linear(a, plan.M, plan.out_shape)
    exact = np.mean(out == ref)
    print(f"[forward integer CT] bit-exact={100 * exact:.3f}% max|d|={np.abs(out - ref).max():.3g}")
    # differences only where the value cancels to ~0 (float64 noise below 1e-6 HU)
    assert exact >= 0.999
    assert np.abs(out - ref).max() <= 1e-6


def test_general_path_equals_separable_path():
    """The 8-corner path on an (almost) diagonal M equals the separable path to float64 noise."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 11, 9, 7)).astype(np.float32)
    M = np.diag([0.7, 1.3, 0.55, 1.0])
    M[:3, 3] = [0.2137, -0.3071, 0.1193]  # no .5 ties for nearest
    sep = K.resample_linear(x, M, (15, 8, 13))
    M2 = M.copy()
    M2[0, 1] = 1e-9  # not diagonal any more: general path
    assert not K.is_diagonal(M2)
    gen = K.resample_linear(x, M2, (15, 8, 13))
    np.testing.assert_allclose(gen, sep, rtol=0, atol=1e-6)
    near_s = K.resample_nearest(x, M, (15, 8, 13))
    near_g = K.resample_nearest(x, M2, (15, 8, 13))
    assert np.array_equal(near_s, near_g)


def _tie_mask(M, out_shape):
    """True where any axis' source coordinate is an exact .5 (noise-decided in MONAI)."""
    masks = []
    for d in range(3):
        p = M[d, d] * np.arange(out_shape[d]) + M[d, 3]
        masks.append(np.abs(p - np.floor(p) - 0.5) < 1e-6)
    return masks[0][:, None, None] | masks[1][None, :, None] | masks[2][None, None, :]


@pytest.mark.parametrize("kind,shape,pixdim", [
    ("ras", (20, 17, 9), (1.5, 1.5, 2.0)),
    ("lps", (21, 18, 11), (1.5, 1.5, 2.0)),
    ("permuted", (13, 16, 10), (1.5, 1.5, 1.5)),
    ("ras", (30, 25, 12), (1.6, 1.6, 3.0)),
])
def test_nearest_inverse_matches_invertd(kind, shape, pixdim):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, *shape)).astype(np.float32)
    aff = _affine(kind)
    pre = _monai_pre(pixdim)
    vol = Volume(x, aff)
    _, rec = preprocess(vol, Preprocessing("RAS", SpacingSpec(pixdim)))
    labels = rng.integers(0, 7, size=rec.output_shape).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = pre({"image": _mt(x, aff)})
        assert tuple(d["image"].shape[1:]) == rec.output_shape
        d["pred"] = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)))
        ref = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(d)["pred"]
    ref_lab = ref.numpy()[0]
    ours = rec.invert_labels(labels)
    assert ours.shape == ref_lab.shape == shape
    np.testing.assert_allclose(ref.affine.numpy(), aff, atol=1e-12)
    ties = rec.unorient(_tie_mask(rec.spacing.M_inv, rec.oriented_shape))
    agree = ours == ref_lab
    print(f"[nearest inverse {kind}] agree={100 * agree.mean():.2f}% ties={100 * ties.mean():.2f}% "
          f"agree off ties={100 * agree[~ties].mean():.2f}%")
    assert np.all(agree[~ties])


def _softmax(z):
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind,shape,pixdim", [
    ("ras", (20, 17, 9), (1.5, 1.5, 2.0)),
    ("lps", (23, 18, 11), (1.5, 1.5, 2.0)),
    ("permuted", (13, 16, 10), (1.5, 1.5, 1.5)),
])
def test_bilinear_inverse_then_argmax_matches_invertd(kind, shape, pixdim):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, *shape)).astype(np.float32)
    aff = _affine(kind)
    pre = _monai_pre(pixdim)
    _, rec = preprocess(Volume(x, aff), Preprocessing("RAS", SpacingSpec(pixdim)))
    C = 3
    probs = _softmax(rng.normal(size=(C, *rec.output_shape)).astype(np.float32) * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = pre({"image": _mt(x, aff)})
        d["pred"] = MetaTensor(torch.from_numpy(probs.copy()))
        ref = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    ref_p = ref.numpy()
    ref_lab = np.argmax(ref_p, axis=0)
    # probabilities themselves
    sp = rec.spacing
    ours_p = np.stack([rec.unorient(c) for c in K.resample_linear(probs, sp.M_inv, rec.oriented_shape)])
    dp = np.abs(ours_p - ref_p)
    # streaming inverter
    inv = rec.probability_inverter(C)
    x0 = 0
    while x0 < rec.output_shape[0]:
        n = int(rng.integers(1, 6))
        inv.push(x0, probs[:, x0:x0 + n])
        x0 += min(n, rec.output_shape[0] - x0)
    ours_lab = rec.unorient(inv.finish())
    print(f"[bilinear inverse {kind}] probs max|d|={dp.max():.3g} bit-exact={100 * np.mean(dp == 0):.2f}% "
          f"labels agree={100 * np.mean(ours_lab == ref_lab):.3f}%")
    assert dp.max() <= 1e-6
    assert np.array_equal(ours_lab, ref_lab)


@pytest.mark.parametrize("seed", range(6))
def test_streaming_inverter_equals_reference(seed):
    rng = np.random.default_rng(100 + seed)
    src = tuple(int(s) for s in rng.integers(3, 14, size=3))
    out = tuple(int(s) for s in rng.integers(3, 20, size=3))
    C = int(rng.integers(2, 5))
    M = np.eye(4)
    for d in range(3):
        M[d, d] = (src[d] - 1) / max(out[d] - 1, 1) * rng.uniform(0.7, 1.3)
        M[d, 3] = rng.uniform(-0.5, 0.5)
    if seed == 5:  # sheared: fallback path
        M[0, 1] = 0.05
    probs = _softmax(rng.normal(size=(C, *src)).astype(np.float32))
    if seed == 0:  # exact ties between classes: first max must win in both
        probs[1] = probs[0]
    ref = K.invert_probabilities_argmax(probs, M, out)
    inv = K.ProbabilityInverter(M, src, out, C)
    x0, emitted = 0, 0
    while x0 < src[0]:
        n = int(rng.integers(1, 4))
        r = inv.push(x0, probs[:, x0:x0 + n])
        if r is not None:
            assert r[0] == emitted
            emitted += r[1].shape[0]
        x0 = min(x0 + n, src[0])
        if inv._buf is not None:  # bounded buffer: never more than the last slab + rows in flight
            assert inv._buf.shape[1] <= n + 2 + int(np.ceil(abs(M[0, 0])))
    lab = inv.finish()
    assert np.array_equal(lab, ref)
    assert lab.dtype == np.uint8


def test_inverter_rejects_out_of_order_slabs():
    from segrt.errors import SpecError

    inv = K.ProbabilityInverter(np.diag([0.5, 0.5, 0.5, 1.0]), (4, 4, 4), (7, 7, 7), 2)
    with pytest.raises(SpecError, match="expected start row 0"):
        inv.push(1, np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(SpecError, match=r"\(2, rows, 4, 4\)"):
        inv.push(0, np.zeros((3, 1, 4, 4), np.float32))
    inv.push(0, np.zeros((2, 2, 4, 4), np.float32))
    with pytest.raises(SpecError, match="finish"):
        inv.finish()


def test_nearest_rounds_half_to_even():
    lab = np.arange(8, dtype=np.uint8).reshape(8, 1, 1)
    M = np.diag([0.5, 1.0, 1.0, 1.0])  # p = o/2: ties at odd o
    out = K.resample_nearest_labels(lab, M, (15, 1, 1))[:, 0, 0]
    assert out.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7]
