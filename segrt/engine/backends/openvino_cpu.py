"""OpenVINO on the CPU: the artifact's fp32 ONNX run by OpenVINO's CPU plugin, optionally in bf16.

Why: on CPUs with native bf16 (AVX512_BF16 or AMX), OpenVINO's CPU plugin runs this network's 3-D
convolutions in bf16 with fp32 accumulation markedly faster than ONNX Runtime fp32 (measured by
``python benchmarks/bench_runtimes.py``: ``runtimes.openvino-bf16.speedup_vs_ort_fp32`` in
``benchmarks/results/cpu_runtimes_2026-11-26.json``). bf16 keeps only 8 mantissa bits, so the bf16 path is
used only when the artifact carries an export-time gate that passed (:mod:`segrt.export.cpu_variants`);
ONNX Runtime fp32 stays the always-available fallback (``select_backend``).

API followed (OpenVINO 2026 docs, "CPU Device" and "Query Device Properties"): ``ov.Core().read_model``
on the ONNX file, ``model.reshape`` to a static batch shape, ``core.compile_model(model, "CPU", config)``
with ``INFERENCE_PRECISION_HINT`` (``"bf16"`` / ``"f32"``), ``PERFORMANCE_HINT="LATENCY"`` and
``INFERENCE_NUM_THREADS``; the CPU's ``OPTIMIZATION_CAPABILITIES`` lists ``"BF16"`` when it computes
bf16 natively, and the compiled model's ``INFERENCE_PRECISION_HINT`` says what it really runs.

``openvino`` is imported lazily: without it the backend raises :class:`BackendUnavailable`.
"""

from __future__ import annotations

import numpy as np

from segrt.engine.backends.base import Backend
from segrt.engine.backends.ort_cpu import physical_cores
from segrt.errors import BackendUnavailable, InferenceError

__all__ = ["OpenVinoCpuBackend", "PRECISIONS", "openvino_info", "variant_precision"]

#: variant name in the artifact (``models`` / ``gate``) -> OpenVINO inference precision
PRECISIONS = {"openvino-bf16": "bf16", "openvino-int8": "f32", "openvino-fp32": "f32"}
_OV_TYPES = {"bf16": "bf16", "f32": "f32"}


