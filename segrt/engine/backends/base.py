from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from segrt.errors import InferenceError


class Backend(ABC):
    """A runner of the exported network on fixed-size patches with a dynamic batch dimension."""

    name: str = "backend"

    def __init__(self, in_channels: int, num_classes: int, roi_size: tuple[int, int, int], max_batch: int):
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.max_batch = int(max_batch)

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
