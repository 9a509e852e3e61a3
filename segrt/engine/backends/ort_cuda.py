"""ONNX Runtime with the CUDA execution provider (``onnxruntime-gpu``, the ``[gpu]`` extra).

Not yet verified on a real GPU by segrt's CI (the project's machines have no GPU); its CPU-side
behaviour - refusing cleanly when the CUDA provider is absent - is tested.

``infer_torch(x)`` binds torch CUDA tensors to the session without copies (ONNX Runtime's IO
binding: ``bind_input`` / ``bind_output`` with ``device_type="cuda"`` and the tensors'
``data_ptr()``); ``infer(batch)`` takes and returns NumPy (ONNX Runtime copies). Runs the artifact's
fp16 ONNX (norms kept fp32, float32 graph IO) unless the fp32 variant is asked for.

ONNX Runtime silently falls back to the CPU provider when the CUDA provider cannot start (missing
CUDA / cuDNN libraries): the constructor checks the session's providers and refuses in that case.
"""

from __future__ import annotations

import numpy as np

from segrt.engine.backends.ort_cpu import OrtSessionBackend
from segrt.errors import BackendUnavailable, InferenceError

__all__ = ["OrtCudaBackend"]

CUDA_EP = "CUDAExecutionProvider"


class OrtCudaBackend(OrtSessionBackend):
    name = "ort-cuda"
    device_arrays = True  # infer_torch: CUDA tensors in and out

    def __init__(self, model_path, in_channels, num_classes, roi_size, max_batch, input_name="input",
                 output_name="output", device_id: int = 0):
        super().__init__(in_channels, num_classes, roi_size, max_batch)
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - core dependency
            raise BackendUnavailable(f"onnxruntime is not importable: {exc}") from None
        available = ort.get_available_providers()
        if CUDA_EP not in available:
            raise BackendUnavailable(
                f"ort-cuda: this onnxruntime ({ort.__version__}) has no {CUDA_EP} (available: "
                f"{', '.join(available)}); install onnxruntime-gpu in place of onnxruntime "
                f"(pip uninstall -y onnxruntime && pip install onnxruntime-gpu)")
        self.threads = None
        self.device = "cuda"
        self.device_id = int(device_id)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        cuda_opts = {"device_id": self.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE",
                     "cudnn_conv_use_max_workspace": "1", "do_copy_in_default_stream": "1"}
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so,
                                                providers=[(CUDA_EP, cuda_opts), "CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            raise BackendUnavailable(f"ort-cuda: ONNX Runtime could not load {model_path}: {exc}") from None
        if CUDA_EP not in self.session.get_providers():
            raise BackendUnavailable(f"ort-cuda: the {CUDA_EP} failed to start (CUDA or cuDNN libraries "
                                     f"missing or no GPU); the session fell back to {self.session.get_providers()}")
        self._bind_io(model_path, input_name, output_name)
        self.model_path = str(model_path)

    @classmethod
    def from_artifact(cls, artifact, variant: str = "fp16", device_id: int = 0,
                      max_batch: int | None = None) -> "OrtCudaBackend":
        entry = artifact.model_entry(variant)
        if entry.get("format", "onnx") != "onnx":
            raise BackendUnavailable(f"ort-cuda runs ONNX models; the artifact's {variant!r} model is "
                                     f"{entry.get('format')!r}")
        if entry.get("fixed_batch") is not None:
            raise BackendUnavailable(f"ort-cuda: the artifact's {variant!r} model takes a fixed batch of "
                                     f"{entry['fixed_batch']}; the device pipeline needs a dynamic batch "
                                     f"(run it on the CPU: --device cpu)")
        spec = artifact.spec
        return cls(artifact.model_path(variant, verify=False), spec.in_channels, spec.num_classes,
                   spec.inference.roi_size, max_batch or spec.inference.sw_batch_size,
                   input_name=entry.get("input_name", "input"), output_name=entry.get("output_name", "output"),
                   device_id=device_id)

    def infer_torch(self, x):
        """(B, C, *roi) float32 CUDA tensor → (B, K, *roi) float32 CUDA tensor, through IO binding."""
        import torch

        expected = (self.in_channels, *self.roi_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected or x.shape[0] < 1 or x.device.type != "cuda":
            raise InferenceError(f"{self.name}: input must be a CUDA tensor of shape (B, "
                                 f"{', '.join(map(str, expected))}), got {tuple(x.shape)} on {x.device}")
        x = x.to(torch.float32).contiguous()
        out = torch.empty((x.shape[0], self.num_classes, *self.roi_size), dtype=torch.float32, device=x.device)
        binding = self.session.io_binding()
        binding.bind_input(name=self.input_name, device_type="cuda", device_id=x.device.index or 0,
                           element_type=np.float32, shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        binding.bind_output(name=self.output_name, device_type="cuda", device_id=out.device.index or 0,
                            element_type=np.float32, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        # ORT runs on its own stream: the input must be complete before it starts
        torch.cuda.current_stream(x.device).synchronize()
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"{self.name}: ONNX Runtime failed on a batch of shape {tuple(x.shape)}: "
                                 f"{exc}") from None
        return out
