"""TensorRT (>= 10) runtime: a serialized plan built by :mod:`segrt.export.tensorrt`.

NOT VERIFIED ON REAL TENSORRT: segrt's machines have neither TensorRT nor a GPU. The tests run this
backend against a recorder of TensorRT's Python API (``tests/tensorrt_double.py``) that executes
nothing: they check how the plan's IO tensors and optimisation profile are read back, the refusals
and the input checks - not the enqueue path, which needs CUDA memory. It follows TensorRT 10's
documented name-based tensor API ("Migrating Python Code from TensorRT 8.x to 10.x":
``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode``, ``get_tensor_profile_shape``,
``set_input_shape``, ``set_tensor_address`` then ``execute_async_v3(stream)``).

A plan only runs on the GPU model and the TensorRT version it was built with: the manifest records
the GPU name, its compute capability and the TensorRT version, and the backend refuses (with
:class:`BackendUnavailable`) a plan whose record does not match this machine, naming both sides.

The batch per enqueue is bounded by the plan itself: the batch range of its optimisation profile
(``get_tensor_profile_shape``), whose window shape must be the artifact's ``(in_channels, *roi)``.

Inference runs on torch CUDA tensors: the input's and a fresh output's ``data_ptr()`` are bound
with ``set_tensor_address``, the plan is enqueued on torch's current CUDA stream.
"""

from __future__ import annotations

import logging

import numpy as np

from segrt.engine.backends.base import Backend
from segrt.errors import BackendUnavailable, InferenceError

__all__ = ["TensorRTBackend", "gpu_identity", "check_plan_compatible"]

log = logging.getLogger("segrt")


def gpu_identity(device_index: int = 0) -> dict:
    """``{"gpu_name": str, "compute_capability": "major.minor"}`` of a CUDA device (via torch).

    Raises :class:`BackendUnavailable` when torch or a CUDA device is missing.
    """
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT inference needs torch (CUDA tensors): {exc}") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is visible (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu_name": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"tensorrt is not installed ({exc}); pip install tensorrt (>= 10) "
                                 f"on a machine with an NVIDIA GPU") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailable(f"segrt needs TensorRT >= 10, this machine has {trt.__version__}")
    return trt


def check_plan_compatible(entry: dict, here: dict, trt_version: str) -> None:
    """Refuse a plan built for another GPU model, compute capability or TensorRT version."""
    problems = []
    if entry.get("gpu_name") != here["gpu_name"]:
        problems.append(f"GPU {entry.get('gpu_name')!r} (this machine: {here['gpu_name']!r})")
    if str(entry.get("compute_capability")) != str(here["compute_capability"]):
        problems.append(f"compute capability {entry.get('compute_capability')} "
                        f"(this machine: {here['compute_capability']})")
    if str(entry.get("tensorrt_version")) != str(trt_version):
        problems.append(f"TensorRT {entry.get('tensorrt_version')} (this machine: {trt_version})")
    if problems:
        raise BackendUnavailable("the artifact's TensorRT plan was built for " + ", ".join(problems)
                                 + "; a plan runs only where it was built - rebuild it on this machine "
                                   "(segrt export ... --tensorrt) or use another backend")