def variant_precision(variant: str) -> str:
    if variant not in PRECISIONS:
        raise BackendUnavailable(f"unknown OpenVINO variant {variant!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[variant]


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed (pip install openvino): {exc}") from None
    return ov


def openvino_info() -> dict:
    """Version, CPU name and optimisation capabilities as OpenVINO sees them (raises BackendUnavailable)."""
    ov = _import_openvino()
    core = ov.Core()
    try:
        caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
        raise BackendUnavailable(f"OpenVINO has no usable CPU device: {exc}") from None
    return {"openvino": ov.__version__, "cpu": name, "capabilities": caps, "native_bf16": "BF16" in caps}


class OpenVinoCpuBackend(Backend):
    """Runs an ONNX file with OpenVINO on the CPU; ``precision`` ``"bf16"`` or ``"f32"``.

    One compiled model per batch size (static shapes are what OpenVINO's CPU plugin runs fastest),
    compiled on first use; ``precision="bf16"`` is refused on a CPU without native bf16 (OpenVINO
    would silently run f32 there, which is not what the gate measured).
    """

    device = "cpu"

    def __init__(self, model_path, in_channels, num_classes, roi_size, max_batch, *, precision: str = "bf16",
                 input_name="input", output_name="output", threads: int | None = None,
                 fixed_batch: int | None = None, name: str | None = None):
        super().__init__(in_channels, num_classes, roi_size, max_batch)
        self.fixed_batch = fixed_batch
        if precision not in _OV_TYPES:
            raise BackendUnavailable(f"OpenVINO precision must be 'bf16' or 'f32', got {precision!r}")
        self.precision = precision
        self.name = name or ("openvino-bf16" if precision == "bf16" else "openvino-fp32")
        ov = _import_openvino()
        self._ov = ov
        self.core = ov.Core()
        self.info = openvino_info()
        if precision == "bf16" and not self.info["native_bf16"]:
            raise BackendUnavailable(f"this CPU ({self.info['cpu']}) has no native bf16 (OpenVINO capabilities: "
                                     f"{', '.join(self.info['capabilities'])}); OpenVINO would run f32")
        self.threads = int(threads) if threads else physical_cores()
        self.model_path = str(model_path)
        self.input_name = input_name
        self.output_name = output_name
        try:
            model = self.core.read_model(self.model_path)
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"OpenVINO could not read {model_path}: {exc}") from None
        names = [n for p in model.inputs for n in p.get_names()]
        if input_name not in names:
            raise BackendUnavailable(f"{model_path}: no input named {input_name!r} (has {names})")
        self._compiled: dict[int, tuple] = {}
        self._compile(fixed_batch or 1)  # fail here, not on the first batch, and check the precision really used

    def _compile(self, batch: int):
        if batch in self._compiled:
            return self._compiled[batch]
        ov = self._ov
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": self.threads}
        try:
            model = self.core.read_model(self.model_path)
            model.reshape({self.input_name: [batch, self.in_channels, *self.roi_size]})
            compiled = self.core.compile_model(model, "CPU", config)
            used = compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"OpenVINO could not compile {self.model_path} for the CPU "
                                     f"(batch {batch}, {self.precision}): {exc}") from None
        want = ov.Type.bf16 if self.precision == "bf16" else ov.Type.f32
        if used != want:
            raise BackendUnavailable(f"OpenVINO compiled {self.model_path} with inference precision {used}, "
                                     f"not the requested {self.precision}")
        try:
            out = compiled.output(self.output_name)
        except Exception:  # noqa: BLE001 - the ONNX frontend may rename outputs
            out = compiled.output(0)
        entry = (compiled, compiled.create_infer_request(), out)
        self._compiled[batch] = entry
        return entry

    @classmethod
    def from_artifact(cls, artifact, variant: str = "openvino-bf16", threads: int | None = None,
                      require_gate: bool = True) -> "OpenVinoCpuBackend":
        """The backend of ``variant`` (an entry of the artifact's ``models``).

        ``require_gate``: refuse (:class:`BackendUnavailable`, with the gate's reason) a reduced-precision
        variant whose export-time gate did not pass or is missing.
        """
        precision = variant_precision(variant)
        entry = artifact.model_entry(variant) if variant in artifact.variants else None
        if entry is None and variant != "openvino-fp32":
            raise BackendUnavailable(f"the artifact has no {variant!r} variant (it has: "
                                     f"{', '.join(artifact.variants)}); export it with "
                                     f"cpu_variants=('{variant}',)")
        if entry is not None and require_gate and variant != "openvino-fp32":
            gate = artifact.manifest.get("gate", {}).get(variant)
            if not isinstance(gate, dict):
                raise BackendUnavailable(f"{variant}: the artifact records no accuracy gate for it; refusing "
                                         f"an ungated reduced-precision variant")
            if not gate.get("passed"):
                why = gate.get("reason") or "; ".join(gate.get("problems", [])) or "no reason recorded"
                raise BackendUnavailable(f"{variant}: failed its export-time accuracy gate ({why})")
        source = entry if entry is not None else artifact.model_entry("fp32")
        spec = artifact.spec
        path = artifact.model_path(variant if entry is not None else "fp32", verify=False)  # contained, present
        return cls(path, spec.in_channels, spec.num_classes, spec.inference.roi_size,
                   spec.inference.sw_batch_size, precision=precision,
                   input_name=source.get("input_name", "input"), output_name=source.get("output_name", "output"),
                   threads=threads, fixed_batch=source.get("fixed_batch"), name=variant)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        y = self.run_fixed_batch(batch, self._run)
        expected = (batch.shape[0], self.num_classes, *self.roi_size)
        if y.shape != expected:
            raise InferenceError(f"{self.name}: model output has shape {y.shape}, expected {expected}")
        return y

    def _run(self, batch: np.ndarray) -> np.ndarray:
        _, request, out = self._compile(int(batch.shape[0]))
        try:
            result = request.infer({self.input_name: batch})
            return np.array(result[out], dtype=np.float32, copy=True)
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"{self.name}: OpenVINO failed on a batch of shape {batch.shape}: {exc}") from None

    def close(self) -> None:
        self._compiled = {}
