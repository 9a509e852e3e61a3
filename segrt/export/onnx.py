"""Export a torch network to ONNX with a fixed patch size and a dynamic batch dimension.

Exporter choice. Both exporters (``torch.onnx.export`` with ``dynamo=True``, and the TorchScript-based one with
``dynamo=False``) produce a model with a dynamic batch dimension that passes the ONNX checker and runs in ONNX
Runtime at batch 2, for monai's UNet and SegResNet and, with random weights, for UNETR and SwinUNETR; the
ORT-vs-torch accuracy gate (:mod:`segrt.export.gate`) passes with either (for a SegResNet the two reports were
identical). The dynamo exporter is the slower one to export, and its time grows with the
number of attention blocks (SwinUNETR is the slowest). No committed result or benchmark compares the two
exporters (time one against the other with :func:`export_onnx`'s ``exporter="dynamo"`` / ``"torchscript"``);
every artifact's manifest records which exporter wrote it and how long it took (``models.fp32.exporter`` /
``export_seconds``), and dynamo export times and gate reports of full-size SwinUNETR and UNETR are in
``benchmarks/results/transformers_2026-11-26.json`` (reproduce with ``python benchmarks/bench_brain.py
--transformers``).

Both need ``einops`` (monai's ViT and Swin blocks import it through ``optional_import``; without it *both*
exporters fail with ``OptionalImportError``, so it is in the ``export`` extra). SwinUNETR needs a roi that is
a multiple of 32 and at least 64 (at 32³ its deepest stage is 1 voxel and InstanceNorm raises in either
exporter).

Both exporters succeed for SegResNet and UNet. We use the **dynamo** exporter first because it is the
exporter torch maintains (the default since torch 2.9; the TorchScript-based one is deprecated and
slated for removal), so artifacts keep exporting on future torch versions; its slower export does not
matter for a one-off export. We fall back to the TorchScript exporter when dynamo fails - notably for
TorchScript *sources* (``torch.jit.load`` modules cannot go through ``torch.export``) - and record
which exporter produced the file, and why a fallback happened, in the manifest.

Norms. InstanceNorm3d (affine, with or without running statistics), GroupNorm, BatchNorm3d and Dropout3d in
eval export with a dynamic batch through either exporter (tests/test_trained_forms.py). torch's TorchScript
exporter refuses an instance norm that *has* running-statistics buffers under a dynamic batch ("instance_norm
training for unknown batch size") whichever statistics it uses; :func:`_instance_norm_symbolic` canonicalises
both cases before export: running statistics used (``track_running_stats=True`` in eval) → the equivalent
BatchNormalization; instance statistics used although buffers exist (a module traced in train mode, or an
nnU-Net-style network whose norms keep buffers but normalise per instance) → InstanceNormalization, which is what
the forward computes (the buffers' update is a training side effect with no effect on the output).

Fixed batch. When every exporter fails with a dynamic batch (a network that bakes its batch size into a
reshape, say), :func:`export_onnx` exports once more with the batch fixed at ``fixed_batch`` (the spec's
``sw_batch_size``) and records ``fixed_batch`` and the reason in the manifest entry; the runtime backends then
run exactly that batch size, padding the last, partial batch of a volume with zeros and dropping those outputs
(:meth:`segrt.engine.backends.base.Backend.run_fixed_batch`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

from segrt.errors import ExportError

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "export_onnx", "onnx_io"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"


def _dims(value_info) -> list:
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(str(d.dim_param))
        else:
            out.append(None)
    return out


def onnx_io(path) -> dict:
    """Names, shapes (ints, or str for symbolic dims) and opset of a single-input/-output ONNX model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ExportError(f"{path}: expected an ONNX model with exactly one input and one output, got "
                          f"{len(inputs)} input(s) {[i.name for i in inputs]} and "
                          f"{len(model.graph.output)} output(s) {[o.name for o in model.graph.output]}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return {
        "input_name": inputs[0].name, "output_name": model.graph.output[0].name,
        "input_shape": _dims(inputs[0]), "output_shape": _dims(model.graph.output[0]),
        "opset": opset, "external_data": external,
    }


def _export_dynamo(model, example, path: Path, opset: int) -> None:
    import torch

    batch = torch.export.Dim(BATCH_DIM, min=1, max=4096)
    # the dynamo exporter prints progress lines and logs one warning per missing torchvision op
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    finally:
        noisy.setLevel(level)


def _instance_norm_symbolic():
    """A TorchScript-exporter symbolic for ``aten::instance_norm`` that keeps the batch dimension dynamic.

    torch's own symbolic exports an instance norm that uses *running* statistics (``InstanceNorm3d(...,
    track_running_stats=True)`` in eval) by reshaping (N, C, ...) to (1, N*C, ...), which needs a fixed N and
    raises "instance_norm training for unknown batch size" under a dynamic batch. Running statistics are
    per channel and shared by every sample, so that is exactly BatchNormalization (inference mode) on the
    unreshaped input, which has no batch size in it. One that uses *instance* statistics although it has running
    buffers is plain InstanceNormalization (torch's symbolic would reshape there too); every other case goes to
    torch's symbolic unchanged.
    """
    try:
        from torch.onnx import symbolic_helper as helper, symbolic_opset9 as opset9
    except ImportError:  # pragma: no cover - older/newer layouts
        from torch.onnx._internal.torchscript_exporter import symbolic_helper as helper
        from torch.onnx._internal.torchscript_exporter import symbolic_opset9 as opset9

    @helper.parse_args("v", "v", "v", "v", "v", "b", "f", "f", "b")
    def instance_norm(g, input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                      cudnn_enabled):
        has_running = not (running_mean is None or helper._is_none(running_mean) or running_var is None
                           or helper._is_none(running_var))
        if has_running and not use_input_stats:
            return opset9.batch_norm(g, input, weight, bias, running_mean, running_var, False, momentum, eps,
                                     cudnn_enabled)
        if has_running:  # instance statistics: the buffers only receive a (training-time) update
            return opset9.instance_norm(g, input, weight, bias, None, None, True, momentum, eps, cudnn_enabled)
        return opset9.instance_norm(g, input, weight, bias, running_mean, running_var, use_input_stats,
                                    momentum, eps, cudnn_enabled)

    return instance_norm


