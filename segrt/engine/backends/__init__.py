"""Runtime backends: each turns a batch of patches (B, C, *roi) float32 into logits (B, K, *roi) float32.

Backends follow one lifecycle (after Polygraphy's runners): construct from an artifact's model entry, ``infer``
many batches, ``close``; usable as context managers. Heavy libraries (torch, tensorrt) are imported only inside
the backend that needs them. Each backend has a ``name`` and declares its :class:`~segrt.engine.backends.base.Capabilities`
(device, device arrays, fresh outputs, max batch, threads, workspace); those with ``device_arrays`` also have
``infer_torch(tensor) -> tensor`` (data stays on the device).

``select_backend`` implements ``device="auto"``: a valid TensorRT plan → ONNX Runtime CUDA → torch CUDA →
the CPU, and says what it picked and why each faster candidate was rejected. On the CPU (``"cpu"``, and
``"auto"`` without a GPU) it takes the artifact's fastest CPU variant whose export-time gate passed (OpenVINO int8
or bf16, ordered by the gate's measured time per window: :func:`cpu_variants_by_speed`) and falls back to ONNX
Runtime fp32, logging why.
"""

from __future__ import annotations

import logging

from segrt.errors import ArtifactError, BackendUnavailable
from segrt.engine.backends.base import Backend
from segrt.engine.backends.ort_cpu import OrtCpuBackend

__all__ = ["Backend", "OrtCpuBackend", "select_backend", "DEVICES", "GPU_ORDER", "CPU_ORDER"]

log = logging.getLogger("segrt")

DEVICES = ("auto", "cpu", "cuda", "tensorrt", "ort-cuda", "torch-cuda", "ort-cpu", "openvino")
GPU_ORDER = ("tensorrt", "ort-cuda", "torch-cuda")
#: reduced-precision CPU variants, in the order tried when the artifact records no timing (fastest first as a rule);
#: each is used only if its export-time gate passed, and those with a gate timing are tried fastest first
CPU_ORDER = ("openvino-int8", "openvino-bf16")
VARIANTS = (None, "fp32", "fp16")


def _onnx_variant(artifact, variant):
    """The ONNX model a GPU ORT session runs: the asked one, else fp16 when the artifact has it."""
    if variant is not None:
        return variant
    return "fp16" if "fp16" in artifact.variants else "fp32"


UNTRUSTED_TORCH_PROGRAM = (
    "torch-cuda: the artifact's torch program is loaded with pickle (torch.export.load / torch.jit.load can run "
    "code from the file), and segrt runs no code from an artifact unless told to: pass trust_torch_program=True "
    "(segrt run --trust-torch-program) for an artifact you exported or trust")


def _make(kind: str, artifact, variant, threads, gpu_batch: int | None = None, trust_torch_program: bool = False):
    """Construct one backend or raise BackendUnavailable with the reason."""
    if kind == "tensorrt":
        if "tensorrt" not in artifact.variants:
            raise BackendUnavailable("the artifact has no TensorRT plan")
        entry = artifact.model_entry("tensorrt")
        if variant == "fp32" and str(entry.get("precision", "")).startswith("fp16"):
            raise BackendUnavailable("the TensorRT plan is fp16 and variant='fp32' was asked for")
        from segrt.engine.backends.tensorrt import TensorRTBackend

        return TensorRTBackend.from_artifact(artifact, **({} if gpu_batch is None else {"max_batch": gpu_batch}))
    if kind == "ort-cuda":
        from segrt.engine.backends.ort_cuda import OrtCudaBackend

        return OrtCudaBackend.from_artifact(artifact, variant=_onnx_variant(artifact, variant), max_batch=gpu_batch)
    if kind == "torch-cuda":
        from segrt.engine.backends.torch_cuda import TorchCudaBackend

        TorchCudaBackend.check_cuda()
        if "torch" in artifact.variants and not trust_torch_program:
            raise BackendUnavailable(UNTRUSTED_TORCH_PROGRAM)
        return TorchCudaBackend.from_artifact(artifact, device="cuda", fp16=variant != "fp32", max_batch=gpu_batch)
    if kind in ("cpu", "ort-cpu"):
        if variant in CPU_ORDER:
            raise BackendUnavailable(f"{variant} is an OpenVINO variant; ONNX Runtime runs fp32 or fp16")
        return OrtCpuBackend.from_artifact(artifact, variant=variant or "fp32", threads=threads)
    if kind == "openvino":
        from segrt.engine.backends.openvino_cpu import OpenVinoCpuBackend

        if variant not in (None, "fp32") + CPU_ORDER:
            raise BackendUnavailable(f"OpenVINO runs the fp32 ONNX (variant 'fp32') or a gated CPU variant "
                                     f"({', '.join(CPU_ORDER)}), not {variant!r}")
        return OpenVinoCpuBackend.from_artifact(artifact, variant="openvino-fp32" if variant in (None, "fp32")
                                                else variant, threads=threads)
    raise BackendUnavailable(f"unknown backend {kind!r}")


