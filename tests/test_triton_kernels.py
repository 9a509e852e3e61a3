"""Triton kernels against the NumPy references of segrt/engine/resample.py, on fresh random inputs.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported); with a GPU the ``gpu``-marked tests run the compiled kernels. Skipped when triton is not installed.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from segrt.engine.gpu.invert import TorchProbabilityInverter  # noqa: E402
from segrt.engine.gpu.preprocess import axis_tables  # noqa: E402
from segrt.engine import resample as KR  # noqa: E402
from segrt.kernels import triton_resample_argmax as tk  # noqa: E402

torch.set_num_threads(1)

if tk.interpreted():
    DEVICES = ["cpu"]
elif torch.cuda.is_available():
    DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)]
else:
    DEVICES = []
pytestmark = pytest.mark.skipif(not DEVICES, reason="triton imported without its interpreter and no CUDA GPU")


def _near_tie(vals: np.ndarray) -> np.ndarray:
    """Voxels whose two largest float32 values are within 1 ulp (an FMA may flip them on a GPU)."""
    if vals.shape[0] < 2:  # one class: argmax is always 0, nothing can tie
        return np.zeros(vals.shape[1:], bool)
    s = np.sort(vals, axis=0)
    return np.abs(s[-1] - s[-2]) <= np.spacing(np.abs(s[-1]))


def _matrix(rng, src_shape, out_shape):
    M = np.eye(4)
    for d in range(3):
        M[d, d] = src_shape[d] / out_shape[d] * rng.uniform(0.8, 1.2)
        M[d, 3] = rng.uniform(-0.4, 0.4)
    return M


CASES = [  # K, source shape, output shape: odd sizes, single rows, more outputs than sources and fewer
    (1, (5, 7, 3), (9, 4, 6)),
    (2, (7, 9, 11), (13, 17, 6)),
    (5, (11, 6, 13), (5, 12, 21)),
    (7, (3, 1, 9), (8, 3, 7)),
]


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("k,src_shape,out_shape", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_resample_argmax_matches_reference(device, k, src_shape, out_shape, seed):
    rng = np.random.default_rng(seed * 100 + k)
    probs = rng.random((k, *src_shape)).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    M = _matrix(rng, src_shape, out_shape)
    ref = KR.invert_probabilities_argmax(probs, M, out_shape, np.uint8)
    tabs = axis_tables(M, out_shape, src_shape, device)
    out = torch.full(out_shape, 255, dtype=torch.uint8, device=device)
    tk.resample_argmax_rows(torch.from_numpy(probs).to(device), *tabs, out)
    got = out.cpu().numpy()
    if device == "cpu":  # interpreter: NumPy arithmetic, no FMA → bit-identical
        np.testing.assert_array_equal(got, ref)
    else:
        vals = KR.resample_linear(probs, M, out_shape, exact_zeros=False)
        ok = ~_near_tie(vals)
        np.testing.assert_array_equal(got[ok], ref[ok])


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
def test_ties_and_nan_follow_torch_argmax(device):
    """Equal values: the first class wins; a NaN counts as the maximum (torch / NumPy argmax)."""
    k, shape = 4, (3, 5, 4)
    probs = np.full((k, *shape), 0.25, np.float32)
    probs[3, 1] = 0.9
    probs[2, 2] = np.nan
    M = np.eye(4)
    tabs = axis_tables(M, shape, shape, device)
    out = torch.zeros(shape, dtype=torch.int16, device=device)
    tk.resample_argmax_rows(torch.from_numpy(probs).to(device), *tabs, out)
    got = out.cpu().numpy()
    np.testing.assert_array_equal(got, KR.invert_probabilities_argmax(probs, M, shape, np.int16))
    assert np.all(got[0] == 0) and np.all(got[2] == 2)


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
def test_strided_source_rows_and_output_view(device):
    """The kernel reads a row window of a larger buffer (what the streaming inverter hands it) and writes into a
    slice of the label map."""
    rng = np.random.default_rng(7)
    k, src_shape, out_shape = 3, (9, 6, 5), (12, 7, 8)
    probs = rng.random((k, *src_shape)).astype(np.float32)
    M = _matrix(rng, src_shape, out_shape)
    ref = KR.invert_probabilities_argmax(probs, M, out_shape, np.uint8)
    (xi0, xi1, xw0, xw1), yt, zt = axis_tables(M, out_shape, src_shape, device)
    big = torch.from_numpy(probs).to(device)
    labels = torch.zeros(out_shape, dtype=torch.uint8, device=device)
    a, b = 4, 9  # output rows 4..8 from the source rows they need
    lo = int(xi0[a:b].min())
    view = big[:, lo:]
    tk.resample_argmax_rows(view, (xi0[a:b] - lo, xi1[a:b] - lo, xw0[a:b], xw1[a:b]), yt, zt, labels[a:b])
    got = labels.cpu().numpy()
    if device == "cpu":
        np.testing.assert_array_equal(got[a:b], ref[a:b])
    assert np.all(got[:a] == 0) and np.all(got[b:] == 0)


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
def test_streaming_inverter_with_kernel(device):
    rng = np.random.default_rng(3)
    k, src_shape, out_shape = 5, (15, 8, 7), (22, 11, 9)
    probs = rng.random((k, *src_shape)).astype(np.float32)
    M = _matrix(rng, src_shape, out_shape)
    ref = KR.invert_probabilities_argmax(probs, M, out_shape, np.uint8)
    inv = TorchProbabilityInverter(M, src_shape, out_shape, k, torch.uint8, device, use_triton=True)
    assert inv.uses_triton
    x0 = 0
    for n in (4, 1, 6, 4):
        inv.push(x0, torch.from_numpy(probs[:, x0:x0 + n]).to(device))
        x0 += n
    got = inv.finish().cpu().numpy()
    if device == "cpu":
        np.testing.assert_array_equal(got, ref)
    else:
        ok = ~_near_tie(KR.resample_linear(probs, M, out_shape, exact_zeros=False))
        np.testing.assert_array_equal(got[ok], ref[ok])


def test_bad_arguments_raise():
    tabs = axis_tables(np.eye(4), (2, 2, 2), (2, 2, 2), "cpu")
    with pytest.raises(TypeError, match="float32"):
        tk.resample_argmax_rows(torch.zeros((2, 2, 2, 2), dtype=torch.float64), *tabs,
                                torch.zeros((2, 2, 2), dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        tk.resample_argmax_rows(torch.zeros((2, 2, 2, 2)), *tabs, torch.zeros((2, 3, 2), dtype=torch.uint8))
