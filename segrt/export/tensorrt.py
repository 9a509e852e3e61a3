"""Build a TensorRT (>= 10) plan from the artifact's fp32 ONNX: FP16 with normalisations pinned to fp32.

NOT YET VERIFIED ON REAL TENSORRT: segrt's machines cannot install TensorRT; the builder is tested
against a test double of TensorRT's Python API (``tests/tensorrt_double.py``) that records and checks
what the builder is asked to do. Written from TensorRT 10's documented Python API (IBuilderConfig,
Builder, OnnxParser, IOptimizationProfile, "Reduced Precision" / layer-level precision control of
the developer guide, the 8.x → 10.x migration guide) - see the comments at each call.

What is built:

* the ONNX parser reads the fp32 model (``parse_from_file``); ``NATIVE_INSTANCENORM`` makes it emit
  TensorRT's own normalisation layer (``LayerType.NORMALIZATION``) for InstanceNormalization - the
  GroupNorm of SegResNet arrives as Reshape → InstanceNormalization → Reshape → Mul → Add;
* ``BuilderFlag.FP16`` lets every layer run in fp16; ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``
  makes the per-layer constraints binding (the build fails rather than ignoring them);
* every normalisation layer - each ``LayerType.NORMALIZATION`` layer, and each layer the parser made
  from a node of a normalisation region of :func:`segrt.export.fp16.find_norm_regions` (the parser
  names layers after their ONNX node, with ``_N`` suffixes for extra layers) - gets
  ``layer.precision = float32`` and ``set_output_type(i, float32)`` on its float outputs;
* one optimisation profile on the input: min ``(1, C, *roi)``, opt = max ``(max_batch, C, *roi)``;
* a timing cache (``create_timing_cache`` from the cache file's bytes, ``set_timing_cache``), written
  back after the build so rebuilds on the same GPU skip the tactic timing.

The returned manifest fields record the GPU name, compute capability and TensorRT version; the
runtime (:mod:`segrt.engine.backends.tensorrt`) refuses the plan elsewhere.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from segrt.errors import BackendUnavailable, ExportError

__all__ = ["build_plan", "default_timing_cache"]

log = logging.getLogger(__name__)


def default_timing_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segrt" / "tensorrt_timing.cache"


def _gpu_identity() -> dict:
    from segrt.engine.backends.tensorrt import gpu_identity

    try:
        return gpu_identity(0)
    except BackendUnavailable as exc:
        raise ExportError(f"building a TensorRT plan needs an NVIDIA GPU: {exc}") from None


def _is_pinned_name(layer_name: str, node_names: set[str]) -> bool:
    if layer_name in node_names:
        return True
    base, _, suffix = layer_name.rpartition("_")
    return bool(base) and suffix.isdigit() and base in node_names


def build_plan(onnx_path, plan_path, *, max_batch: int, in_channels: int, roi_size, fp16: bool = True,
               fp32_node_names=(), input_name: str = "input", timing_cache=None,
               workspace_bytes: int | None = None) -> dict:
    """Build and write a plan; return the manifest fields (GPU, versions, profile, pinned layers)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(f"TensorRT is not installed ({exc}); a plan can only be built on a machine "
                          f"with an NVIDIA GPU and TensorRT >= 10 (pip install tensorrt)") from None
    version = str(trt.__version__)
    if int(version.split(".")[0]) < 10:
        raise ExportError(f"segrt builds plans with TensorRT >= 10, this machine has {version}")
    if int(max_batch) < 1:
        raise ExportError(f"max_batch must be >= 1, got {max_batch}")
    gpu = _gpu_identity()
    roi = tuple(int(r) for r in roi_size)
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch; EXPLICIT_BATCH is deprecated and ignored, so no flag.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"the TensorRT ONNX parser rejected {onnx_path}: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    pinned: list[str] = []
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        names = set(fp32_node_names)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION or _is_pinned_name(layer.name, names):
                float_outs = [j for j in range(layer.num_outputs)
                              if layer.get_output(j).dtype in (trt.float32, trt.float16)]
                if not float_outs:
                    continue  # shape arithmetic of a region: nothing to pin
                layer.precision = trt.float32
                for j in float_outs:
                    layer.set_output_type(j, trt.float32)
                pinned.append(layer.name)

    profile = builder.create_optimization_profile()
    lo = (1, int(in_channels), *roi)
    hi = (int(max_batch), int(in_channels), *roi)
    profile.set_shape(input_name, lo, hi, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache()
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a plan from {onnx_path} (fp16={fp16}, "
                          f"{len(pinned)} layers pinned to fp32); see the TensorRT log above")
    plan_path = Path(plan_path)
    with open(plan_path, "wb") as f:
        f.write(memoryview(serialized))
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)
    except OSError as exc:  # a cache we cannot write only costs time next build
        log.warning("could not write the TensorRT timing cache %s: %s", cache_path, exc)
    return {
        "format": "tensorrt",
        "precision": "fp16 (normalisation layers fp32)" if fp16 else "fp32",
        "tensorrt_version": version,
        "gpu_name": gpu["gpu_name"],
        "compute_capability": gpu["compute_capability"],
        "max_batch": int(max_batch),
        "input_name": input_name,
        "profile": {"min": list(lo), "opt": list(hi), "max": list(hi)},
        "fp32_layers": pinned,
        "timing_cache": str(cache_path),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
