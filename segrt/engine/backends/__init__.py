"""Runtime backends: each turns a batch of patches (B, C, *roi) float32 into logits (B, K, *roi) float32.

Backends follow one lifecycle (after Polygraphy's runners): construct from an artifact's model entry, ``infer``
many batches, ``close``; usable as context managers. Heavy libraries are imported only inside the backend that
needs them. ``select_backend`` implements ``device="auto"`` and says what it picked and why.
"""

from __future__ import annotations

import logging

from segrt.errors import BackendUnavailable
from segrt.engine.backends.base import Backend
from segrt.engine.backends.ort_cpu import OrtCpuBackend

__all__ = ["Backend", "OrtCpuBackend", "select_backend", "DEVICES"]

log = logging.getLogger("segrt")

DEVICES = ("auto", "cpu")


def select_backend(artifact, device: str = "auto", variant: str = "fp32", threads: int | None = None):
    """Pick and construct a backend for ``artifact``.

    ``device="cpu"`` forces ONNX Runtime on the CPU. ``device="auto"`` tries the GPU backends in order of speed
    (none are built into this release yet: they come with the GPU path) and falls back to ONNX Runtime CPU,
    logging the reason for each choice. Returns ``(backend, reason)``.
    """
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "auto":
        reason = "device=auto: no GPU backend is available in this build, using ONNX Runtime on the CPU"
    else:
        reason = "device=cpu: ONNX Runtime on the CPU"
    backend = OrtCpuBackend.from_artifact(artifact, variant=variant, threads=threads)
    log.info("segrt: %s (%s, %d threads)", reason, backend.name, backend.threads)
    return backend, reason
