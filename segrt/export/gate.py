"""Accuracy gate: the exported ONNX model (ONNX Runtime, CPU) against its torch reference.

Inputs are fresh standard-normal float32 patches, batch 2, from a seeded generator; each call site
passes its own seed (the export derives it from the model file's hash), so different artifacts are
checked on different patches while a given export is reproducible.

Thresholds (fp32), both must hold:

* ``max|torch - ort| <= MAX_ABS_REL * max(1, max|torch logit|)``: fp32 kernels in torch and ORT
  sum convolutions in different orders, so the logits differ by reordering noise, which grows with
  depth (deep GroupNorm stacks such as the full wholeBody SegResNet accumulate the most). 1e-3 of the
  logit scale (or 1e-3 absolute for small logits) sits about an order of magnitude above that noise
  and still catches a wrong weight, a wrong op or a swapped axis (errors of the logits' own order).
* argmax agreement (the label each voxel would get) ``>= MIN_ARGMAX_AGREEMENT``: the tiny logit
  difference may flip near-ties, of which random-init networks on random inputs have many, but
  not more than 1 voxel in 1000.

Where the measured figures are: each gate's report (max / mean |Δlogit|, logit scale, argmax
agreement) is recorded in the artifact's manifest (``gate["fp32"]``, printed by ``segrt export``);
full-size SwinUNETR and UNETR in ``benchmarks/results/transformers_2026-11-26.json`` (``rows[].gate``)
and the brain benchmark's transformer in ``benchmarks/results/brain_2026-11-26.json``
(``export.gate``). No committed result holds the UNet's or the wholeBody SegResNet's report: reproduce
with ``segrt export <bundle> -o <dir> --random-init``, or ``python benchmarks/bench_cpu.py``, which exports
the wholeBody bundle with seeded random weights (the report is in that artifact's manifest).
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from segrt.errors import ExportError, GateFailed

__all__ = ["MAX_ABS_REL", "MIN_ARGMAX_AGREEMENT", "GATE_BATCH", "gate_seed", "run_gate", "check_onnx_only"]

MAX_ABS_REL = 1e-3
MIN_ARGMAX_AGREEMENT = 0.999
GATE_BATCH = 2


def gate_seed(*parts) -> int:
    """A reproducible 31-bit seed for one call site (e.g. ``gate_seed("fp32", model_sha256)``)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _session(onnx_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no arena: a gate runs a handful of batches, and the arena would keep its largest ones for the whole export
    opts.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {type(exc).__name__}: {exc}") from exc


def release_memory() -> None:
    """Give freed heap memory back to the system between export stages (glibc keeps it otherwise, and the next
    stage's peak adds to it). A no-op where glibc's ``malloc_trim`` is not available."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _run_onnx(session, x: np.ndarray) -> np.ndarray:
    """One ORT forward (a module-level function so tests can tamper with it)."""
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])


def _run_torch(model, x: np.ndarray, split: bool = False) -> np.ndarray:
    """torch's logits for ``x``; ``split``: one sample at a time (half the activations of a batch of 2 at the
    peak; each sample's output depends on that sample alone)."""
    import torch

    if split and x.shape[0] > 1:
        return np.concatenate([_run_torch(model, x[i:i + 1]) for i in range(x.shape[0])])
    with torch.no_grad():
        y = model(torch.from_numpy(x))
    if isinstance(y, (tuple, list)):
        y = y[0]
    return y.detach().cpu().float().numpy()


def _abs_diff_stats(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max, sum) of |ref - got| over all elements, one class at a time in float32 (no full-size float64
    temporaries: a 105-class batch of 2 at 96³ is 0.7 GB per array)."""
    max_abs, total = 0.0, 0.0
    for k in range(ref.shape[1]):
        d = np.abs(ref[:, k] - got[:, k])
        max_abs = max(max_abs, float(np.nanmax(d)) if d.size else 0.0)
        total += float(np.nansum(d, dtype=np.float64))
    return max_abs, total


def _patches(seed: int, samples: int, shape) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(samples)]


def run_gate(model, onnx_path, *, in_channels: int, roi_size, num_classes: int, samples: int = 2,
             seed: int = 0, batch: int = GATE_BATCH, raise_on_fail: bool = True, split_torch: bool = True) -> dict:
    """Compare ``model`` (torch, eval) with ``onnx_path`` (ORT CPU) on ``samples`` random batches.

    Returns the report (JSON-ready); raises :class:`GateFailed` (carrying it) beyond the thresholds.
    ``split_torch``: run torch one sample at a time (less memory; False for a network with its batch baked in).
    ONNX Runtime always runs the whole batch, so the dynamic batch dimension is what is checked.
    """
    if samples < 1:
        raise ExportError(f"gate samples must be >= 1, got {samples}")
    model.eval()
    sess = _session(onnx_path)
    shape = (batch, int(in_channels), *map(int, roi_size))
    want = (batch, int(num_classes), *map(int, roi_size))
    max_abs = 0.0
    sum_abs = 0.0
    count = 0
    scale = 0.0
    agree = 0
    voxels = 0
    nonfinite = False
    t0 = time.perf_counter()
    for x in _patches(seed, samples, shape):
        ref = _run_torch(model, x, split=split_torch)
        got = _run_onnx(sess, x)
        if ref.shape != want or got.shape != want:
            report = {"passed": False, "reason": "shape", "expected_shape": list(want),
                      "torch_shape": list(ref.shape), "onnx_shape": list(got.shape)}
            raise GateFailed(f"gate: output shapes differ from the expected {list(want)} "
                             f"(torch {list(ref.shape)}, onnx {list(got.shape)})", report)
        if not (np.isfinite(ref).all() and np.isfinite(got).all()):
            nonfinite = True
        m, total = _abs_diff_stats(ref, got)
        max_abs = max(max_abs, m)
        sum_abs += total
        count += ref.size
        scale = max(scale, float(np.nanmax(np.abs(ref))))
        agree += int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
        voxels += ref.shape[0] * int(np.prod(ref.shape[2:]))
    tol = MAX_ABS_REL * max(1.0, scale)
    agreement = agree / voxels
    report = {
        "passed": False,
        "reference": "torch",
        "runtime": "onnxruntime CPUExecutionProvider",
        "samples": int(samples), "batch": int(batch), "seed": int(seed),
        "input_distribution": "standard normal float32",
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": sum_abs / max(count, 1),
        "max_abs_logit": scale,
        "tolerance_max_abs": tol,
        "argmax_agreement": agreement,
        "min_argmax_agreement": MIN_ARGMAX_AGREEMENT,
        "max_abs_rel": MAX_ABS_REL,
        "finite": not nonfinite,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    problems = []
    if nonfinite:
        problems.append("non-finite logits")
    if not max_abs <= tol:
        problems.append(f"max |logit diff| {max_abs:.3g} > tolerance {tol:.3g}")
    if agreement < MIN_ARGMAX_AGREEMENT:
        problems.append(f"argmax agreement {agreement:.6f} < {MIN_ARGMAX_AGREEMENT}")
    report["passed"] = not problems
    report["problems"] = problems
    if problems and raise_on_fail:
        raise GateFailed("accuracy gate failed (torch vs ONNX Runtime): " + "; ".join(problems), report)
    return report


def check_onnx_only(onnx_path, *, input_shape, num_classes: int, roi_size, samples: int = 2,
                    seed: int = 0) -> dict:
    """Run an ONNX model that has no torch reference; check output shape and finiteness.

    ``input_shape`` is the concrete batch shape to feed, e.g. ``(2, 1, 96, 96, 96)``.
    """
    sess = _session(onnx_path)
    want = (int(input_shape[0]), int(num_classes), *map(int, roi_size))
    t0 = time.perf_counter()
    scale = 0.0
    for x in _patches(seed, samples, tuple(int(v) for v in input_shape)):
        try:
            y = _run_onnx(sess, x)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT runtime errors
            raise ExportError(f"ONNX Runtime failed to run {onnx_path} on a {list(x.shape)} input: "
                              f"{type(exc).__name__}: {exc}") from exc
        if tuple(y.shape) != want:
            report = {"passed": False, "reason": "shape", "expected_shape": list(want),
                      "onnx_shape": list(y.shape)}
            raise GateFailed(f"ONNX output has shape {list(y.shape)}, expected {list(want)} "
                             f"(batch, num_classes, *roi_size) from the spec", report)
        if not np.isfinite(y).all():
            raise GateFailed("ONNX output holds NaN/Inf on a standard-normal input",
                             {"passed": False, "reason": "non-finite"})
        scale = max(scale, float(np.abs(y).max()))
    return {
        "passed": True,
        "reference": None,
        "note": "no torch reference exists (the ONNX file is the source): only output shape and "
                "finiteness were checked",
        "runtime": "onnxruntime CPUExecutionProvider",
        "samples": int(samples), "batch": int(input_shape[0]), "seed": int(seed),
        "input_distribution": "standard normal float32",
        "output_shape": list(want),
        "finite": True,
        "max_abs_logit": scale,
        "seconds": round(time.perf_counter() - t0, 3),
    }
