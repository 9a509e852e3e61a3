"""Reduced-precision CPU variants of an artifact, each with an export-time accuracy gate.

A CPU variant is recorded in the manifest like every model (``models[name]`` and ``gate[name]``); the
runtime uses it for ``device="cpu"`` / ``"auto"`` only when its gate passed, and otherwise falls back
to ONNX Runtime fp32 and logs the gate's reason (``segrt.engine.backends.select_backend``).

Variants:

* ``"openvino-bf16"``: the artifact's own fp32 ONNX (no extra file; the entry points at
  ``model_fp32.onnx`` and carries its hash) run by OpenVINO's CPU plugin with
  ``INFERENCE_PRECISION_HINT="bf16"`` (:mod:`segrt.engine.backends.openvino_cpu`). Gated only on a CPU
  that computes bf16 natively - elsewhere OpenVINO would run f32 and the gate would measure nothing.

* ``"openvino-int8"``: ``model_int8.onnx``, the fp32 ONNX statically quantized to int8 QDQ
  (:mod:`segrt.export.int8`: per-channel weights, norms and the head kept in float) calibrated on the calibration
  windows, run by OpenVINO's CPU plugin (int8 kernels between the QDQ pairs, f32 elsewhere). Built only when asked
  (``--int8``): its accuracy depends on calibration data representative of real scans, so give it
  ``--calibration DIR`` (on the random-weight wholeBody network, phantom-calibrated int8 disagreed with fp32 on a
  large share of voxels: ``benchmarks/results/cpu_runtimes_2026-11-26.json``).

``segrt export`` (the CLI) builds the installed variants by default (``cpu_variants="auto"``: bf16 where the CPU has
native bf16); the Python API builds only those asked for. The gate records how long each variant and ONNX Runtime
fp32 took per window on the export machine (``seconds_per_window`` / ``fp32_seconds_per_window``, medians); the
runtime picks the fastest variant that passed (:func:`segrt.engine.backends.select_backend`).

The gate (reference: ONNX Runtime fp32 on ``model_fp32.onnx``, i.e. the fp32 segrt result; ``samples``
batches of ``batch`` CT-like phantom patches after the spec's intensity ops, :func:`ct_like_patches`, and — with
``calibration`` — as many batches of windows of the user's own scans through the spec's preprocessing,
:mod:`segrt.export.calibration`, gated by the same rule; with calibration scans the CT-like patches are gated only
for a CT model (:func:`ct_spec`), else reported):

* per-class Dice of the argmax labels, pooled over all gate patches, ``>= MIN_CLASS_DICE`` (0.98) for
  every class that covers at least ``MIN_CLASS_VOXELS`` voxels in the reference or in the variant
  (smaller classes are reported, not gated: one flipped voxel moves their Dice by more than 2 %);
* finite logits.

The logit report (max / mean |Δlogit|, argmax agreement) is recorded as well, on the CT-like patches
and on as many standard-normal patches. A gate that fails does not stop the export: the variant is
recorded with ``passed: false`` and the reason, and the runtime refuses it saying why.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from segrt.errors import ExportError
from segrt.export.gate import _abs_diff_stats

__all__ = ["CPU_VARIANTS", "MIN_CLASS_DICE", "MIN_CLASS_VOXELS", "per_class_dice", "compare_runs",
           "gate_cpu_variant", "add_cpu_variants", "auto_cpu_variants"]

CPU_VARIANTS = ("openvino-bf16", "openvino-int8")
#: windows of the user's calibration scans int8's activation ranges are calibrated on (one at a time)
INT8_CALIBRATION_WINDOWS = 4
MIN_CLASS_DICE = 0.98
MIN_CLASS_VOXELS = 1000


def per_class_dice(ref: np.ndarray, got: np.ndarray, num_classes: int, min_voxels: int = MIN_CLASS_VOXELS) -> dict:
    """Per-class Dice of two label arrays (same shape), and which classes are large enough to gate.

    Returns ``{"dice": {class: dice}, "voxels": {class: reference voxels}, "gated": [classes],
    "worst_class", "worst_dice"}`` where ``gated`` are classes with ``>= min_voxels`` voxels in either array.
    """
    ref = np.asarray(ref).ravel().astype(np.int64)
    got = np.asarray(got).ravel().astype(np.int64)
    if ref.shape != got.shape:
        raise ExportError(f"per_class_dice: label arrays differ in size ({ref.size} vs {got.size})")
    a = np.bincount(ref, minlength=num_classes)
    b = np.bincount(got, minlength=num_classes)
    inter = np.bincount(ref[ref == got], minlength=num_classes)
    dice, voxels, gated = {}, {}, []
    for k in range(num_classes):
        if a[k] + b[k] == 0:
            continue
        dice[k] = float(2.0 * inter[k] / (a[k] + b[k]))
        voxels[k] = int(a[k])
        if max(a[k], b[k]) >= min_voxels:
            gated.append(k)
    worst = min(gated, key=lambda k: dice[k]) if gated else None
    return {"dice": dice, "voxels": voxels, "gated": gated, "worst_class": worst,
            "worst_dice": dice[worst] if worst is not None else None}


def compare_runs(ref_fn, got_fn, batches, num_classes: int, min_voxels: int = MIN_CLASS_VOXELS) -> dict:
    """Run both callables on every batch; logit statistics, argmax agreement and per-class Dice."""
    max_abs = sum_abs = scale = 0.0
    count = 0
    finite = True
    ref_labels, got_labels = [], []
    t_ref, t_got = [], []
    for x in batches:
        t0 = time.perf_counter()
        r = np.asarray(ref_fn(x), dtype=np.float32)
        t1 = time.perf_counter()
        g = np.asarray(got_fn(x), dtype=np.float32)
        t_got.append((time.perf_counter() - t1) / max(1, x.shape[0]))
        t_ref.append((t1 - t0) / max(1, x.shape[0]))
        if r.shape != g.shape:
            raise ExportError(f"outputs differ in shape: reference {list(r.shape)}, variant {list(g.shape)}")
        finite &= bool(np.isfinite(g).all())
        m, total = _abs_diff_stats(r, g)  # one class at a time: no full-size temporaries
        max_abs = max(max_abs, m)
        sum_abs += total
        count += r.size
        scale = max(scale, abs(float(r.max())), abs(float(r.min())))
        ref_labels.append(r.argmax(1).astype(np.int16 if r.shape[1] < 2 ** 15 else np.int32))
        got_labels.append(g.argmax(1).astype(np.int16 if g.shape[1] < 2 ** 15 else np.int32))
        del g
    ref_l = np.concatenate([x.ravel() for x in ref_labels])
    got_l = np.concatenate([x.ravel() for x in got_labels])
    pcd = per_class_dice(ref_l, got_l, num_classes, min_voxels)
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": sum_abs / max(count, 1),
            "max_abs_logit": scale, "argmax_agreement": float((ref_l == got_l).mean()), "finite": finite,
            "voxels": int(ref_l.size), "per_class_dice": pcd,
            "seconds_per_window": float(np.median(t_got)), "reference_seconds_per_window": float(np.median(t_ref))}


def _ort_fp32(fp32_path):
    import segrt.export.gate as gm

    sess = gm._session(fp32_path)
    return lambda x: gm._run_onnx(sess, x)


def ct_spec(spec) -> bool:
    """Whether the spec reads CT: an intensity window whose lower end is in Hounsfield units of air or fat
    (``scale_intensity_range`` with ``a_min <= -200``). Synthetic CT patches mean something only for such models."""
    return any(op.op == "scale_intensity_range" and isinstance(op.params.get("a_min"), (int, float))
               and op.params["a_min"] <= -200 for op in spec.preprocessing.intensity)


def gate_cpu_variant(variant: str, fp32_path, spec, *, samples: int = 2, batch: int = 2, seed: int = 0,
                     run=None, reference=None, threads: int | None = None, model_path=None,
                     calibration: list | None = None, ct_batches: list | None = None,
                     random_report: bool = True) -> dict:
    """Gate ``variant`` against ONNX Runtime fp32 on CT-like patches; return the report (never raises on a fail).

    ``run`` / ``reference`` (callables ``np → np``) replace the variant's backend / the ORT fp32 reference
    (tests use ``run`` to gate a deliberately broken variant). Raises :class:`ExportError` when the variant
    cannot be run here at all (e.g. openvino missing, no native bf16). ``model_path``: the variant's own model
    file (default: the fp32 ONNX). ``calibration``: batches of windows of the user's scans, gated as well.
    ``ct_batches``: the CT-like batches when the caller made them already. ``random_report``: also run the
    standard-normal patches (reported, not gated; ``export`` leaves them out to save time).
    """
    from segrt.export.fp16 import ct_like_patches
    import segrt.export.gate as gm

    if variant not in CPU_VARIANTS:
        raise ExportError(f"unknown CPU variant {variant!r}; expected one of {', '.join(CPU_VARIANTS)}")
    if samples < 1:
        raise ExportError(f"gate samples must be >= 1, got {samples}")
    if int(spec.in_channels) != 1 and not calibration:
        # the gate's CT-like patches need a single-channel CT model
        return {"passed": False, "reason": f"no CT-like gate for a {spec.in_channels}-channel model and no "
                                           f"calibration scans; the variant is recorded ungated and will not be "
                                           f"used (export with --calibration DIR)"}
    runtime = {}
    backend = None
    if run is None:
        from segrt.engine.backends.openvino_cpu import OpenVinoCpuBackend, variant_precision
        from segrt.errors import BackendUnavailable

        try:
            backend = OpenVinoCpuBackend(model_path or fp32_path, spec.in_channels, spec.num_classes,
                                         spec.inference.roi_size, batch, precision=variant_precision(variant),
                                         threads=threads, name=variant)
        except BackendUnavailable as exc:
            raise ExportError(f"cannot gate the {variant} CPU variant on this machine: {exc}") from None
        run = backend.infer
        runtime = {"runtime": f"OpenVINO {backend.info['openvino']} CPU plugin, inference precision "
                              f"{backend.precision}", "cpu": backend.info["cpu"],
                   "cpu_capabilities": backend.info["capabilities"]}
    ref_fn = reference if reference is not None else _ort_fp32(fp32_path)
    roi = tuple(int(r) for r in spec.inference.roi_size)
    t0 = time.perf_counter()
    cal = None
    try:
        ct = None
        if int(spec.in_channels) == 1:
            batches = ct_batches if ct_batches is not None else ct_like_patches(spec, samples, batch, seed + 1)
            ct = compare_runs(ref_fn, run, batches, spec.num_classes)
        if calibration:
            cal = compare_runs(ref_fn, run, calibration, spec.num_classes)
        rnd = None
        if random_report:
            rnd = compare_runs(ref_fn, run, gm._patches(seed, samples, (batch, int(spec.in_channels), *roi)),
                               spec.num_classes)
    finally:
        if backend is not None:
            backend.close()
    problems = []
    # with the user's scans, the synthetic CT patches are gated only for a CT model (for an MRI network they are
    # out of its input distribution, where no reduced precision is expected to agree); they are still reported
    ct_gated = ct is not None and (cal is None or ct_spec(spec))
    for what, rep in (("CT-like patches", ct if ct_gated else None), ("calibration windows", cal)):
        if rep is None:
            continue
        if not rep["finite"]:
            problems.append(f"non-finite logits on {what}")
        pcd = rep["per_class_dice"]
        bad = [k for k in pcd["gated"] if not pcd["dice"][k] >= MIN_CLASS_DICE]
        if bad:
            shown = ", ".join(f"class {k} {pcd['dice'][k]:.4f} ({pcd['voxels'][k]} voxels)"
                              for k in sorted(bad, key=lambda k: pcd["dice"][k])[:5])
            problems.append(f"per-class Dice below {MIN_CLASS_DICE} on {what} for {len(bad)} of "
                            f"{len(pcd['gated'])} gated classes: {shown}" + (" ..." if len(bad) > 5 else ""))
        if not pcd["gated"] and (what == "calibration windows" or cal is None):
            problems.append(f"no class covers {MIN_CLASS_VOXELS} voxels of the {what}")
    main = cal if cal is not None else ct
    pcd = main["per_class_dice"]
    worst = [r["per_class_dice"]["worst_dice"] for r in ((ct if ct_gated else None), cal) if r is not None
             and r["per_class_dice"]["worst_dice"] is not None]
    timed = [r for r in (ct, cal, rnd) if r is not None]
    for r in timed:  # JSON keys must be strings
        r["per_class_dice"] = {**r["per_class_dice"],
                               "dice": {str(k): round(v, 6) for k, v in r["per_class_dice"]["dice"].items()},
                               "voxels": {str(k): v for k, v in r["per_class_dice"]["voxels"].items()}}
    report = {
        "passed": not problems, "reason": "; ".join(problems) if problems else None, "problems": problems,
        "reference": "onnxruntime fp32 (CPUExecutionProvider) on model_fp32.onnx", **runtime,
        "samples": int(samples), "batch": int(batch), "seed": int(seed),
        "min_class_dice": MIN_CLASS_DICE, "min_class_voxels": MIN_CLASS_VOXELS,
        **({"ct_like": {**ct, "input_distribution": "synthetic CT phantom after the spec's intensity ops",
                        "gated": ct_gated}} if ct is not None else {}),
        **({"calibration": {**cal, "input_distribution": "windows of the user's calibration scans after the "
                                                         "spec's preprocessing"}} if cal is not None else {}),
        **({"random": {**rnd, "input_distribution": "standard normal float32 (logit report only, not gated)"}}
           if rnd is not None else {}),
        "worst_class_dice": min(worst) if worst else None, "worst_class": pcd["worst_class"],
        "max_abs_logit_diff": main["max_abs_logit_diff"], "argmax_agreement": main["argmax_agreement"],
        "seconds_per_window": float(np.median([r["seconds_per_window"] for r in timed])),
        "fp32_seconds_per_window": float(np.median([r["reference_seconds_per_window"] for r in timed])),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return report


def auto_cpu_variants() -> tuple[str, ...]:
    """The CPU variants worth building on this machine without being asked: OpenVINO bf16 where OpenVINO is
    installed and the CPU computes bf16 natively (int8 is built only on request: it wants calibration scans)."""
    try:
        from segrt.engine.backends.openvino_cpu import openvino_info

        return ("openvino-bf16",) if openvino_info().get("native_bf16") else ()
    except Exception:  # noqa: BLE001 - openvino missing or unusable: no variant
        return ()


def add_cpu_variants(tmp, spec, fp32_entry: dict, models: dict, gates: dict, cpu_variants, *,
                     samples: int, seed: int, calibration=None, progress=None) -> None:
    """Build (int8) and gate each requested CPU variant and record it in ``models`` / ``gates`` (called by
    ``export``). ``calibration``: a folder / list of the user's scans (:mod:`segrt.export.calibration`)."""
    from pathlib import Path

    from segrt.export.fp16 import ct_like_patches

    from segrt.export.gate import release_memory

    say = progress or (lambda msg: None)
    # one window per batch (half the memory of two; the fp32 gate has checked the dynamic batch already), twice as
    # many batches; a fixed-batch model runs its batch
    batch = fp32_entry.get("fixed_batch", 1)
    samples = samples * 2 if batch == 1 else samples
    cal = cal_int8 = None
    if calibration is not None:  # the scans are read and preprocessed once: gate windows and int8's, disjoint
        from segrt.export.calibration import calibration_patches

        say("reading the calibration scans")
        n_int8 = max(INT8_CALIBRATION_WINDOWS, samples) if "openvino-int8" in cpu_variants else 0
        drawn = calibration_patches(spec, calibration, samples * batch + n_int8, 1, seed=seed + 7)
        cal = [np.concatenate(drawn[i * batch:(i + 1) * batch]) for i in range(samples)]
        cal_int8 = drawn[samples * batch:]
    ct = ct_like_patches(spec, samples, batch, seed + 1) if int(spec.in_channels) == 1 else None
    # ONNX Runtime fp32 on every gate batch first, then its session is dropped: the variants' runtimes never hold
    # their memory beside ORT's, and the variants share the one reference pass
    fp32 = _ort_fp32(Path(tmp) / fp32_entry["path"])
    memo, per_window = {}, []
    for x in (ct or []) + (cal or []):
        t0 = time.perf_counter()
        memo[id(x)] = fp32(x)
        per_window.append((time.perf_counter() - t0) / max(1, x.shape[0]))
    fp32_seconds = float(np.median(per_window)) if per_window else None
    del fp32
    release_memory()

    def reference(x):
        return memo[id(x)]

    io_keys = ("input_name", "output_name", "input_shape", "output_shape", "opset", "fixed_batch")
    # OpenVINO runs the fused-norm form when the fp32 ONNX had its instance norms rewritten for ORT
    fused = (fp32_entry.get("instance_norm") or {}).get("fused_path")
    source = {"path": fused, "sha256": fp32_entry["instance_norm"]["fused_sha256"]} if fused else \
        {"path": fp32_entry["path"], "sha256": fp32_entry["sha256"]}
    for variant in cpu_variants:
        if variant not in CPU_VARIANTS:
            raise ExportError(f"unknown CPU variant {variant!r}; expected one of {', '.join(CPU_VARIANTS)}")
        model_path = Path(tmp) / source["path"]
        if variant == "openvino-int8":
            from segrt.artifact import sha256_file
            from segrt.export.int8 import MODEL_INT8, quantize_int8

            if cal_int8 is not None:  # more windows of the user's scans than the gate uses: ranges need them
                windows = cal_int8
            elif int(spec.in_channels) == 1:
                windows = ct_like_patches(spec, max(2, samples), 2, seed + 3)
            else:
                raise ExportError(f"int8 needs calibration windows: a {spec.in_channels}-channel model has no "
                                  f"synthetic CT calibration; export with --calibration DIR")
            say(f"quantizing to int8 on {sum(w.shape[0] for w in windows)} calibration windows")
            info = quantize_int8(model_path, Path(tmp) / MODEL_INT8, windows,
                                 input_name=fp32_entry.get("input_name", "input"))
            info["calibrated_on"] = "the user's scans" if cal is not None else "synthetic CT-like patches"
            model_path = Path(tmp) / MODEL_INT8
            models[variant] = {"path": MODEL_INT8, "sha256": sha256_file(model_path), "format": "onnx",
                               **{k: fp32_entry[k] for k in io_keys if k in fp32_entry}, **info,
                               "runtime": "openvino", "inference_precision": "int8 (QDQ) / f32",
                               "note": "int8 QDQ ONNX run by OpenVINO's CPU plugin"}
        else:
            models[variant] = {**{k: fp32_entry[k] for k in ("format",) + io_keys if k in fp32_entry}, **source,
                               "runtime": "openvino", "inference_precision": "bf16",
                               "note": "the fp32 ONNX" + (" with its fused instance norms" if fused else "") +
                                       ", run by OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT=bf16"}
        say(f"gating {variant}")
        report = gate_cpu_variant(variant, Path(tmp) / fp32_entry["path"], spec, samples=samples, seed=seed,
                                  batch=batch, model_path=model_path, calibration=cal, ct_batches=ct,
                                  reference=reference, random_report=False)
        if fp32_seconds is not None:  # the shared reference was computed above: its timing is this one
            report["fp32_seconds_per_window"] = fp32_seconds
            for part in ("ct_like", "calibration"):
                if part in report:
                    report[part]["reference_seconds_per_window"] = fp32_seconds
        gates[variant] = report
        release_memory()
        if not report["passed"]:
            warnings.warn(f"CPU variant {variant} failed its accuracy gate and will not be used: "
                          f"{report['reason']}", UserWarning, stacklevel=3)
