"""Plan a CPU segmentation under a declared RAM budget (``segrt run --max-memory SIZE``).

The engine's memory, by phase (bytes; ``V_in`` input voxels, ``V`` preprocessed voxels, ``C`` channels, ``L``
bytes per label (1 or 2))::

    preprocess = base + input + 3 · 4·C·V                      # resampled image + intensity-op temporaries
    stitch     = base + input' + 4·C·V + L·V                   # input, preprocessed image, labels on that grid
                 + stitch_peak_bytes(V's shape, batch, accum, threads, skip)   # segrt.engine.stitch_memory
                 + workspace                                   # the backend's own (ONNX Runtime arena)
    invert     = base + input' + L·V + L·V_in + 8·V_in         # labels on both grids + index arithmetic
    peak       = max(preprocess, stitch, invert)

``input`` is the loaded volume's array (its stored dtype where the engine keeps it so: an int16 NIfTI), ``input'``
the same or 0 when the engine releases its own copy once resampled (``release_input``: under a budget, for an
input it read from a file), ``base`` the interpreter with numpy / nibabel / ONNX Runtime imported
(:data:`BASE_BYTES`), ``workspace`` the backend's estimate (its ``workspace_bytes`` attribute, or measured by
:func:`measure_workspace`: the process's RSS growth over one batch of zeros).

:func:`plan_memory` tries, in order, until the peak fits the budget: the artifact's batch size with the
float32 accumulator and the gather/infer threads; the same without threads; batch size 1; the float16
accumulator (a reduced-precision path: every addition rounded to float16). Last, with the float16 accumulator and
one window per call, the stitcher may visit the windows with another axis slowest (:mod:`segrt.engine.axes`: a
smaller overlap band on a long volume; only the order of additions changes), the axis order whose peak is
smallest. If none fits it raises
:class:`~segrt.errors.BudgetError` before anything runs, saying what the smallest plan needs, what was given,
and what to change.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np

from segrt.engine.axes import IDENTITY, candidate_axes, permute_shape, permute_spec
from segrt.engine.stitch_memory import stitch_buffers
from segrt.safety import format_bytes
from segrt.errors import BudgetError, SpecError
from segrt.spec import InferenceSpec

__all__ = ["parse_size", "format_size", "MemoryPlan", "plan_memory", "measure_workspace", "rss_bytes",
           "BASE_BYTES"]

#: Resident memory of a Python process with numpy, nibabel and onnxruntime imported and a small session.
BASE_BYTES = 160 * 2 ** 20

_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "KB": 10 ** 3, "KIB": 2 ** 10, "M": 2 ** 20, "MB": 10 ** 6, "MIB": 2 ** 20,
          "G": 2 ** 30, "GB": 10 ** 9, "GIB": 2 ** 30, "T": 2 ** 40, "TB": 10 ** 12, "TIB": 2 ** 40}


def parse_size(text) -> int:
    """``"1.5G"`` → bytes. Units: K, M, G, T (powers of 1024, also KiB …), KB, MB, GB, TB (powers of 1000)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if text <= 0:
            raise BudgetError(f"memory budget must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise BudgetError(f"memory size must look like 1.5G, 800M or 2GiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value < 1:
        raise BudgetError(f"memory budget must be positive, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """Bytes with two decimals (a budget the user gives back as --max-memory)."""
    return format_bytes(n, digits=2)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_workspace(backend, batch: int) -> int:
    """The backend's working memory for a batch of ``batch`` windows: the RSS growth over two inferences of
    zeros, each output dropped before the next. ONNX Runtime allocates its outputs in its arena and keeps the
    arena, so this includes one output batch (the one the stitcher weights in place) and the steady state."""
    known = backend.capabilities.workspace_bytes
    if known is not None:
        return int(known)
    x = np.zeros((batch, backend.in_channels, *backend.roi_size), dtype=np.float32)
    before = rss_bytes()
    for _ in range(2):
        out = backend.infer(x)
        del out
    return max(rss_bytes() - before, 0)


@dataclass
class MemoryPlan:
    """What :func:`plan_memory` chose and its bytes by phase / term."""

    budget: int | None
    sw_batch_size: int
    accum_dtype: str
    threads: bool
    peak: int
    phases: dict = field(default_factory=dict)
    terms: dict = field(default_factory=dict)
    release_input: bool = False  # the engine drops its copy of the input once resampled
    stream_axes: tuple | None = None  # the stitcher's axis order (segrt.engine.axes); None: the image's own

    def inference_spec(self, spec: InferenceSpec) -> InferenceSpec:
        return spec if spec.sw_batch_size == self.sw_batch_size else \
            dataclasses.replace(spec, sw_batch_size=self.sw_batch_size)

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "sw_batch_size": self.sw_batch_size, "accum_dtype": self.accum_dtype,
                "threads": self.threads, "release_input": self.release_input,
                "stream_axes": None if self.stream_axes is None else list(self.stream_axes), "peak_bytes": self.peak,
                "phases": dict(self.phases),
                "terms": dict(self.terms)}


def estimate(spec: InferenceSpec, num_classes: int, in_channels: int, input_shape, preprocessed_shape, *,
             input_bytes: int, label_bytes: int, workspace: int, accum_dtype: str, threads: bool, skip: bool,
             slabs: bool, inplace_weighting: bool, order: str | None = None,
             base: int = BASE_BYTES, grid=None, release_input: bool = False,
             stream_axes: tuple | None = None) -> MemoryPlan:
    """Bytes of one plan (the module docstring's formula). ``stream_axes``: the stitcher runs on the image
    transposed so (:func:`segrt.engine.axes.stitch_permuted`; ``grid`` is then not used)."""
    v = int(np.prod(preprocessed_shape))
    v_in = int(np.prod(input_shape))
    c = int(in_channels)
    shape, st_spec = preprocessed_shape, spec
    if stream_axes is not None:  # the stitcher's buffers on the transposed image (its own cell grid)
        shape, st_spec, grid = permute_shape(shape, stream_axes), permute_spec(spec, stream_axes), None
    st = stitch_buffers(shape, st_spec, num_classes, c, accum_dtype=accum_dtype, slabs=slabs, threads=threads,
                        skip=skip, inplace_weighting=inplace_weighting, order=order, grid=grid)
    stitch = sum(st.values())
    held = 0 if release_input else input_bytes  # the input after resampling
    phases = {
        "preprocess": base + input_bytes + 3 * 4 * c * v,
        "stitch": base + held + 4 * c * v + label_bytes * v + stitch + workspace,
        "invert": base + held + label_bytes * v + label_bytes * v_in + 8 * v_in,
    }
    terms = {"base": base, "input": input_bytes, "preprocessed": 4 * c * v, "labels": label_bytes * v,
             "labels_input_grid": label_bytes * v_in, "workspace": workspace,
             **{f"stitch_{k}": val for k, val in st.items()}}
    return MemoryPlan(None, spec.sw_batch_size, accum_dtype, threads, max(phases.values()), phases, terms,
                      release_input=bool(release_input), stream_axes=stream_axes)


def plan_memory(spec: InferenceSpec, num_classes: int, in_channels: int, input_shape, preprocessed_shape,
                budget: int | None, *, input_bytes: int, label_bytes: int, workspace, skip: bool, slabs: bool,
                inplace_weighting: bool, threads: bool = True, accum_dtype: str | None = None,
                order: str | None = None, base: int = BASE_BYTES, grid=None,
                release_input: bool = False) -> MemoryPlan:
    """The first plan (see the module docstring) whose peak fits ``budget`` (None: the first plan).

    ``workspace``: bytes, or a callable ``batch -> bytes`` (called only for batch sizes tried).
    ``accum_dtype``: fixed by the caller (None: the planner may fall back to float16). ``grid``: the volume's
    :class:`~segrt.engine.cells.CellGrid` when the caller planned it (the windows do not depend on the batch).
    """
    if not isinstance(spec, InferenceSpec):
        raise SpecError(f"plan_memory expects an InferenceSpec, got {type(spec).__name__}")
    ws_cache: dict = {}

    def ws(b):
        if b not in ws_cache:
            ws_cache[b] = int(workspace(b)) if callable(workspace) else int(workspace)
        return ws_cache[b]

    b0 = int(spec.sw_batch_size)
    accs = [accum_dtype] if accum_dtype else ["float32", "float16"]
    candidates = []
    for acc in accs:
        for b, th in ((b0, threads), (b0, False), (1, False)):
            if (b, th, acc) not in candidates and not (th and not threads):
                candidates.append((b, th, acc))
    tried = []

    def plan(b, th, acc, axes=None):
        sp = spec if b == b0 else dataclasses.replace(spec, sw_batch_size=b)
        p = estimate(sp, num_classes, in_channels, input_shape, preprocessed_shape, input_bytes=input_bytes,
                     label_bytes=label_bytes, workspace=ws(b), accum_dtype=acc, threads=th, skip=skip, slabs=slabs,
                     inplace_weighting=inplace_weighting, order=order, base=base, grid=grid,
                     release_input=release_input, stream_axes=axes)
        p.budget = budget
        return p

    for b, th, acc in candidates:
        p = plan(b, th, acc)
        if budget is None or p.peak <= budget:
            return p
        tried.append(p)
    if "float16" in accs and not slabs and order is None:  # another axis slowest (segrt.engine.axes)
        others = [plan(1, False, "float16", axes) for axes in candidate_axes() if axes != IDENTITY]
        p = min(others, key=lambda q: q.peak)
        if p.peak < tried[-1].peak:
            if p.peak <= budget:
                return p
            tried.append(p)
    best = min(tried, key=lambda p: p.peak)
    worst_phase = max(best.phases, key=best.phases.get)
    dropped = {"input"} if best.release_input and worst_phase != "preprocess" else set()  # released by then
    big = sorted(((k, v) for k, v in best.terms.items() if v and k not in dropped), key=lambda kv: -kv[1])[:4]
    hint = ("allow the float16 accumulator (drop accum_dtype='float32') or " if "float16" not in accs else "")
    raise BudgetError(
        f"memory budget {format_size(budget)} cannot be met: the smallest plan (sw_batch_size {best.sw_batch_size}, "
        f"{best.accum_dtype} accumulator, threads {'on' if best.threads else 'off'}"
        + ("" if best.stream_axes is None else f", axis {best.stream_axes[0]} slowest")
        + f") needs {format_size(best.peak)} "
        f"in its {worst_phase} phase (largest terms: "
        + ", ".join(f"{k} {format_size(v)}" for k, v in big)
        + f"); {hint}give at least --max-memory {format_size(best.peak)}, or use a smaller / lower-resolution "
          f"input or an artifact with fewer classes")
