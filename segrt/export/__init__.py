"""Export a model source (MONAI bundle, TorchScript file, ONNX file) to a segrt artifact.

This is the only part of segrt that needs torch / monai / onnx (the ``[export]`` extra); they are
imported lazily, so ``import segrt.export`` is cheap.

    export(source, out_dir, *, spec=None, random_init=False, overrides=None, gate_samples=2) -> Path
    spec_from_bundle(bundle_dir, overrides=None) -> Spec

Size: over 400 lines because the export orchestration in one place: source detection, the ONNX-source checks, the
optional variants, the manifest and the atomic publish; each step's work is in its own module (bundle, onnx, gate,
fp16, cpu_variants, tensorrt, torch_program).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from segrt.artifact import MANIFEST, SCHEMA, SCHEMA_VERSION, sha256_file, write_json_atomic
from segrt.errors import ExportError, SpecError
from segrt.safety import check_output_dir
from segrt.export.bundle import gaussian_profiles, load_bundle, spec_from_bundle
from segrt.spec import Spec

__all__ = ["export", "spec_from_bundle", "MODEL_FP32", "MODEL_FP16", "MODEL_PLAN"]

log = logging.getLogger(__name__)

MODEL_FP32 = "model_fp32.onnx"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _read_spec(spec) -> tuple[Spec | None, dict | None, Path | None]:
    """The spec, its ``"network"`` section (validated; not part of the artifact's spec) and the folder the
    section's relative paths start from."""
    if spec is None or isinstance(spec, Spec):
        return spec, None, None
    base = None
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if not p.is_file():
            raise SpecError(f"spec file {str(p)!r} does not exist")
        try:
            spec = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec file {str(p)!r} is not valid JSON: {exc}") from None
        base = p.resolve().parent
        if not isinstance(spec, dict):
            raise SpecError(f"spec file {str(p)!r} must hold a JSON object, got {type(spec).__name__}")
    if isinstance(spec, dict):
        network = None
        if "network" in spec:
            from segrt.export.network import check_network_section

            spec = dict(spec)
            network = check_network_section(spec.pop("network"))
        return Spec.from_dict(spec), network, base
    raise SpecError(f"spec must be a path, a dict or a Spec, got {type(spec).__name__}")


def _with_profiles(spec: Spec) -> Spec:
    """Add torch-computed Gaussian profiles to a gaussian spec that lacks them."""
    inf = spec.inference
    if inf.blend_mode != "gaussian" or inf.importance_profiles is not None:
        return spec
    import dataclasses

    new_inf = dataclasses.replace(inf, importance_profiles=gaussian_profiles(inf.roi_size, inf.sigma_scale))
    return dataclasses.replace(spec, inference=new_inf)


def _versions(opset) -> dict:
    import importlib.metadata as md

    out = {}
    for key, dist in (("segrt", "segrt"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                      ("torch", "torch"), ("monai", "monai")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            out[key] = None
    if out["segrt"] is None:
        import segrt

        out["segrt"] = getattr(segrt, "__version__", None)
    out["opset"] = opset
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=repr))


def _is_artifact_dir(p: Path) -> bool:
    try:
        return json.loads((p / MANIFEST).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out: Path, force: bool) -> None:
    """Whether an existing, non-empty ``out`` may be replaced (the path itself is checked by
    :func:`segrt.safety.check_output_dir` first: a directory or nothing, in an existing, writable parent)."""
    if out.is_dir():
        if any(out.iterdir()):
            if not _is_artifact_dir(out):
                raise ExportError(f"output directory {str(out)!r} exists, is not empty and is not a segrt "
                                  f"artifact; refusing to overwrite it (choose another path or remove it)")
            if not force:
                raise ExportError(f"output directory {str(out)!r} already holds a segrt artifact; pass "
                                  f"force=True (--force) to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir into place; an existing artifact is swapped out, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _detect_kind(src: Path, network: dict | None = None) -> str:
    if not src.exists():
        raise ExportError(f"export source {str(src)!r} does not exist (expected a MONAI bundle directory, "
                          f"a TorchScript file, a state dict with a spec naming its network class, or an ONNX "
                          f"file)")
    if src.is_dir():
        if network is not None:
            raise ExportError(f"the spec names a network class, but the source {str(src)!r} is a folder; a "
                              f"'network' section goes with a state-dict file (.pt / .pth)")
        return "bundle"
    if src.suffix.lower() == ".onnx":
        if network is not None:
            raise ExportError(f"the spec names a network class, but the source {str(src)!r} is an ONNX file, "
                              f"which carries its own network; remove the spec's 'network' section")
        return "onnx"
    return "state_dict" if network is not None else "torchscript"


def _is_module(source) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - an object that is not a path needs torch anyway
        return False
    return isinstance(source, torch.nn.Module)


def _load_torchscript(src: Path):
    import torch

    try:
        model = torch.jit.load(str(src), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and others
        raise ExportError(f"{str(src)!r} is not a TorchScript module loadable with torch.jit.load "
                          f"({type(exc).__name__}: {str(exc)[:200]}); a plain state dict needs its network "
                          f"class: add \"network\": {{\"class\": \"module:Class\", \"kwargs\": {{...}}}} to "
                          f"the spec (or export its MONAI bundle directory)") from exc
    return model.eval()


def _meta_forward(model, x):
    """The network's output *shapes* without computing it: a copy on torch's meta device (a 105-class SegResNet at
    96³ takes 6 s of CPU for a real forward, this a few ms). None when that cannot run (TorchScript modules,
    data-dependent control flow, ops without meta kernels): the caller then runs the real forward."""
    import copy

    import torch

    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return None
    try:
        meta = copy.deepcopy(model).to("meta")
        with torch.no_grad():
            y = meta(x.to("meta"))
    except Exception:  # noqa: BLE001 - anything the meta device cannot do
        return None
    if isinstance(y, torch.Tensor) or (isinstance(y, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in y)):
        return y
    return None


def _check_forward(model, spec: Spec) -> dict:
    """One forward at roi size: the output must be (1, num_classes, *roi_size).

    Tried at batch 1, then at the spec's ``sw_batch_size`` (a network with its batch size baked in).
    A network that returns a tuple/list of tensors (deep supervision, nnU-Net style: the full-resolution head
    first, lower resolutions after) is accepted when exactly one of its outputs has that shape; the returned
    dict (``{}`` for a single tensor) holds ``output_index`` and ``outputs_seen`` for the manifest."""
    import torch

    roi = tuple(spec.inference.roi_size)
    sizes = [1] + ([spec.inference.sw_batch_size] if spec.inference.sw_batch_size > 1 else [])
    for n in sizes:  # a network with its batch baked in runs only at that batch (export then fixes the batch)
        x = torch.zeros((n, spec.in_channels, *roi), dtype=torch.float32)
        try:
            y = _meta_forward(model, x)
            if y is None:  # no shape-only run: a real forward
                with torch.no_grad():
                    y = model(x)
            break
        except Exception as exc:  # noqa: BLE001
            if n == sizes[-1]:
                tried = " and ".join(f"({b}, {spec.in_channels}, {', '.join(map(str, roi))})" for b in sizes)
                raise ExportError(f"the network fails on a {tried} input: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}") from exc
    want = (n, spec.num_classes, *roi)
    if isinstance(y, (tuple, list)):
        if not y or not all(isinstance(t, torch.Tensor) for t in y):
            raise ExportError(f"the network returns a {type(y).__name__} of "
                              f"{[type(t).__name__ for t in y]}; expected tensors")
        seen = [list(t.shape) for t in y]
        hits = [i for i, t in enumerate(y) if tuple(t.shape) == want]
        if len(hits) != 1:
            which = "none" if not hits else f"{len(hits)} (indices {hits})"
            raise ExportError(f"the network returns a {type(y).__name__} of {len(y)} outputs with shapes {seen}; "
                              f"{which} of them has the shape {list(want)} (batch, num_classes="
                              f"{spec.num_classes}, *roi_size), so the segmentation output is ambiguous")
        return {"output_index": hits[0], "outputs_seen": seen}
    if not isinstance(y, torch.Tensor):
        raise ExportError(f"the network returns a {type(y).__name__}; expected a tensor")
    if tuple(y.shape) != want:
        raise ExportError(f"the network output has shape {tuple(y.shape)}, expected {want} "
                          f"(batch, num_classes={spec.num_classes}, *roi_size)")
    return {}


def _select_output(model, index: int, example=None):
    """Wrap a multi-output network so that it returns only output ``index`` (one ONNX output).

    A TorchScript network is wrapped, then traced with ``example`` (the ONNX TorchScript exporter cannot trace
    an nn.Module that calls a loaded ScriptModule; ``torch.jit.trace`` can, and keeps the scripted network's
    graph, control flow included, as a call)."""
    import torch

    class SelectOutput(torch.nn.Module):
        def __init__(self, net, i: int):
            super().__init__()
            self.net = net
            self.index = int(i)

        def forward(self, x):
            return self.net(x)[self.index]

    wrapper = SelectOutput(model, index).eval()
    if example is not None and isinstance(model, torch.jit.ScriptModule):
        with torch.no_grad():
            wrapper = torch.jit.trace(wrapper, example, check_trace=False).eval()
    return wrapper


def _onnx_source(src: Path, tmp: Path, spec: Spec, gate_samples: int) -> tuple[dict, dict]:
    """Copy an ONNX source into the artifact, validate it against the spec, run it."""
    import onnx

    from segrt.export.gate import check_onnx_only, gate_seed
    from segrt.export.onnx import MIN_OPSET, onnx_io

    io_ = onnx_io(src)
    dst = tmp / MODEL_FP32
    if io_["external_data"]:
        from segrt.artifact import contained_file
        from segrt.onnxproto import external_data_locations

        for loc in external_data_locations(src):  # checked before onnx opens any of them
            contained_file(src.parent, loc, "external data file", owner=f"ONNX source {str(src)!r}",
                           error=ExportError)
        model = onnx.load(str(src))  # pulls the external tensors in; saved as one file
        onnx.save(model, str(dst))
    else:
        shutil.copyfile(src, dst)
    try:
        onnx.checker.check_model(str(dst))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{src}: fails onnx.checker: {exc}") from exc
    if io_["opset"] is not None and io_["opset"] < MIN_OPSET:
        warnings.warn(f"{src}: opset {io_['opset']} is below {MIN_OPSET}", stacklevel=3)
    roi = list(spec.inference.roi_size)
    ish, osh = io_["input_shape"], io_["output_shape"]
    if len(ish) != 5 or len(osh) != 5:
        raise ExportError(f"{src}: expected 5-D input and output (batch, C, x, y, z), got input {ish} and "
                          f"output {osh}")

    def fixed_mismatch(got, want):
        return [i for i, (g, w) in enumerate(zip(got, want)) if isinstance(g, int) and g != w]

    if fixed_mismatch(ish[1:], [spec.in_channels, *roi]):
        raise ExportError(f"{src}: input shape {ish} does not match the spec (batch, in_channels="
                          f"{spec.in_channels}, roi_size={roi})")
    if fixed_mismatch(osh[1:], [spec.num_classes, *roi]):
        raise ExportError(f"{src}: output shape {osh} does not match the spec (batch, num_classes="
                          f"{spec.num_classes}, roi_size={roi})")
    batch = ish[0]
    if isinstance(batch, int) and batch != spec.inference.sw_batch_size:
        raise ExportError(f"{src}: the input has a fixed batch of {batch}, but the spec's sw_batch_size is "
                          f"{spec.inference.sw_batch_size}; export with a dynamic batch dimension or "
                          f"set sw_batch_size={batch}")
    run_batch = batch if isinstance(batch, int) else 2
    digest = sha256_file(dst)
    report = check_onnx_only(dst, input_shape=(run_batch, spec.in_channels, *roi), num_classes=spec.num_classes,
                             roi_size=roi, samples=gate_samples, seed=gate_seed("onnx-only", digest))
    b = batch if isinstance(batch, int) else "batch"
    entry = {
        "path": MODEL_FP32, "sha256": digest, "format": "onnx",
        "input_name": io_["input_name"], "output_name": io_["output_name"],
        "input_shape": [b, spec.in_channels, *roi], "output_shape": [b, spec.num_classes, *roi],
        "opset": io_["opset"], "exporter": "copied",
        "exporter_note": "the ONNX source file was copied" + (
            " (external data embedded)" if io_["external_data"] else ""),
    }
    if isinstance(batch, int):
        entry["fixed_batch"] = batch
    return entry, report


MODEL_FP16 = "model_fp16.onnx"
MODEL_FP32_FUSED = "model_fp32_fused.onnx"  # the fused-norm fp32 ONNX, kept for OpenVINO when ORT's is rewritten
MODEL_PLAN = "model.plan"


def _retry_with_accurate_norms(model, tmp: Path, entry: dict, report: dict, gate_kw: dict, say):
    """The fp32 gate failed: when the ONNX model has instance norms, rewrite them into the staged two-pass form
    (:mod:`segrt.export.normfix`: ONNX Runtime's fused kernel sums a channel in one float32 pass, which deep
    instance-norm networks amplify) and gate again; raise :class:`GateFailed` when that does not pass either."""
    import onnx

    from segrt.errors import GateFailed
    from segrt.export.gate import run_gate
    from segrt.export.normfix import decompose_instance_norms

    problems = "; ".join(report.get("problems", [])) or "failed"
    m = onnx.load(str(tmp / MODEL_FP32))
    if not any(n.op_type == "InstanceNormalization" for n in m.graph.node):
        raise GateFailed(f"accuracy gate failed (torch vs ONNX Runtime): {problems}", report)
    say("the fp32 gate failed with ONNX Runtime's fused instance norm; retrying with the staged two-pass form")
    shutil.copyfile(tmp / MODEL_FP32, tmp / MODEL_FP32_FUSED)  # OpenVINO's variants run the fused form
    n = decompose_instance_norms(m)
    onnx.save(m, str(tmp / MODEL_FP32))
    del m
    fused = {k: report.get(k) for k in ("max_abs_logit_diff", "tolerance_max_abs", "argmax_agreement")}
    entry = {**entry, "sha256": sha256_file(tmp / MODEL_FP32),
             "instance_norm": {"form": "staged two-pass (segrt.export.normfix)", "rewritten": n,
                               "why": f"the fused InstanceNormalization failed the fp32 gate: {problems}",
                               "fused_gate": fused, "fused_path": MODEL_FP32_FUSED,
                               "fused_sha256": sha256_file(tmp / MODEL_FP32_FUSED)}}
    report = run_gate(model, tmp / MODEL_FP32, **gate_kw)  # raises GateFailed when it fails again
    report["note"] = "gated after the instance-norm rewrite; the fused form's figures are in models.fp32.instance_norm"
    return entry, report


def _extra_variants(tmp: Path, model, spec: Spec, fp32_entry: dict, models: dict, gates: dict, *,
                    variants, torch_program: bool, tensorrt: bool, gate_samples: int,
                    trt_timing_cache) -> None:
    """Write, gate and record the optional fp16 ONNX, torch program and TensorRT plan."""
    if not ("fp16" in variants or torch_program or tensorrt):
        return
    if "fixed_batch" in fp32_entry:
        asked = [n for n, on in (("fp16", "fp16" in variants), ("torch_program", torch_program),
                                 ("tensorrt", tensorrt)) if on]
        raise ExportError(f"the network exported only with a fixed batch of {fp32_entry['fixed_batch']} "
                          f"({fp32_entry.get('exporter_note', 'no reason recorded')}); {', '.join(asked)} "
                          f"need a dynamic batch: export without them")
    from segrt.export.gate import _run_onnx, _session, gate_seed

    if model is not None:
        reference, ref_name = model, "torch fp32"
    else:
        sess32 = _session(tmp / MODEL_FP32)
        reference, ref_name = (lambda x: _run_onnx(sess32, x)), "fp32 ONNX (onnxruntime CPU)"
    io_fields = {k: fp32_entry[k] for k in ("input_name", "output_name", "input_shape", "output_shape",
                                            "opset") if k in fp32_entry}
    if "fp16" in variants:
        from segrt.export.fp16 import export_fp16, gate_fp16

        info = export_fp16(tmp / MODEL_FP32, tmp / MODEL_FP16)
        digest = sha256_file(tmp / MODEL_FP16)
        models["fp16"] = {"path": MODEL_FP16, "sha256": digest, "format": "onnx", **io_fields, **info}
        gates["fp16"] = gate_fp16(reference, tmp / MODEL_FP16, spec, samples=gate_samples,
                                  seed=gate_seed("fp16", digest), reference_name=ref_name)
    if torch_program:
        from segrt.export.torch_program import export_torch_program

        info = export_torch_program(model, tmp, in_channels=spec.in_channels, roi_size=spec.inference.roi_size)
        digest = sha256_file(tmp / info["path"])
        models["torch"] = {**info, "sha256": digest}
        gates["torch"] = {
            "passed": True, "reference": "torch model", "runtime": "the saved program, reloaded, CPU fp32",
            "max_abs_logit_diff": info["check_max_abs_diff"], "batch": 2,
            "note": "checks the saved program computes the model; its fp16 CUDA run (autocast) is compared "
                    "with ONNX Runtime by the GPU tests of tests/test_backends.py",
        }
    if tensorrt:
        from segrt.engine.backends.tensorrt import TensorRTBackend
        from segrt.export.fp16 import find_norm_regions, gate_reduced_precision
        from segrt.export.tensorrt import build_plan
        import onnx

        fp32_model = onnx.load(str(tmp / MODEL_FP32))
        names = [n for r in find_norm_regions(fp32_model) for n in r.nodes]
        info = build_plan(tmp / MODEL_FP32, tmp / MODEL_PLAN, max_batch=spec.inference.sw_batch_size,
                          in_channels=spec.in_channels, roi_size=spec.inference.roi_size, fp16=True,
                          fp32_node_names=names, input_name=fp32_entry.get("input_name", "input"),
                          timing_cache=trt_timing_cache)
        digest = sha256_file(tmp / MODEL_PLAN)
        entry = {"path": MODEL_PLAN, "sha256": digest, **info,
                 "output_name": fp32_entry.get("output_name", "output")}
        backend = TensorRTBackend(tmp / MODEL_PLAN, entry, spec.in_channels, spec.num_classes,
                                  spec.inference.roi_size, spec.inference.sw_batch_size)
        try:
            gates["tensorrt"] = gate_reduced_precision(
                reference, backend.infer, spec, samples=gate_samples, seed=gate_seed("tensorrt", digest),
                batch=min(2, int(info["max_batch"])), what="TensorRT plan",
                runtime=f"TensorRT {info['tensorrt_version']} on {info['gpu_name']}", reference_name=ref_name)
        finally:
            backend.close()
        models["tensorrt"] = entry


# ---------------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------------

def export(source, out_dir, *, spec=None, random_init: bool = False, overrides: dict | None = None,
           gate_samples: int = 1, force: bool = False, opset: int | None = None, exporter: str = "auto",
           seed: int = 0, variants=("fp32",), torch_program: bool = False, tensorrt: bool = False,
           trt_timing_cache=None, cpu_variants=(), calibration=None, progress=None) -> Path:
    """Export ``source`` to the artifact directory ``out_dir`` and return its path.

    ``source`` is a MONAI bundle directory, a TorchScript file (``torch.jit.load``-able; needs
    ``spec``), a state dict (``.pt``/``.pth``; needs a ``spec`` with a ``"network"`` section naming the class,
    :mod:`segrt.export.network`), an in-memory ``torch.nn.Module`` (needs ``spec``) or an ONNX file (needs
    ``spec``). ``spec`` (path to JSON, dict or :class:`Spec`)
    replaces the spec derived from a bundle. ``random_init`` lets a bundle without its weights file
    export with (seeded) random weights - a warning is issued and the manifest records it.
    ``overrides`` are bundle config overrides (id → value). The fp32 model is checked by the accuracy
    gate (:mod:`segrt.export.gate`) on ``gate_samples`` random batches; the artifact is built in a
    temporary directory beside ``out_dir`` and renamed into place only when everything passed.
    An existing, non-empty ``out_dir`` is replaced only if it is a segrt artifact and ``force`` is
    true; any other non-empty directory is never touched. ``opset`` (default 18, >= 17) and
    ``exporter`` (``"auto"``: dynamo, TorchScript as fallback) tune the ONNX export; ``seed`` seeds
    the random initialisation.

    Optional extra models (each gated, each recorded in ``models`` and ``gate`` of the manifest):
    ``variants=("fp32", "fp16")`` adds ``model_fp16.onnx`` (normalisations kept fp32,
    :mod:`segrt.export.fp16`), gated against the fp32 reference on random and CT-like patches;
    ``torch_program=True`` adds the torch program of the torch-CUDA backend (``models["torch"]``,
    :mod:`segrt.export.torch_program`; needs a bundle or TorchScript source); ``tensorrt=True``
    builds a TensorRT plan for this machine's GPU (``models["tensorrt"]``,
    :mod:`segrt.export.tensorrt`; needs TensorRT >= 10 and a GPU), with its timing cache at
    ``trt_timing_cache`` (default ``~/.cache/segrt/tensorrt_timing.cache``).
    ``cpu_variants=("openvino-bf16", "openvino-int8")`` records reduced-precision CPU variants, each gated against
    ONNX Runtime fp32 (per-class Dice on CT-like patches and on ``calibration`` windows,
    :mod:`segrt.export.cpu_variants`); ``"auto"``: those this machine runs fast (bf16 where the CPU has native
    bf16; what ``segrt export`` does by default). A variant that fails its gate is recorded with the reason and
    refused at run time. ``calibration``: a folder (or list) of the user's own scans whose windows, after the spec's
    preprocessing, gate the CPU variants and calibrate int8 (:mod:`segrt.export.calibration`).
    ``progress``: a callable taking one line per export step (the CLI prints them).
    """
    from segrt.export.onnx import DEFAULT_OPSET, export_onnx
    from segrt.export.gate import gate_seed, run_gate

    opset = DEFAULT_OPSET if opset is None else int(opset)
    if int(gate_samples) < 1:
        raise ExportError(f"gate_samples must be >= 1, got {gate_samples}")
    variants = tuple(variants)
    if "fp32" not in variants or any(v not in ("fp32", "fp16") for v in variants):
        raise ExportError(f"variants must include 'fp32' and may add 'fp16', got {list(variants)}")
    from segrt.export.cpu_variants import CPU_VARIANTS, auto_cpu_variants

    if cpu_variants == "auto":
        cpu_variants = auto_cpu_variants()
    cpu_variants = (cpu_variants,) if isinstance(cpu_variants, str) else tuple(cpu_variants or ())
    if any(v not in CPU_VARIANTS for v in cpu_variants):
        raise ExportError(f"cpu_variants may hold {', '.join(map(repr, CPU_VARIANTS))} or be 'auto', got "
                          f"{list(cpu_variants)}")
    if calibration is not None:
        from segrt.export.calibration import calibration_scans

        calibration_scans(calibration)  # a missing or empty folder fails before any work
    say = progress or (lambda msg: None)
    user_spec, network, spec_dir = _read_spec(spec)
    module_source = _is_module(source)
    src = Path(f"<{type(source).__name__}>") if module_source else Path(source)
    out = Path(out_dir).absolute()
    if module_source and network is not None:
        raise ExportError("the source is an nn.Module already; remove the spec's 'network' section")
    kind = "module" if module_source else _detect_kind(src, network)
    if torch_program and kind == "onnx":
        raise ExportError("torch_program needs a torch source (a bundle or a TorchScript file); an ONNX "
                          "source has no torch network to save")
    if kind != "bundle" and user_spec is None:
        raise ExportError(f"a {kind} source ({str(src)!r}) carries no preprocessing/inference settings; "
                          f"pass a spec (--spec spec.json)")
    if kind != "bundle" and overrides:
        raise ExportError(f"overrides apply to bundle configs only, got them for a {kind} source")
    if kind != "bundle" and random_init:
        raise ExportError(f"random_init applies to bundles without their weights file only; a {kind} "
                          f"source carries its own weights")
    check_output_dir(out, sources=[] if module_source else [src], what="artifact directory")
    _check_out_dir(out, force)

    t_start = time.perf_counter()
    source_info: dict = {"kind": kind, "path": None if module_source else str(src.resolve()),
                         "name": type(source).__name__ if module_source else src.name if kind == "bundle"
                         else src.stem, "overrides": _jsonable(overrides or {}), "bundle_version": None}
    model = None
    if kind == "bundle":
        loaded = load_bundle(src, overrides, random_init=random_init, seed=seed)
        model = loaded.network
        weights = loaded.weights
        source_info["name"] = loaded.name
        source_info["bundle_version"] = loaded.version
        source_info["spec_from"] = "user" if user_spec is not None else "bundle"
        the_spec = user_spec if user_spec is not None else loaded.spec
    elif kind == "torchscript":
        model = _load_torchscript(src)
        weights = {"random_init": False, "path": str(src.resolve()), "sha256": sha256_file(src)}
        the_spec = user_spec
        source_info["spec_from"] = "user"
    elif kind == "state_dict":
        from segrt.export.network import load_network

        model, source_info["network"] = load_network(src, network, spec_dir)
        source_info["network"]["kwargs"] = _jsonable(source_info["network"]["kwargs"])
        weights = {"random_init": False, "path": str(src.resolve()), "sha256": sha256_file(src)}
        the_spec = user_spec
        source_info["spec_from"] = "user"
    elif kind == "module":
        model = source.eval()
        weights = {"random_init": False, "path": None, "sha256": None,
                   "note": "an in-memory torch.nn.Module passed to segrt.export"}
        the_spec = user_spec
        source_info["spec_from"] = "user"
    else:
        weights = {"random_init": False, "path": str(src.resolve()), "sha256": sha256_file(src)}
        the_spec = user_spec
        source_info["spec_from"] = "user"
    try:
        the_spec = _with_profiles(the_spec)
    except ImportError:  # no torch (ONNX source): the runtime computes the profiles itself
        pass

    if weights.get("random_init"):
        msg = (f"exporting {str(src)!r} with RANDOM weights ({weights.get('expected_path')} is missing): "
               f"the artifact's predictions are meaningless; the manifest records random_init=true")
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if model is not None:
            picked = _check_forward(model, the_spec)
            if picked:
                import torch

                n = picked["outputs_seen"][picked["output_index"]][0]  # 1, or a baked-in batch
                example = torch.zeros((n, the_spec.in_channels, *the_spec.inference.roi_size))
                model = _select_output(model, picked["output_index"], example)
            say("exporting the network to ONNX")
            entry = export_onnx(model, tmp / MODEL_FP32, in_channels=the_spec.in_channels,
                                roi_size=the_spec.inference.roi_size, num_classes=the_spec.num_classes,
                                opset=opset, exporter=exporter, fixed_batch=the_spec.inference.sw_batch_size)
            digest = sha256_file(tmp / MODEL_FP32)
            entry = {"path": MODEL_FP32, "sha256": digest, "format": "onnx", **entry, **picked}
            entry.pop("external_data", None)
            say("gating the fp32 ONNX against torch")
            gate_kw = dict(in_channels=the_spec.in_channels, roi_size=the_spec.inference.roi_size,
                           num_classes=the_spec.num_classes, samples=int(gate_samples),
                           seed=gate_seed("fp32", digest),
                           **({"batch": entry["fixed_batch"], "split_torch": False} if "fixed_batch" in entry
                              else {}))
            report = run_gate(model, tmp / MODEL_FP32, raise_on_fail=False, **gate_kw)
            if not report["passed"]:
                entry, report = _retry_with_accurate_norms(model, tmp, entry, report, gate_kw, say)
            used_opset = entry.get("opset", opset)
        else:
            entry, report = _onnx_source(src, tmp, the_spec, int(gate_samples))
            used_opset = entry.get("opset")
        models = {"fp32": entry}
        gates = {"fp32": report}
        from segrt.export.gate import release_memory

        release_memory()
        _extra_variants(tmp, model, the_spec, entry, models, gates, variants=variants,
                        torch_program=torch_program, tensorrt=tensorrt, gate_samples=int(gate_samples),
                        trt_timing_cache=trt_timing_cache)
        if cpu_variants:
            from segrt.export.cpu_variants import add_cpu_variants

            add_cpu_variants(tmp, the_spec, entry, models, gates, tuple(cpu_variants), samples=int(gate_samples),
                             seed=gate_seed("cpu", entry["sha256"]), calibration=calibration, progress=say)
        manifest = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": _versions(used_opset),
            "source": source_info,
            "weights": weights,
            "spec": the_spec.to_dict(),
            "models": models,
            "gate": gates,
            "export_seconds": round(time.perf_counter() - t_start, 3),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (gate: %s)", src, out, report.get("passed"))
    return out


class _CallableModule(type(json)):
    """``segrt.export`` is both this subpackage and the top-level ``segrt.export(...)`` function.

    Importing the subpackage rebinds the attribute ``segrt.export`` to the module, which would hide
    the function; making the module callable keeps ``segrt.export(source, out_dir, ...)`` working.
    """

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