class TensorRTBackend(Backend):
    name = "tensorrt"
    device_arrays = True  # infer_torch: CUDA tensors in and out

    def __init__(self, plan_path, entry: dict, in_channels, num_classes, roi_size, max_batch: int | None = None,
                 *, device_index: int = 0):
        """Load a plan on CUDA device ``device_index``.

        ``max_batch``: windows per enqueue; default, and at most, the largest batch of the plan's optimisation
        profile (a larger one is refused with :class:`BackendUnavailable`).
        """
        trt = _import_tensorrt()
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable(f"the TensorRT backend runs on torch CUDA tensors; torch is not "
                                     f"importable: {exc}") from None
        check_plan_compatible(entry, gpu_identity(device_index), trt.__version__)
        super().__init__(in_channels, num_classes, roi_size, 1)  # max_batch: from the plan's profile, below
        self.torch = torch
        self.threads = None
        self.device = "cuda"
        self._dev = torch.device(f"cuda:{device_index}")
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(plan_path, "rb") as f:
            data = f.read()
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize the plan {plan_path} (built with "
                                     f"TensorRT {entry.get('tensorrt_version')}, running {trt.__version__})")
        inputs, outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(f"the TensorRT plan has inputs {inputs} and outputs {outputs}; "
                                     f"expected exactly one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        want_in = entry.get("input_name", self.input_name)
        if want_in != self.input_name:
            raise BackendUnavailable(f"the TensorRT plan's input is {self.input_name!r}, the manifest says "
                                     f"{want_in!r}")
        lo, _, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        window = (self.in_channels, *self.roi_size)
        if lo[1:] != window or hi[1:] != window:
            raise BackendUnavailable(f"the TensorRT plan's optimisation profile takes inputs {lo} to {hi}; the "
                                     f"artifact's spec needs windows (B, {', '.join(map(str, window))}) - rebuild "
                                     f"the plan")
        self.profile_batch = (lo[0], hi[0])
        if max_batch is None:
            max_batch = hi[0]
        if not lo[0] <= int(max_batch) <= hi[0]:
            raise BackendUnavailable(f"the TensorRT plan's optimisation profile stops at batch {hi[0]} (fixed at "
                                     f"export, from batch {lo[0]}); gpu_batch={max_batch} needs a plan built for it")
        self.max_batch = int(max_batch)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")

    @classmethod
    def from_artifact(cls, artifact, **kw) -> "TensorRTBackend":
        """``max_batch`` (gpu_batch): windows per enqueue, at most (and by default) the plan profile's batch."""
        if "tensorrt" not in artifact.variants:
            raise BackendUnavailable(f"artifact {str(artifact.root)!r} has no TensorRT plan (export it on "
                                     f"the target GPU with tensorrt=True / --tensorrt)")
        entry = artifact.model_entry("tensorrt")
        spec = artifact.spec
        max_batch = kw.pop("max_batch", None)
        return cls(artifact.model_path("tensorrt", verify=False), entry, spec.in_channels, spec.num_classes,
                   spec.inference.roi_size, max_batch, **kw)

    def infer_torch(self, x):
        """(B, C, *roi) float32 tensor on the GPU → (B, K, *roi) float32 tensor, enqueued on torch's stream."""
        torch = self.torch
        expected = (self.in_channels, *self.roi_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
            raise InferenceError(f"{self.name}: input batch must have shape (B, {', '.join(map(str, expected))}), "
                                 f"got {tuple(x.shape)}")
        if x.device != self._dev:
            raise InferenceError(f"{self.name}: input is on {x.device}, the plan runs on {self._dev}")
        x = x.to(torch.float32).contiguous()
        stream = torch.cuda.current_stream(self._dev).cuda_stream
        outs = []
        for b0 in range(0, x.shape[0], self.max_batch):
            xb = x[b0:b0 + self.max_batch].contiguous()
            out = torch.empty((xb.shape[0], self.num_classes, *self.roi_size), dtype=torch.float32,
                              device=xb.device)
            ctx = self.context
            if not ctx.set_input_shape(self.input_name, tuple(xb.shape)):
                raise InferenceError(f"{self.name}: TensorRT rejected the input shape {tuple(xb.shape)} (the "
                                     f"plan's profile covers batch {self.profile_batch[0]}..{self.profile_batch[1]})")
            ctx.set_tensor_address(self.input_name, xb.data_ptr())
            ctx.set_tensor_address(self.output_name, out.data_ptr())
            if not ctx.execute_async_v3(stream):
                raise InferenceError(f"{self.name}: TensorRT execute_async_v3 failed on a batch of shape "
                                     f"{tuple(xb.shape)}")
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        x = self.torch.from_numpy(batch).to(self._dev)
        out = self.infer_torch(x)
        self.torch.cuda.current_stream(self._dev).synchronize()
        return out.cpu().numpy()

    def close(self) -> None:
        self.context = None
        self.engine = None
        self.runtime = None
