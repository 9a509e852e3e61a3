"""Post-training static int8 quantization of the fp32 ONNX (the ``openvino-int8`` CPU variant).

ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``, as its "Quantize ONNX models" guide
describes: ``quant_pre_process`` first, then QDQ format) writes ``model_int8.onnx`` with QuantizeLinear /
DequantizeLinear pairs; OpenVINO's CPU plugin reads those pairs and runs the convolutions between them with int8
kernels (VNNI / AMX-INT8 where the CPU has them), which is why the variant is run by OpenVINO, not by ORT.

Choices:

* calibration runs on the 8 half-size sub-cubes of each window (which together are the window) when the network
  runs at that size (a fully convolutional one does; one that bakes in its window size falls back to full windows):
  the calibrator keeps every calibrated tensor of a step, which for HD-BET's 128³ windows peaked at 9.5 GiB, an
  eighth of that for 64³ crops. Instance norms see a crop's statistics instead of the window's; the gate checks the
  result against fp32 on full windows either way;
* only convolutions are quantized (``op_types_to_quantize``): they are the work, and the calibrator then records
  only their inputs and outputs (every tensor of a 128³ nnU-Net-style window would need ~20 GB);
* weights int8 per output channel (``per_channel=True``, symmetric), activations uint8 asymmetric, ranges from
  MinMax calibration on the calibration windows (the user's scans with ``--calibration``, else the synthetic
  CT-like patches), one window per calibration step and ranges folded after each
  (``CalibStridedMinMax=1``: ranges merged after each window) so memory stays at one window's activations;
* kept in higher precision (``nodes_to_exclude``): every normalisation region (InstanceNorm / GroupNorm / BatchNorm
  and their decompositions, :func:`segrt.export.fp16.find_norm_regions`) and the final head (the last Conv /
  ConvTranspose before the output and everything after it): their inputs' ranges are the least quantization-friendly
  and the head's logits decide the argmax;
* the variant is gated like the bf16 one (per-class Dice >= 0.98 vs fp32 on the gate's patches) and refused by
  the runtime when it failed. What it gives on real trained networks is in the benchmark JSONs named in the README.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from segrt.errors import ExportError

__all__ = ["MODEL_INT8", "excluded_nodes", "quantize_int8"]

MODEL_INT8 = "model_int8.onnx"


def excluded_nodes(model) -> list[str]:
    """Names of the nodes kept in float: the normalisation regions and the head (last conv to the output)."""
    from segrt.export.fp16 import _name_nodes, find_norm_regions

    g = model.graph
    _name_nodes(g)
    names = {n for r in find_norm_regions(model) for n in r.nodes}
    producer = {o: n for n in g.node for o in n.output if o}
    stack = [o.name for o in g.output]
    seen = set()
    while stack:  # from the output back to (and including) the last convolution on each path
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        names.add(node.name)
        if node.op_type in ("Conv", "ConvTranspose"):
            continue
        stack.extend(i for i in node.input if i)
    return sorted(names)


def _io_dims(model) -> list:
    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]

    inits = {i.name for i in model.graph.initializer}
    return [dims(v) for v in model.graph.input if v.name not in inits] + [dims(v) for v in model.graph.output]


def _set_io_dims(model, io_dims) -> None:
    inits = {i.name for i in model.graph.initializer}
    vis = [v for v in model.graph.input if v.name not in inits] + list(model.graph.output)
    for vi, want in zip(vis, io_dims):
        for d, w in zip(vi.type.tensor_type.shape.dim, want):
            if isinstance(w, int) and w > 0:
                d.dim_value = w
            else:
                d.dim_param = str(w)


def _spatially_dynamic(model):
    """A copy of ``model`` whose input and output spatial dims are symbolic (intermediate shapes dropped)."""
    import onnx

    dyn = onnx.ModelProto()
    dyn.CopyFrom(model)
    del dyn.graph.value_info[:]
    inits = {i.name for i in dyn.graph.initializer}
    for vi in [v for v in dyn.graph.input if v.name not in inits] + list(dyn.graph.output):
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if axis >= 2:
                d.dim_param = f"spatial{axis}"
    return dyn


def _half_crops(windows):
    """The 8 half-size sub-cubes of each window (together they are the window), or None for odd / tiny windows."""
    shape = windows[0].shape[2:]
    if any(s % 2 or s < 32 for s in shape):
        return None
    h = [s // 2 for s in shape]
    return [np.ascontiguousarray(w[:, :, i:i + h[0], j:j + h[1], k:k + h[2]])
            for w in windows for i in (0, h[0]) for j in (0, h[1]) for k in (0, h[2])]


def _runs_at(model, x, input_name: str) -> bool:
    """Whether ONNX Runtime runs ``model`` on ``x`` and keeps its spatial size (a network that bakes in its window
    size — reshapes, attention — does not: it is then calibrated on full windows)."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        y = sess.run(None, {input_name: x})[0]
    except Exception:  # noqa: BLE001 - any failure: not runnable at that size
        return False
    return tuple(y.shape[2:]) == tuple(x.shape[2:])


def quantize_int8(fp32_path, out_path, batches, input_name: str = "input") -> dict:
    """Quantize ``fp32_path`` to ``out_path`` (QDQ int8) calibrated on ``batches`` (arrays ``(B, C, *roi)``, fed one
    window at a time); returns what the manifest records."""
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ExportError(f"int8 quantization needs onnx and onnxruntime's quantization tools: {exc}") from None
    windows = [b[i:i + 1] for b in batches for i in range(b.shape[0])]
    if not windows:
        raise ExportError("int8 quantization needs at least one calibration window")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segrt-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - ORT's shape inference raises anything
            raise ExportError(f"int8: ONNX Runtime's pre-processing failed on {fp32_path}: "
                              f"{type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(pre))
        exclude = excluded_nodes(model)
        fixed_io = _io_dims(model)
        calib_on = "full windows"
        sub = _half_crops(windows)
        if sub is not None:  # calibrate on half-size crops of every window when the network takes them
            dyn = _spatially_dynamic(model)
            if _runs_at(dyn, sub[0], input_name):
                model, windows, calib_on = dyn, sub, f"the 8 half-size crops of each window ({sub[0].shape[2:]})"
        onnx.save(model, str(pre))  # with the node names excluded_nodes gave unnamed nodes
        del model

        class Reader(CalibrationDataReader):  # strided: ORT sets the range of one window at a time
            def __init__(self):
                self.it = iter(windows)

            def __len__(self):
                return len(windows)

            def set_range(self, start_index: int, end_index: int):
                self.it = iter(windows[start_index:end_index])

            def get_next(self):
                w = next(self.it, None)
                return None if w is None else {input_name: np.ascontiguousarray(w, dtype=np.float32)}

        try:
            quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                            op_types_to_quantize=["Conv", "ConvTranspose"],
                            extra_options={"CalibStridedMinMax": 1},
                            calibration_providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"int8: ONNX Runtime's static quantizer failed: {type(exc).__name__}: {exc}") from exc
    q = onnx.load(str(out_path), load_external_data=False)
    if _io_dims(q) != fixed_io:  # calibrated with dynamic spatial dims: give the model its fixed window back
        _set_io_dims(q, fixed_io)
        onnx.save(q, str(out_path))
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    return {"quantizer": "onnxruntime.quantization.quantize_static (QDQ, MinMax)",
            "weights": "int8 per channel, symmetric", "activations": "uint8 asymmetric",
            "calibration_windows": len(windows), "calibrated_on": calib_on, "kept_float_nodes": len(exclude),
            "quantize_linear_nodes": n_q, "quantize_seconds": round(time.perf_counter() - t0, 3)}
