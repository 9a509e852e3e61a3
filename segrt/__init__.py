"""segrt — a lean inference engine for MONAI 3D segmentation bundles.

Public API (everything else is private)::

    import segrt
    segrt.export("path/to/bundle", "artifact_dir")            # needs the [export] extra (torch, monai, onnx)
    engine = segrt.Engine.load("artifact_dir", device="auto")  # runtime: numpy + nibabel + onnxruntime only
    seg = engine.segment("ct.nii.gz")
    seg.save("labels.nii.gz"); seg.volumes_ml(); seg.timings

The runtime imports neither torch nor monai.
"""

from __future__ import annotations

from segrt.errors import (
    ArtifactError,
    BackendUnavailable,
    BudgetError,
    ExportError,
    GateFailed,
    InferenceError,
    OutputError,
    SegrtError,
    SpecError,
    UnsupportedTransform,
    UsageError,
    VolumeError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Engine",
    "Segmentation",
    "Volume",
    "RawImage",
    "Artifact",
    "Spec",
    "export",
    "load_nifti",
    "read_nifti",
    "SegrtError",
    "VolumeError",
    "ArtifactError",
    "SpecError",
    "UnsupportedTransform",
    "ExportError",
    "GateFailed",
    "BackendUnavailable",
    "InferenceError",
    "BudgetError",
    "OutputError",
    "UsageError",
]


def __getattr__(name):  # lazy: keep `import segrt` cheap and torch-free
    if name in ("Engine", "Segmentation"):
        from segrt.engine import engine as _e

        return getattr(_e, name)
    if name in ("Volume", "RawImage", "load_nifti", "read_nifti"):
        from segrt import volume as _v

        return getattr(_v, name)
    if name == "export":  # the subpackage, callable as segrt.export(source, out_dir, ...)
        import importlib

        return importlib.import_module("segrt.export")
    if name == "Artifact":
        from segrt.artifact import Artifact

        return Artifact
    if name == "Spec":
        from segrt.spec import Spec

        return Spec
    raise AttributeError(f"module 'segrt' has no attribute {name!r}")
