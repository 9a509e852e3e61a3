"""The device (torch) pipeline: the whole of ``Engine.segment`` on one torch device.

Nothing here is imported by the NumPy/ONNX Runtime runtime: ``import segrt.engine`` never touches torch.
:class:`TorchPipeline` is loaded lazily so that ``import segrt.engine.gpu`` itself stays cheap.
"""

from __future__ import annotations

__all__ = ["TorchPipeline", "PipelineResult"]


def __getattr__(name):
    if name in __all__:
        from segrt.engine.gpu import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'segrt.engine.gpu' has no attribute {name!r}")
