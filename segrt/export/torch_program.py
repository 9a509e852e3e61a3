"""A torch program next to the ONNX model, for the torch-CUDA backend.

``torch.export`` first: the program is saved with ``torch.export.save`` (``.pt2``) and keeps the
network at the aten level - ``aten.group_norm`` / ``aten.instance_norm`` / ``aten.batch_norm``
stay single ops (checked for SegResNet: 32 conv3d, 25 group_norm, 3 upsample_trilinear3d), so
torch's autocast applies its per-op precision rules at run time (see
:mod:`segrt.engine.backends.torch_cuda`). TorchScript (``torch.jit.save``) is the fallback, for
TorchScript sources (which ``torch.export`` cannot trace) and for networks ``torch.export`` rejects;
the manifest records which one was written and why.

The example input has batch 2: ``torch.export`` specialises a dimension whose example size is 1.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from segrt.engine.backends.torch_cuda import TORCH_EXPORT, TORCHSCRIPT, load_torch_program
from segrt.errors import ExportError

__all__ = ["TORCH_EXPORT", "TORCHSCRIPT", "export_torch_program"]

log = logging.getLogger(__name__)

_SUFFIX = {TORCH_EXPORT: ".pt2", TORCHSCRIPT: ".ts"}


def export_torch_program(model, out_dir, *, in_channels: int, roi_size, stem: str = "model_torch") -> dict:
    """Save ``model`` (eval, CPU) as a torch program in ``out_dir``; return the manifest entry fields.

    The entry holds ``path`` (relative to ``out_dir``), ``format`` (``"torch.export"`` or
    ``"torchscript"``), ``format_note`` (why the fallback, when there was one) and the max abs
    difference of the reloaded program against ``model`` on a batch of 2 (``check_max_abs_diff``).
    """
    import torch

    out_dir = Path(out_dir)
    model.eval()
    g = torch.Generator().manual_seed(0)
    example = torch.randn((2, int(in_channels), *map(int, roi_size)), generator=g)
    notes: list[str] = []
    t0 = time.perf_counter()
    fmt = None
    path = None
    if isinstance(model, torch.jit.ScriptModule):
        notes.append("the source is a TorchScript module, which torch.export cannot trace")
    else:
        path = out_dir / (stem + _SUFFIX[TORCH_EXPORT])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch = torch.export.Dim("batch", min=1, max=4096)
                ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
                torch.export.save(ep, str(path))
            fmt = TORCH_EXPORT
        except Exception as exc:  # noqa: BLE001 - torch.export raises many error types
            notes.append(f"torch.export failed: {type(exc).__name__}: {str(exc)[:300]}")
            log.warning("torch.export failed, falling back to TorchScript: %s", exc)
            if path.exists():
                path.unlink()
    if fmt is None:
        path = out_dir / (stem + _SUFFIX[TORCHSCRIPT])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if isinstance(model, torch.jit.ScriptModule):
                    torch.jit.save(model, str(path))
                else:
                    with torch.no_grad():
                        traced = torch.jit.trace(model, (example,), check_trace=False)
                    torch.jit.save(traced, str(path))
            fmt = TORCHSCRIPT
        except Exception as exc:  # noqa: BLE001
            notes.append(f"TorchScript failed: {type(exc).__name__}: {str(exc)[:300]}")
            raise ExportError("could not save a torch program: " + "; ".join(notes)) from exc
    # reload and compare: the saved program must compute what the model computes
    prog = load_torch_program(path, fmt)
    with torch.no_grad():
        ref = model(example)
        got = prog(example)
    if tuple(got.shape) != tuple(ref.shape):
        raise ExportError(f"the saved torch program returns shape {tuple(got.shape)}, the model "
                          f"{tuple(ref.shape)}")
    diff = float((got.float() - ref.float()).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    if not diff <= 1e-4 * scale:
        raise ExportError(f"the reloaded torch program ({fmt}) differs from the model by {diff:.3g} "
                          f"(max |logit| {scale:.3g})")
    entry = {"path": path.name, "format": fmt, "check_max_abs_diff": diff,
             "export_seconds": round(time.perf_counter() - t0, 3)}
    if notes:
        entry["format_note"] = "; ".join(notes)
    return entry
