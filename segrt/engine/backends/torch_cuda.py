"""torch on CUDA: the artifact's torch program (``torch.export`` .pt2, or TorchScript) in fp16.

How it runs on a GPU:

* **fp16 by autocast** (``torch.autocast("cuda", dtype=torch.float16, cache_enabled=False)``), not by
  ``.half()``: autocast runs convolutions and matmuls in fp16 and, by its op lists, runs
  ``group_norm`` and ``layer_norm`` in fp32 (they are on autocast's "autocast to float32" list);
  ``batch_norm`` / ``instance_norm`` take the fp16 activations but keep fp32 parameters and
  accumulate their statistics in fp32 (cuDNN's and torch's native kernels use an fp32 accumulator
  type for half inputs). The torch program keeps these as single aten ops (``torch.export``), so the
  rules apply. ``cache_enabled=False`` because autocast's weight-cast cache must not be used while a
  CUDA graph is captured (torch's CUDA-graph documentation).
* **channels-last 3D** (``torch.channels_last_3d``) weights and input: optional (``channels_last=True``),
  **off by default** because it was slower than the default layout for monai's SegResNet (fp16, 96³ patches,
  at batch 1 and at batch 4) on the lent H200 (torch 2.11, cuDNN 9.19), despite NDHWC being cuDNN's
  preferred tensor-core layout for 3D convolutions in general. That timing is not recorded under
  ``benchmarks/results/`` and no benchmark script takes this option yet: time ``channels_last=True``
  against the default on the target GPU before changing the default.
* **cuDNN autotuning** (``torch.backends.cudnn.benchmark = True``; process-wide, as torch has it):
  the warm-up runs pick the fastest algorithm for the one fixed patch shape.
* **CUDA graphs**: one ``torch.cuda.CUDAGraph`` captured at the maximum batch on static buffers (after
  warm-up on a side stream, as torch's documentation prescribes); a smaller last batch is copied into
  the front of the static input, the rest is zero padding, and the first rows of the output are
  returned (samples are independent: the networks normalise per sample or with fixed statistics).

``infer_torch(x)`` takes and returns CUDA tensors (the GPU pipeline keeps data on the device);
``infer(batch)`` takes and returns NumPy. ``device="cpu"`` runs the same program eagerly in fp32
(no autocast, no graphs): for tests and for checking the program on a machine without a GPU.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from segrt.engine.backends.base import Backend
from segrt.errors import ArtifactError, BackendUnavailable, InferenceError

__all__ = ["TorchCudaBackend", "TORCH_EXPORT", "TORCHSCRIPT", "load_torch_program"]

log = logging.getLogger("segrt")

TORCH_EXPORT = "torch.export"
TORCHSCRIPT = "torchscript"


# Windows per network call on a GPU. On a large GPU (an H200, monai SegResNet 32 filters, 96³, fp32 and fp16)
# batch 1 is latency-bound: a call on 4 windows takes far less than 4 calls on one, so 4 windows per call cost
# much less per window. 4 keeps the activations small next to the stitching buffers (peak GPU memory per run:
# ``peak_gpu_memory_bytes`` in benchmarks/results/gpu_nvidia-h200_2026-11-26.json). The per-call timings behind
# this choice are not in a committed result; reproduce the whole-volume effect with
# ``python benchmarks/bench_gpu.py --gpu-batch 1 4`` (on a CUDA machine).
GPU_BATCH = 4


def load_torch_program(path, fmt: str, map_location: str = "cpu"):
    """Load a saved torch program (``torch.export`` .pt2 or TorchScript) as a callable module."""
    import torch

    path = Path(path)
    if fmt == TORCH_EXPORT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(str(path)).module()
        return module.to(map_location)
    if fmt == TORCHSCRIPT:
        return torch.jit.load(str(path), map_location=map_location).eval()
    raise ArtifactError(f"unknown torch program format {fmt!r}; expected {TORCH_EXPORT!r} or {TORCHSCRIPT!r}")


class TorchCudaBackend(Backend):
    name = "torch-cuda"
    # device_arrays: infer_torch on torch_device (on "cpu" too: the device pipeline then runs on the CPU)
    device_arrays = True

    def __init__(self, program_path, fmt: str, in_channels, num_classes, roi_size, max_batch, *,
                 device: str = "cuda", fp16: bool = True, cuda_graphs: bool = True,
                 channels_last: bool = False, cudnn_benchmark: bool = True):
        super().__init__(in_channels, num_classes, roi_size, max_batch)
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable(f"torch-cuda needs torch, which is not importable: {exc}") from None
        if device not in ("cuda", "cpu") and not str(device).startswith("cuda:"):
            raise BackendUnavailable(f"torch-cuda: device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
        on_gpu = device != "cpu"
        if on_gpu:
            self.check_cuda()
        self.torch = torch
        self.threads = None
        self.device = "cuda" if on_gpu else "cpu"
        self._dev = torch.device(device)
        self.torch_device = self._dev  # where infer_torch expects its input (the GPU pipeline runs there)
        self.fp16 = bool(fp16) and on_gpu
        self.cuda_graphs = bool(cuda_graphs) and on_gpu
        self.channels_last = bool(channels_last) and on_gpu
        self.format = fmt
        if self.max_batch < 1:
            raise BackendUnavailable(f"torch-cuda: max_batch must be >= 1, got {max_batch}")
        try:
            module = load_torch_program(program_path, fmt, map_location=str(self._dev))
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch load errors
            raise BackendUnavailable(f"torch-cuda: could not load the torch program {program_path} "
                                     f"({fmt}): {type(exc).__name__}: {exc}") from None
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last_3d)
        if on_gpu and cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self.module = module
        self._graph = None
        self._static_in = None
        self._static_out = None

    @staticmethod
    def check_cuda() -> None:
        """BackendUnavailable unless torch is importable and sees a CUDA device."""
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable(f"torch-cuda needs torch, which is not importable: {exc}") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"torch-cuda: torch {torch.__version__} sees no CUDA device "
                                     f"(torch.cuda.is_available() is False; the GPU backends need a CUDA build of torch and "
                                     f"pip install 'segrt[gpu]')")

    @classmethod
    def from_artifact(cls, artifact, *, device: str = "cuda", fp16: bool = True, max_batch: int | None = None,
                      **kw) -> "TorchCudaBackend":
        """``max_batch``: windows per call (and the CUDA graph's batch); default on CUDA is
        max(sw_batch_size, GPU_BATCH) - batch 1 is latency-bound on a large GPU."""
        if "torch" not in artifact.variants:
            raise BackendUnavailable(f"artifact {str(artifact.root)!r} carries no torch program (export it "
                                     f"with torch_program=True / --torch-program)")
        entry = artifact.model_entry("torch")
        spec = artifact.spec
        return cls(artifact.model_path("torch", verify=False), entry.get("format", TORCH_EXPORT),
                   spec.in_channels, spec.num_classes, spec.inference.roi_size,
                   max_batch or (max(spec.inference.sw_batch_size, GPU_BATCH) if device != "cpu"
                                 else spec.inference.sw_batch_size),
                   device=device, fp16=fp16, **kw)

    # ------------------------------------------------------------------------------------------
    def _forward(self, x):
        torch = self.torch
        if self.fp16:
            with torch.autocast(device_type="cuda", dtype=torch.float16, cache_enabled=False):
                return self.module(x)
        return self.module(x)

    def _capture(self) -> None:
        """Warm up (cuDNN autotuning) on a side stream, then capture one graph at the max batch."""
        torch = self.torch
        shape = (self.max_batch, self.in_channels, *self.roi_size)
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        self._static_in = torch.zeros(shape, dtype=torch.float32, device=self._dev).contiguous(memory_format=fmt)
        side = torch.cuda.Stream(device=self._dev)
        side.wait_stream(torch.cuda.current_stream(self._dev))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):
                self._forward(self._static_in)
        torch.cuda.current_stream(self._dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            self._static_out = self._forward(self._static_in)
        self._graph = graph

    def _check_tensor(self, x):
        expected = (self.in_channels, *self.roi_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
            raise InferenceError(f"{self.name}: input batch must have shape (B, {', '.join(map(str, expected))}) "
                                 f"with B >= 1, got {tuple(x.shape)}")

    def infer_torch(self, x):
        """(B, C, *roi) tensor on this backend's device → (B, K, *roi) float32 tensor on the device."""
        torch = self.torch
        self._check_tensor(x)
        if x.device.type != self._dev.type:
            raise InferenceError(f"{self.name}: input is on {x.device}, the backend runs on {self._dev}")
        x = x.to(dtype=torch.float32)
        outs = []
        for b0 in range(0, x.shape[0], self.max_batch):
            xb = x[b0:b0 + self.max_batch]
            n = xb.shape[0]
            if self.cuda_graphs:
                if self._graph is None:
                    self._capture()
                self._static_in[:n].copy_(xb)
                if n < self.max_batch:
                    self._static_in[n:].zero_()
                self._graph.replay()
                outs.append(self._static_out[:n].to(torch.float32, copy=True))
            else:
                with torch.inference_mode():
                    if self.channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last_3d)
                    outs.append(self._forward(xb).to(torch.float32))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        expected = (x.shape[0], self.num_classes, *self.roi_size)
        if tuple(out.shape) != expected:
            raise InferenceError(f"{self.name}: model output has shape {tuple(out.shape)}, expected {expected}")
        return out.contiguous()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        x = self.torch.from_numpy(batch).to(self._dev, non_blocking=False)
        return self.infer_torch(x).cpu().numpy()

    def close(self) -> None:
        self._graph = None
        self._static_in = self._static_out = None
        self.module = None
