"""Stitching with another axis slowest (segrt.engine.axes): same windows and values as MONAI's order up to the order
of float32 additions; the memory planner takes it (float16 cells) only where it is the smallest plan."""

from __future__ import annotations

import numpy as np
import pytest

from segrt.engine.axes import candidate_axes, permute_skip, stitch_permuted
from segrt.engine.budget import plan_memory
from segrt.engine.cells import CellGrid
from segrt.engine.stitch import sliding_window_full
from segrt.engine.stitch_memory import stitch_buffers
from segrt.engine.tiling import plan_windows
from segrt.errors import BudgetError, SpecError
from segrt.spec import InferenceSpec


class Conv:
    """A fixed random 3x3x3 'network' per class (zero padding): not symmetric under any axis permutation."""

    def __init__(self, k, seed=0):
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((k, 3, 3, 3)).astype(np.float32)
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.shape)
        xp = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1), (1, 1)))
        out = np.zeros((x.shape[0], len(self.w), *x.shape[2:]), np.float32)
        for k in range(len(self.w)):
            for i in range(3):
                for j in range(3):
                    for m in range(3):
                        out[:, k] += self.w[k, i, j, m] * xp[:, i:i + x.shape[2], j:j + x.shape[3],
                                                             m:m + x.shape[4]]
        return out


def _assemble(blocks, k, shape):
    out = np.full((k, *shape), np.nan, np.float32)
    for (x0, y0, z0), b in blocks:
        box = out[:, x0:x0 + b.shape[1], y0:y0 + b.shape[2], z0:z0 + b.shape[3]]
        assert np.isnan(box).all(), "a voxel was handed out twice"
        box[...] = b
    assert not np.isnan(out).any(), "a voxel was never handed out"
    return out


SPEC = InferenceSpec(roi_size=(12, 10, 8), overlap=(0.25, 0.5, 0.4), blend_mode="gaussian",
                     sigma_scale=(0.125, 0.2, 0.3), padding_mode="replicate")


@pytest.mark.parametrize("axes", candidate_axes())
@pytest.mark.parametrize("with_skip", [False, True])
def test_every_axis_order_gives_monais_values_up_to_addition_order(axes, with_skip):
    shape, k = (30, 23, 41), 3
    img = np.random.default_rng(7).standard_normal((1, *shape)).astype(np.float32)
    grid = CellGrid(plan_windows(shape, SPEC))
    skip = None
    if with_skip:
        skip = np.random.default_rng(1).random(grid.plan.n_windows) < 0.3
    ref = sliding_window_full(img, SPEC, Conv(k), k, order="monai", skip=skip)
    net = Conv(k)
    got = _assemble(stitch_permuted(img, SPEC, net, k, axes, skip=skip, counts=grid.counts, inplace_weighting=True,
                                    accum_dtype="float32"), k, shape)
    assert all(s[2:] == SPEC.roi_size for s in net.calls)  # the network always sees its own axis order
    if axes == (0, 1, 2):
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
        assert np.mean(got.argmax(0) == ref.argmax(0)) > 0.999


def test_permute_skip_follows_the_windows():
    shape = (30, 23, 41)
    counts = CellGrid(plan_windows(shape, SPEC)).counts
    flags = np.arange(int(np.prod(counts))) % 5 == 0
    p = permute_skip(flags, counts, (2, 0, 1)).reshape(counts[2], counts[0], counts[1])
    for i0, i1, i2 in np.ndindex(*counts):
        assert p[i2, i0, i1] == flags[(i0 * counts[1] + i1) * counts[2] + i2]
    with pytest.raises(SpecError, match="permutation"):
        permute_skip(flags, counts, (0, 0, 1))