def _cpu_choice(device: str, artifact, variant, threads, rejected: list[str]):
    """The CPU backend: with ``variant=None`` the best gated CPU variant, else ONNX Runtime fp32.

    Appends to ``rejected`` why each CPU variant of the artifact was not taken (and logs it).
    """
    if variant is None:
        for kind in cpu_variants_by_speed(artifact):
            try:
                from segrt.engine.backends.openvino_cpu import OpenVinoCpuBackend

                return OpenVinoCpuBackend.from_artifact(artifact, variant=kind, threads=threads)
            except (BackendUnavailable, ArtifactError) as exc:
                msg = str(exc)
                rejected.append(msg if msg.startswith(f"{kind}:") else f"{kind}: {msg}")
                log.info("segrt: device=%s: not %s: %s", device, kind, exc)
    elif variant in CPU_ORDER:
        return _make("openvino", artifact, variant, threads)
    return _make("cpu", artifact, variant, threads)


#: a lower-precision CPU variant is preferred to a higher-precision one only when its gate measured it at least this
#: much faster per window: on the real networks of benchmarks/results/real_nets_cpu_2026-12-02.json int8 disagreed
#: with MONAI's labels 5-20x more than bf16 (brain Dice vs MONAI 0.992-0.998 against 0.9996-0.9998) while its
#: gate-measured network time was only 1.26x (deepbet) or 0.83x (HD-BET) of bf16's, and end to end it was no faster
MIN_SPEEDUP_FOR_LOWER_PRECISION = 1.5
#: precision rank of the CPU variants (higher: closer to fp32)
_PRECISION_RANK = {"openvino-bf16": 1, "openvino-int8": 0}


def cpu_variants_by_speed(artifact) -> list[str]:
    """The artifact's reduced-precision CPU variants in the order the runtime tries them: by the per-window time their
    export-time gate measured (``gate[v].seconds_per_window``), fastest first, except that a lower-precision variant
    goes ahead of a higher-precision one only when at least :data:`MIN_SPEEDUP_FOR_LOWER_PRECISION` times faster;
    untimed ones after, in :data:`CPU_ORDER`."""
    import functools

    gates = artifact.manifest.get("gate", {})
    present = [k for k in CPU_ORDER if k in artifact.variants]

    def seconds(kind):
        t = gates.get(kind, {}).get("seconds_per_window") if isinstance(gates.get(kind), dict) else None
        return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 else None

    def cmp(a, b):
        ta, tb = seconds(a), seconds(b)
        if ta is None or tb is None:
            return (ta is None) - (tb is None) or CPU_ORDER.index(a) - CPU_ORDER.index(b)
        ra, rb = _PRECISION_RANK.get(a, 0), _PRECISION_RANK.get(b, 0)
        if ra != rb:  # the more precise one first unless the other is clearly faster
            hi, lo, t_hi, t_lo = (a, b, ta, tb) if ra > rb else (b, a, tb, ta)
            first = lo if t_hi >= MIN_SPEEDUP_FOR_LOWER_PRECISION * t_lo else hi
            return -1 if first == a else 1
        return (ta > tb) - (ta < tb)

    return sorted(present, key=functools.cmp_to_key(cmp))


def passed_cpu_variants(artifact) -> list[str]:
    """:func:`cpu_variants_by_speed` restricted to the variants whose export-time gate passed: the first is what
    ``segrt run`` takes on a CPU that runs it."""
    gates = artifact.manifest.get("gate", {})
    return [v for v in cpu_variants_by_speed(artifact) if (gates.get(v) or {}).get("passed")]


def _describe(backend) -> str:
    cap = backend.capabilities
    extra = f", {cap.threads} threads" if cap.threads else ""
    return f"{backend.name} on {cap.device}{extra}"