def _export_torchscript(model, example, path: Path, opset: int, dynamic: bool = True) -> None:
    import torch

    torch.onnx.register_custom_op_symbolic("aten::instance_norm", _instance_norm_symbolic(), opset)
    try:
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic else None)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::instance_norm", opset)


def _export_fixed(model, example, path: Path, opset: int) -> None:
    """The last resort: the TorchScript exporter with the batch of ``example`` fixed (torch's own symbolics may then
    use the batch size, e.g. the instance norm's reshape)."""
    _export_torchscript(model, example, path, opset, dynamic=False)


def _validate(path: Path, in_channels: int, roi_size, num_classes: int | None, fixed_batch: int | None = None) -> dict:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        raise ExportError(f"exported ONNX model fails onnx.checker: {exc}") from exc
    io_ = onnx_io(path)
    want_in = [in_channels, *roi_size]
    b = fixed_batch if fixed_batch is not None else f"'{BATCH_DIM}'"
    how = f"a fixed batch of {fixed_batch}" if fixed_batch is not None else "a dynamic batch"

    def batch_ok(d):
        return d == fixed_batch if fixed_batch is not None else not isinstance(d, int)

    if io_["input_shape"][1:] != want_in or not batch_ok(io_["input_shape"][0]):
        raise ExportError(f"exported ONNX input has shape {io_['input_shape']}, expected "
                          f"[{b}, {', '.join(map(str, want_in))}] with {how}")
    out = io_["output_shape"]
    if not batch_ok(out[0]) or (num_classes is not None and out[1:] != [num_classes, *roi_size]):
        raise ExportError(f"exported ONNX output has shape {out}, expected "
                          f"[{b}, {num_classes}, {', '.join(map(str, roi_size))}]")
    if fixed_batch is None:  # name the symbolic batch dim the same on both sides, whatever the exporter called it
        io_["input_shape"][0] = BATCH_DIM
        io_["output_shape"][0] = BATCH_DIM
    return io_


def export_onnx(model, path, *, in_channels: int, roi_size, num_classes: int | None = None,
                opset: int = DEFAULT_OPSET, exporter: str = "auto", fixed_batch: int | None = None) -> dict:
    """Export ``model`` (eval mode, CPU) to ``path``; return what the manifest records about it.

    ``exporter``: ``"auto"`` (dynamo, falling back to TorchScript), ``"dynamo"`` or ``"torchscript"``.
    The input is ``"input"`` ``(batch, in_channels, *roi_size)``, the output ``"output"``
    ``(batch, num_classes, *roi_size)``; the batch dimension is dynamic. The file passes
    ``onnx.checker.check_model``. ``fixed_batch``: when no exporter manages a dynamic batch, export once more with
    this fixed batch size (the entry then has ``fixed_batch`` and the reason in ``exporter_note``); None: fail.
    """
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    path = Path(path)
    model.eval()
    example = torch.zeros((1, int(in_channels), *map(int, roi_size)), dtype=torch.float32)
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
    if exporter == "auto" and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        order = ["torchscript"]  # torch.export cannot trace a ScriptModule
        notes = ["the source is (or holds) a TorchScript module, which torch.export (dynamo) cannot trace"]
    else:
        notes = []
    fns = {"dynamo": _export_dynamo, "torchscript": _export_torchscript, "torchscript-fixed-batch": _export_fixed}
    if fixed_batch is not None:
        if isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or fixed_batch < 1:
            raise ExportError(f"fixed_batch must be a positive integer, got {fixed_batch!r}")
        order = [*order, "torchscript-fixed-batch"]
    last_exc: Exception | None = None
    for name in order:
        t0 = time.perf_counter()
        fixed = fixed_batch if name == "torchscript-fixed-batch" else None
        if fixed is not None:
            example = torch.zeros((fixed, int(in_channels), *map(int, roi_size)), dtype=torch.float32)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    fns[name](model, example, path, opset)
            info = _validate(path, in_channels, roi_size, num_classes, fixed)
        except Exception as exc:  # noqa: BLE001 - exporters raise anything; we try the next one
            last_exc = exc
            notes.append(f"{name} exporter failed: {type(exc).__name__}: {str(exc)[:300]}")
            log.warning("ONNX export with the %s exporter failed: %s", name, exc)
            if path.exists():
                path.unlink()
            continue
        info.update({"exporter": name, "export_seconds": round(time.perf_counter() - t0, 3)})
        if fixed is not None:
            info["exporter"] = "torchscript"
            info["fixed_batch"] = fixed
            notes.append(f"no exporter could keep the batch dimension dynamic; exported with a fixed batch of "
                         f"{fixed} (the runtime pads a volume's last, partial batch)")
        if notes:
            info["exporter_note"] = "; ".join(notes)
        return info
    raise ExportError("ONNX export failed with every exporter tried: " + "; ".join(notes)) from last_exc
