"""The backend interface: construct from an artifact (``X.from_artifact``), ``infer`` many batches, ``close`` —
after Polygraphy's runners — and declare what it can do in :class:`Capabilities` (nothing is probed)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from segrt.errors import InferenceError

__all__ = ["Backend", "Capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares about itself; the engine decides from this alone.

    ``device``: ``"cpu"`` or ``"cuda"``. ``device_arrays``: it has ``infer_torch(tensor) -> tensor`` with the data
    staying on ``torch_device`` (the device pipeline runs then). ``fresh_outputs``: ``infer`` returns a new array per
    call, which the stitcher may weight in place. ``max_batch``: windows per call. ``threads``: CPU threads it uses
    (None on a GPU). ``workspace_bytes``: its own memory per call when known (else the budget planner measures it).
    """

    device: str
    device_arrays: bool
    fresh_outputs: bool
    max_batch: int
    threads: int | None = None
    workspace_bytes: int | None = None
    torch_device: object = None


class Backend(ABC):
    """A runner of the exported network on fixed-size patches with a dynamic batch dimension.

    Subclasses set the class (or instance) attributes that :attr:`capabilities` reports: ``device``,
    ``device_arrays``, ``fresh_outputs``, ``threads``, ``workspace_bytes`` and ``torch_device``."""

    name: str = "backend"
    device: str = "cpu"
    device_arrays: bool = False
    fresh_outputs: bool = False
    threads: int | None = None
    workspace_bytes: int | None = None
    torch_device = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(device=self.device, device_arrays=self.device_arrays, fresh_outputs=self.fresh_outputs,
                            max_batch=self.max_batch, threads=self.threads, workspace_bytes=self.workspace_bytes,
                            torch_device=self.torch_device)

    #: the batch size a fixed-batch model takes (None: dynamic); see :meth:`run_fixed_batch`
    fixed_batch: int | None = None

    def __init__(self, in_channels: int, num_classes: int, roi_size: tuple[int, int, int], max_batch: int):
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.max_batch = int(max_batch)

    def run_fixed_batch(self, batch: np.ndarray, run) -> np.ndarray:
        """``run`` (``np → np``) on ``batch``, in chunks of exactly :attr:`fixed_batch` windows when the model has a
        fixed batch: a short chunk is padded with zero windows whose outputs are dropped (each window's output
        depends on that window alone, so padding changes nothing). Without a fixed batch: ``run(batch)``."""
        n = self.fixed_batch
        if n is None or batch.shape[0] == n:
            return run(batch)
        outs = []
        for start in range(0, batch.shape[0], n):
            chunk = batch[start:start + n]
            m = chunk.shape[0]
            if m < n:
                chunk = np.concatenate([chunk, np.zeros((n - m, *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append(run(np.ascontiguousarray(chunk))[:m])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        expected = (self.in_channels, *self.roi_size)
        if not isinstance(batch, np.ndarray) or batch.ndim != 5 or tuple(batch.shape[1:]) != expected:
            got = getattr(batch, "shape", type(batch).__name__)
            raise InferenceError(f"{self.name}: input batch must have shape (B, {', '.join(map(str, expected))}), "
                                 f"got {got}")
        if batch.shape[0] < 1:
            raise InferenceError(f"{self.name}: empty batch")
        return np.ascontiguousarray(batch, dtype=np.float32)

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, *roi) float32 → (B, K, *roi) float32."""

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