def select_backend(artifact, device: str = "auto", variant: str | None = None, threads: int | None = None,
                   gpu_batch: int | None = None, trust_torch_program: bool = False):
    """Pick and construct a backend for ``artifact``; return ``(backend, reason)``.

    ``device``: ``"cpu"`` (the artifact's best CPU variant whose gate passed - OpenVINO bf16 - else ONNX
    Runtime fp32; why a variant was refused is logged and put in the reason), ``"ort-cpu"`` (ONNX Runtime
    CPU only), ``"openvino"`` (OpenVINO CPU: the gated bf16 variant when it passed, else fp32),
    ``"tensorrt"`` / ``"ort-cuda"`` / ``"torch-cuda"`` (that backend or :class:`BackendUnavailable` with the
    reason), ``"cuda"`` (the fastest GPU backend that works, or BackendUnavailable listing why each failed),
    ``"auto"`` (the fastest GPU backend that works, else the CPU choice of ``"cpu"``).
    ``variant``: ``None`` lets each backend take its precision (fp16 on the GPU when the artifact has it, a
    gated CPU variant or fp32 ONNX on the CPU); ``"fp32"`` / ``"fp16"`` ask for that precision everywhere
    (ONNX variant on ORT, autocast on or off for torch-CUDA; an fp16 TensorRT plan is refused for ``"fp32"``;
    ``"fp32"`` on the CPU is always ONNX Runtime fp32 - exact parity); ``"openvino-bf16"`` asks for that CPU
    variant (refused, with the reason, if its gate did not pass).
    ``gpu_batch``: windows per network call on a GPU backend (default: torch-CUDA max(sw_batch_size, 4), the
    others sw_batch_size); a TensorRT plan takes at most the batch its profile was built for.
    ``trust_torch_program``: the torch-CUDA backend loads the artifact's torch program, which unpickles (can run
    code); without this it is refused (``"auto"``/``"cuda"`` go on to the next candidate). ONNX files and TensorRT
    plans are data and need no trust.
    """
    if gpu_batch is not None and (isinstance(gpu_batch, bool) or not isinstance(gpu_batch, int) or gpu_batch < 1):
        raise BackendUnavailable(f"gpu_batch must be a positive integer, got {gpu_batch!r}")
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if variant not in VARIANTS and variant not in artifact.variants:
        raise BackendUnavailable(f"unknown variant {variant!r}; expected fp32, fp16 or None (the backend's "
                                 f"choice)")
    if device == "cpu" or (device == "openvino" and variant is None):
        cpu_rejected: list[str] = []
        try:
            backend = _cpu_choice(device, artifact, variant, threads, cpu_rejected)
            if device == "openvino" and backend.name == "ort-cpu":  # no gated OpenVINO variant: OpenVINO fp32
                backend.close()
                backend = _make("openvino", artifact, "fp32", threads)
        except ArtifactError as exc:
            raise BackendUnavailable(f"device={device}: {exc}") from None
        reason = f"device={device}: {_describe(backend)}"
        if cpu_rejected:
            reason += " (rejected " + "; ".join(cpu_rejected) + ")"
        log.info("segrt: %s", reason)
        return backend, reason
    if device in ("ort-cpu", "openvino") + GPU_ORDER:
        try:
            backend = _make(device, artifact, variant, threads, gpu_batch, trust_torch_program)
        except ArtifactError as exc:
            raise BackendUnavailable(f"device={device}: {exc}") from None
        reason = f"device={device}: {_describe(backend)}"
        log.info("segrt: %s", reason)
        return backend, reason

    rejected: list[str] = []
    for kind in GPU_ORDER:
        try:
            backend = _make(kind, artifact, variant, threads, gpu_batch, trust_torch_program)
        except (BackendUnavailable, ArtifactError) as exc:
            msg = str(exc)
            rejected.append(msg if msg.startswith(f"{kind}:") else f"{kind}: {msg}")
            log.info("segrt: device=%s: not %s: %s", device, kind, exc)
            continue
        reason = f"device={device}: picked {_describe(backend)}"
        if rejected:
            reason += " (rejected " + "; ".join(rejected) + ")"
        log.info("segrt: %s", reason)
        return backend, reason
    if device == "cuda":
        raise BackendUnavailable("device=cuda: no GPU backend can run here: " + "; ".join(rejected))
    backend = _cpu_choice(device, artifact, variant, threads, rejected)
    reason = f"device=auto: picked {_describe(backend)} (rejected " + "; ".join(rejected) + ")"
    log.info("segrt: %s", reason)
    return backend, reason
