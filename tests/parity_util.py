"""Shared helpers for parity tests: run MONAI's own bundle pipeline (benchmarks/monai_pipeline.py, the harness
the benchmarks time) next to segrt on the same weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # the benchmarks package (pytest's pythonpath has it; a script may not)
    sys.path.insert(0, str(_REPO))
from benchmarks import monai_pipeline as _harness  # noqa: E402  # the one MONAI reference harness
from benchmarks.monai_pipeline import bundle_on_path, checkpoint_path  # noqa: E402,F401  # re-exported

SHARED = _REPO.parent / "shared"
BUNDLES = SHARED / "bundles"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def bundle_with_weights(src: Path, dst: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Copy a bundle's configs (and its own ``scripts/``) to ``dst`` with seeded random weights where it loads them.

    The benchmarks' copy (:func:`benchmarks.monai_pipeline.bundle_with_weights`); returns ``dst``.
    """
    _harness.bundle_with_weights(src, dst, seed=seed, overrides=overrides)
    return dst


def write_volume(path: Path, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    """``array`` as a NIfTI file (stored as ``dtype``; None: as the array's dtype) with the affine in both forms."""
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def lps_affine(spacing, origin=(12.5, -30.25, 7.0)) -> np.ndarray:
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def ct_like(shape, seed=0) -> np.ndarray:
    """Random CT-like intensities: air outside an ellipsoid body, tissue with structures and noise."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (g[0] ** 2 / 0.8 + g[1] ** 2 / 0.6) < 1.0
    x = np.full(shape, -1000.0, np.float32)
    x[body] = 40.0
    blob = ((g[0] - 0.2) ** 2 + (g[1] + 0.1) ** 2 + g[2] ** 2) < 0.15
    x[blob & body] = 140.0
    bone = ((g[0] + 0.3) ** 2 + (g[1] - 0.2) ** 2) < 0.02
    x[bone & body] = 700.0
    x += rng.normal(0, 25, shape).astype(np.float32)
    return np.round(x).astype(np.float32)


def oblique_affine(spacing, angles_deg=(12.0, -7.0, 20.0), origin=(-90.5, 126.25, -72.0)) -> np.ndarray:
    """A rotated (about all three axes), flipped, anisotropic affine: no axis-aligned shortcut applies."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rz @ ry @ rx @ np.diag([-spacing[0], spacing[1], spacing[2]])
    a[:3, 3] = origin
    return a


def mri_like(shape, seed=0) -> np.ndarray:
    """Random T1-like intensities: exact-zero background (skull-stripped), a head of grey/white matter and CSF."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = g[0] ** 2 / 0.85 + g[1] ** 2 / 0.7 + g[2] ** 2 / 0.9
    x = np.zeros(shape, np.float32)
    head = r2 < 1.0
    x[head] = 300.0 + 120.0 * np.cos(6 * g[0] + 2 * g[1])[head]  # cortical folding-like variation
    x[(r2 < 0.45) & head] = 520.0  # white matter
    ventricles = (g[0] ** 2 + (g[1] - 0.1) ** 2 / 0.3 + g[2] ** 2 / 2) < 0.03
    x[ventricles] = 90.0
    x[head] += rng.normal(0, 30, int(head.sum())).astype(np.float32)
    return np.clip(x, 0, None).astype(np.float32)


def run_monai_bundle(bundle: Path, image_path: Path, out_dir: Path, overrides: dict | None = None):
    """Run the bundle's own preprocessing, inferer and postprocessing (as its SupervisedEvaluator does), on the CPU.

    The benchmarks' reference pipeline (:func:`benchmarks.monai_pipeline.run_pipeline`) with its intermediates.
    Returns dict with ``probs`` (softmax of stitched logits on the preprocessed grid, (K, ...)),
    ``labels`` (final labels on the input grid, from the bundle's postprocessing incl. Invertd and SaveImaged),
    ``inv_probs`` (probabilities taken through the bundle's Invertd, for near-tie margins on the input grid),
    ``preprocessed`` (the image after the bundle's preprocessing).
    """
    res = _harness.run_pipeline(bundle, image_path, out_dir, overrides, device="cpu", intermediates=True)
    return {k: res[k] for k in ("probs", "labels", "inv_probs", "preprocessed")}


def top2_margin(probs: np.ndarray) -> np.ndarray:
    s = np.sort(probs, axis=0)
    return s[-1] - s[-2]


# ---- how torch rounds the float64 products MONAI's geometry goes through, on this machine ---------------------
# segrt replicates torch's float64 arithmetic for MONAI's resampling (segrt/engine/resample.py): every small
# product summed over k in order, each product and sum rounded (no FMA). That is what torch computes where its
# float64 matmul runs a reproducible kernel (torch's own small-bmm loop on x86-64; MKL in its SSE2/CBWR
# "COMPATIBLE" code path), but not everywhere: on an Intel AVX2/AVX-512 CPU MKL's dgemm (2-D ``@`` of 4x4
# matrices, and the bmm inside ``affine_grid`` once a grid has more than a few dozen points) uses FMA, which
# rounds a product and a sum once instead of twice; aarch64 builds (OpenBLAS, compilers contracting a*b+c) can
# do the same. Bit-for-bit assertions against those torch ops hold only where this probe says "sequential";
# elsewhere the tests assert the error bound of the ulp analysis instead (any summation order of n products,
# with or without FMA, is within gamma_n * sum|a_k b_k| of the exact value, so two of them differ by at most
# twice that). The probe is independent of segrt: it compares torch with a NumPy model of the sequential sum.
EPS64 = float(np.finfo(np.float64).eps)  # 2u, u = 2**-53 the unit roundoff


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), the relative error bound of an n-term float64 dot product."""
    u = EPS64 / 2
    return n * u / (1 - n * u)


def sequential_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` (batched over leading axes) summed over k in order, every product and sum rounded (no FMA)."""
    C = A[..., :, 0:1] * B[..., 0:1, :]
    for k in range(1, A.shape[-1]):
        C = C + A[..., :, k:k + 1] * B[..., k:k + 1, :]
    return C


def matmul_bound(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Elementwise bound on |one float64 evaluation of A @ B - another| (any order, FMA or not)."""
    return 2 * gamma(A.shape[-1]) * (np.abs(A) @ np.abs(B)) + np.finfo(np.float64).tiny


_TORCH_ARITH: dict | None = None


def torch_arithmetic() -> dict:
    """Whether torch's float64 ops used by MONAI's geometry round like :func:`sequential_matmul` here (cached).

    ``mm``: a 2-D 4x4 ``@`` (MONAI's affine updates: Orientationd, Spacingd's output affine); ``bmm_small``: a
    (1, 4, 4) batched ``@`` (``to_norm_affine``'s θ); ``affine_grid``: the source coordinates of a general
    (rotated) θ; ``affine_grid_diagonal``: those of a diagonal θ (axis-aligned resampling); ``linspace``:
    ``"fma"`` when torch's float64 linspace rounds ``step·i - 1`` once (its vectorised AVX2/AVX-512/NEON
    kernels; what segrt replicates), ``"plain"`` when it rounds the product and the sum (baseline x86-64
    kernels), ``"other"`` when neither (which no test can accept).
    """
    global _TORCH_ARITH
    if _TORCH_ARITH is not None:
        return _TORCH_ARITH
    import torch
    from fractions import Fraction

    rng = np.random.default_rng(20260)
    A, B = rng.normal(size=(2, 64, 4, 4))
    t = torch.from_numpy
    res = {
        "mm": all(np.array_equal((t(a) @ t(b)).numpy(), sequential_matmul(a, b)) for a, b in zip(A, B)),
        "bmm_small": bool(np.array_equal((t(A[:1]) @ t(B[:1])).numpy(), sequential_matmul(A[:1], B[:1]))
                          and all(np.array_equal((t(a[None]) @ t(b[None])).numpy()[0], sequential_matmul(a, b))
                                  for a, b in zip(A, B))),
    }
    size = [1, 1, 9, 10, 11]  # 990 points: affine_grid's bmm takes the BLAS path, as for any real grid
    ident = torch.zeros(1, 3, 4, dtype=torch.float64)
    ident[0, :, :3] = torch.eye(3, dtype=torch.float64)
    base = torch.nn.functional.affine_grid(ident, size, align_corners=False)[0].numpy()  # exact: 1·g + 0
    G = np.concatenate([base.reshape(-1, 3), np.ones((base.shape[0] * base.shape[1] * base.shape[2], 1))], 1)
    general = rng.normal(size=(3, 4))
    diagonal = np.zeros((3, 4))
    diagonal[[0, 1, 2], [0, 1, 2]] = rng.uniform(0.3, 3.0, 3)
    diagonal[:, 3] = rng.normal(size=3)
    for key, th in (("affine_grid", general), ("affine_grid_diagonal", diagonal)):
        grid = torch.nn.functional.affine_grid(t(th)[None], size, align_corners=False)[0].numpy()
        res[key] = bool(np.array_equal(grid.reshape(-1, 3), sequential_matmul(G, th.T)))

    def lin_model(n, fma):
        step = 2.0 / (n - 1)
        out = []
        for i in range(n):
            if fma:  # exact product and sum, one rounding
                v = float(Fraction(step) * i - 1) if i < n // 2 else float(1 - Fraction(step) * (n - 1 - i))
            else:
                v = step * i - 1.0 if i < n // 2 else 1.0 - step * (n - 1 - i)
            out.append(v)
        return np.array(out)

    sizes = (3, 7, 10, 49, 97, 300, 1001)  # the two roundings differ on ~40% of the points for n > 3
    lins = [torch.linspace(-1, 1, n, dtype=torch.float64).numpy() for n in sizes]
    res["linspace"] = ("fma" if all(np.array_equal(g, lin_model(n, True)) for g, n in zip(lins, sizes))
                       else "plain" if all(np.array_equal(g, lin_model(n, False)) for g, n in zip(lins, sizes))
                       else "other")
    if os.environ.get("SEGRT_TEST_EXPECT_SEQUENTIAL_TORCH") == "1":  # set by the strict re-run (test_resample)
        assert all(res[k] for k in ("mm", "bmm_small", "affine_grid", "affine_grid_diagonal")), res
    _TORCH_ARITH = res
    return res


def affine_grid_replicated(theta_diagonal: bool) -> bool:
    """True where segrt's coordinates must equal torch's affine_grid bit for bit on this machine: its linspace
    rounds like the FMA kernels segrt follows and its bmm sums like the sequential replica (for this θ kind)."""
    arith = torch_arithmetic()
    return arith["linspace"] == "fma" and arith["affine_grid_diagonal" if theta_diagonal else "affine_grid"]


def coordinate_bound(theta: np.ndarray, out_shape, src_shape) -> np.ndarray:
    """Per MONAI axis d, a bound on |two float64 evaluations of the clamped source coordinate| (voxels).

    affine_grid: ``c_d = sum_k g_k θ[d,k] + θ[d,3]`` (4 terms, |g_k| < 1): two evaluations differ by at most
    ``2 gamma_4 S_d``, ``S_d = sum_k |θ[d,k]| + |θ[d,3]|``, plus ``2u S_d`` where the base coordinates ``g_k``
    themselves differ by their last bit (a linspace rounded once or twice); grid_sample's ``((c + 1) n - 1) / 2``
    scales that by ``n/2`` and adds at most 3 roundings of a value below ``n (|c| + 1)`` on each side; clamping is
    1-Lipschitz. ``theta`` is MONAI's (not axis-reversed) normalised 4x4 θ.
    """
    theta = np.asarray(theta, dtype=np.float64)
    u = EPS64 / 2
    out = []
    for d in range(3):
        S = float(np.abs(theta[d, :4]).sum())
        n = float(src_shape[d])
        out.append(n / 2 * (2 * gamma(4) + 2 * u) * S + 2 * 3 * u * n * (S + 1) + 1e-300)
    return np.array(out)


def traced_peak(blocks, visit=None) -> tuple[int, int]:
    """``(sum of visit(origin, block), peak bytes NumPy allocated)`` while iterating ``blocks`` (a stitcher's
    ``(origin, block)`` generator, created but not started), measured with tracemalloc. ``visit`` defaults to the
    voxels of each block."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        n = 0
        for origin, block in blocks:
            n += block[0].size if visit is None else visit(origin, block)
            del block
        return n, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