def test_permuted_peak_within_the_formula_of_the_transposed_volume():
    shape, roi, k = (40, 44, 110), (24, 24, 24), 6
    spec = InferenceSpec(roi_size=roi, overlap=(0.25,) * 3, blend_mode="gaussian")
    img = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    out = np.zeros((1, k, *roi), np.float32)

    def pred(x):  # a reused output buffer (not weighted in place): the stitcher's own weighted batch counts
        for c in range(k):
            np.multiply(x[:, 0], np.float32(c + 1), out=out[:len(x), c])
        return out[:len(x)]

    axes = (2, 0, 1)
    t_shape = tuple(shape[a] for a in axes)
    predicted = sum(stitch_buffers(t_shape, spec, k, accum_dtype="float16").values())
    own = sum(stitch_buffers(shape, spec, k, accum_dtype="float16").values())
    assert predicted < own
    from parity_util import traced_peak

    n, peak = traced_peak(stitch_permuted(img, spec, pred, k, axes, accum_dtype="float16"))
    assert n == int(np.prod(shape))
    # the gathered window in the network's order is one window more than the formula's input batch
    assert peak <= predicted + 4 * int(np.prod(roi)), (peak, predicted)


def test_planner_takes_the_long_axis_only_when_nothing_else_fits():
    spec = InferenceSpec(roi_size=(96,) * 3, overlap=(0.25,) * 3, blend_mode="gaussian")
    shape = (287, 287, 397)
    common = dict(input_bytes=2 * 512 * 512 * 397, label_bytes=1, workspace=800 << 20, skip=True, slabs=False,
                  inplace_weighting=True)
    plain = plan_memory(spec, 105, 1, (512, 512, 397), shape, None, accum_dtype="float16", threads=False,
                        **common)
    assert plain.stream_axes is None
    best = plan_memory(spec, 105, 1, (512, 512, 397), shape, plain.peak - 1, **common)
    assert best.stream_axes is not None and best.stream_axes[0] == 2 and best.accum_dtype == "float16"
    assert best.peak <= plain.peak - 150 * 2 ** 20 and best.sw_batch_size == 1 and not best.threads
    assert best.to_dict()["stream_axes"] == list(best.stream_axes)
    with pytest.raises(BudgetError, match="axis 2 slowest"):
        plan_memory(spec, 105, 1, (512, 512, 397), shape, best.peak - 1, **common)
    # a float32 accumulator is never reordered; nor are slabs for the probability inverter
    with pytest.raises(BudgetError):
        plan_memory(spec, 105, 1, (512, 512, 397), shape, plain.peak - 1, accum_dtype="float32", **common)
    with pytest.raises(BudgetError):
        plan_memory(spec, 105, 1, (512, 512, 397), shape, plain.peak - 1, **{**common, "slabs": True})


def test_the_engine_runs_a_long_axis_plan_with_a_trained_model(demo_default_artifact, tmp_path):
    """The orchestrator on a plan with the long axis slowest (what the planner picks under a tight budget, see
    above): the trained demo model's labels agree with the unbudgeted float32 run (Dice >= 0.98 per class)."""
    import dataclasses

    import segrt
    from parity_util import write_volume
    from segrt.engine import orchestrator
    from segrt.phantom import make_phantom

    # the body off-centre along x, so that some windows hold air only (skipped: the flags follow the windows)
    image, _, affine, _ = make_phantom(shape=(200, 100, 240), spacing=(2.0, 2.0, 1.5), axcodes="LPS", seed=4,
                                       center=(150.0, 0.0, 0.0))
    path = write_volume(tmp_path / "long.nii.gz", np.round(image).astype(np.int16), affine, dtype=None)
    with segrt.Engine.load(demo_default_artifact, device="cpu", variant="fp32") as eng:
        ref = eng.segment(path)
        vol = segrt.read_nifti(path)
        plan = eng.plan(path)
        axes = (2, 0, 1)
        plan = dataclasses.replace(plan, memory=dataclasses.replace(plan.memory, stream_axes=axes,
                                                                    accum_dtype="float16", threads=False))
        ops = orchestrator.NumpyOps(eng.spec, inplace_weighting=eng.capabilities.fresh_outputs)
        calls = []

        def infer(batch):
            calls.append(batch.shape)
            return eng.backend.infer(batch)

        res = orchestrator.run(plan, vol, ops, infer, softmax=eng.spec.postprocessing.softmax)
    assert all(c[2:] == tuple(eng.spec.inference.roi_size) for c in calls)
    assert res.n_skipped == ref.metadata["windows_skipped"] > 0
    present = [c for c in range(1, eng.spec.num_classes) if (ref.labels == c).any()]
    assert len(present) >= 3
    for c in present:
        x, y = ref.labels == c, res.labels == c
        assert 2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()) >= 0.98, c
