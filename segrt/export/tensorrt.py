"""Build a TensorRT (>= 10) plan from the artifact's fp32 ONNX: FP16 with normalisations pinned to fp32.

NOT VERIFIED ON REAL TENSORRT: segrt's machines have neither TensorRT nor a GPU. The tests run the
builder against a recorder of TensorRT's Python API (``tests/tensorrt_double.py``) that builds nothing:
they check what the builder asks for (flags, the layers pinned to fp32, the profile, the timing cache,
the files written), not that TensorRT accepts it, nor the plan's accuracy - the export gate of the plan
runs only on a GPU. Written from TensorRT 10's documented Python API (IBuilderConfig, Builder,
OnnxParser, IOptimizationProfile, "Reduced Precision" / layer-level precision control of the
developer guide, the 8.x → 10.x migration guide) - see the comments at each call.

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

The plan and the timing cache are written to a temporary file beside their path and renamed into
place, so a failed write never leaves a truncated plan or cache behind.

The returned manifest fields record the GPU name, compute capability and TensorRT version; the
runtime (:mod:`segrt.engine.backends.tensorrt`) refuses the plan elsewhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
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


def _write_atomic(path: Path, data) -> None:
    """Write ``data`` (a buffer) to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    # TensorRT's own normalisation layer for InstanceNormalization (not the plugin): a layer the fp32 pins can reach
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
    try:
        _write_atomic(plan_path, serialized)
    except OSError as exc:
        raise ExportError(f"could not write the TensorRT plan {plan_path}: {exc.strerror or exc}") from None
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_path, config.get_timing_cache().serialize())
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
