"""Engine ↔ device pipeline glue: the torch pipeline behind Engine gives the NumPy engine's labels.

On a CPU-only machine the glue is exercised with the torch backend on torch's CPU device; the GPU-marked tests
run the real thing (torch-CUDA fp16 program + TorchPipeline) and require per-class Dice ≥ 0.995 against the
fp32 CPU engine on the trained demo model.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from parity_util import write_volume  # noqa: E402


@pytest.fixture(scope="module")
def demo_artifact(exported):
    from segrt.demo import DEMO_BUNDLE

    return exported(DEMO_BUNDLE, variants=("fp32", "fp16"), torch_program=True, gate_samples=1)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from segrt.phantom import DEFAULT_FOV_MM, make_phantom, shape_for_fov

    spacing = (1.3, 1.1, 2.5)
    image, truth, affine, _ = make_phantom(shape=shape_for_fov(DEFAULT_FOV_MM, spacing), spacing=spacing,
                                           axcodes="LPS", seed=5)
    d = tmp_path_factory.mktemp("ph")
    return write_volume(d / "ph.nii.gz", image, affine), truth


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    """The CPU glue tests' phantom: the body off-centre in a 352 x 224 x 128 mm field, 12 windows of which 6 are
    air only (the skip rule acts) - a third of the full field's 36 windows, the same code paths."""
    from segrt.phantom import make_phantom, shape_for_fov

    spacing = (1.3, 1.1, 2.5)
    image, truth, affine, _ = make_phantom(shape=shape_for_fov((352.0, 224.0, 128.0), spacing), spacing=spacing,
                                           axcodes="LPS", seed=5, center=(150.0, 0.0, 0.0))
    d = tmp_path_factory.mktemp("ph_small")
    return write_volume(d / "ph.nii.gz", image, affine), truth


def _dice(a, b, k):
    x, y = a == k, b == k
    s = x.sum() + y.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(x, y).sum() / s


def test_engine_runs_torch_pipeline_glue_on_cpu(demo_artifact, small_phantom):
    from segrt.artifact import Artifact
    from segrt.engine.backends.torch_cuda import TorchCudaBackend
    from segrt.engine.engine import Engine

    path, _ = small_phantom
    ref = Engine.load(demo_artifact, device="cpu").segment(path, progress=False)
    art = Artifact.load(demo_artifact)
    eng = Engine(art, TorchCudaBackend.from_artifact(art, device="cpu"), "test: torch program on the CPU",
                 accum_dtype="float32")
    eng.device = "cuda"  # force the device-pipeline branch; the backend still runs on torch's CPU device
    seg = eng.segment(path, progress=False)
    assert set(seg.timings) == {"load", "preprocess", "infer", "stitch", "invert", "write"}
    assert seg.labels.shape == ref.labels.shape and seg.labels.dtype == ref.labels.dtype
    agreement = float((seg.labels == ref.labels).mean())
    assert agreement >= 0.9999, agreement
    assert seg.metadata["windows"] == ref.metadata["windows"]
    # the artifact's skip rule is applied on the device branch as on the CPU: the same windows are not run
    assert seg.metadata["windows_skipped"] == ref.metadata["windows_skipped"] > 0
    assert seg.metadata["skip_rule"] == ref.metadata["skip_rule"] is not None


def test_device_branch_file_to_file_int16(demo_artifact, small_phantom, tmp_path):
    """An int16 CT file on the device branch: read as stored (int16, Fortran order, no host conversion), labels
    come back Fortran-ordered and the written file holds the CPU engine's labels with the input's header."""
    import nibabel as nib

    from segrt.artifact import Artifact
    from segrt.engine.backends.torch_cuda import TorchCudaBackend
    from segrt.engine.engine import Engine
    from segrt.volume import RawImage

    path, _ = small_phantom
    img = nib.load(str(path))
    ct = np.round(np.asanyarray(img.dataobj)).astype(np.int16)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.int16)
    src = tmp_path / "ct_int16.nii.gz"
    nib.save(nib.Nifti1Image(ct, img.affine, header=hdr), str(src))

    Engine.load(demo_artifact, device="cpu").segment(src, output=tmp_path / "cpu.nii.gz", progress=False)
    art = Artifact.load(demo_artifact)
    eng = Engine(art, TorchCudaBackend.from_artifact(art, device="cpu"), "test: torch program on the CPU",
                 accum_dtype="float32")
    eng.device = "cuda"
    seg = eng.segment(src, output=tmp_path / "dev.nii.gz", progress=False)
    assert isinstance(seg.source, RawImage) and seg.source.array.dtype == np.int16
    assert seg.labels.flags.f_contiguous
    assert seg.timings["write"] > 0
    a = nib.load(str(tmp_path / "cpu.nii.gz"))
    b = nib.load(str(tmp_path / "dev.nii.gz"))
    assert a.header.binaryblock == b.header.binaryblock
    agreement = float((np.asanyarray(a.dataobj) == np.asanyarray(b.dataobj)).mean())
    assert agreement >= 0.9999, agreement
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), seg.labels)
    # a RawImage from segrt.read_nifti: as stored on the device branch, MONAI's float32 on the CPU engine
    import segrt

    raw = segrt.read_nifti(src)
    np.testing.assert_array_equal(eng.segment(raw, progress=False).labels, seg.labels)
    cpu = Engine.load(demo_artifact, device="cpu").segment(raw, progress=False)
    np.testing.assert_array_equal(cpu.labels, np.asanyarray(a.dataobj))


@pytest.mark.gpu
@pytest.mark.parametrize("accum", ["float16", "float32"])
def test_gpu_engine_fp16_matches_cpu_fp32(demo_artifact, phantom, accum):
    from segrt.engine.engine import Engine

    path, truth = phantom
    ref = Engine.load(demo_artifact, device="cpu", variant="fp32").segment(path, progress=False)
    eng = Engine.load(demo_artifact, device="cuda", accum_dtype=accum, trust_torch_program=True)
    assert eng.device == "cuda", eng.backend_reason
    seg = eng.segment(path, progress=False)
    dice = {k: _dice(seg.labels, ref.labels, k) for k in range(eng.spec.num_classes)}
    print("GPU-vs-CPU", eng.backend.name, accum, dice, seg.timings)
    assert min(dice.values()) >= 0.995, dice
