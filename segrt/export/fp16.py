"""FP16 variant of an exported fp32 ONNX model, with every normalisation kept in fp32.

Why our own converter (and not ``onnxconverter_common.float16``): the networks segrt exports use a
small op set (Conv, ConvTranspose, Resize, Relu/PRelu, Add/Mul, Concat, Reshape and normalisations),
the part that needs care - *which* nodes stay fp32 - has to be found by segrt anyway, and a ~200-line
converter whose every rule is tested here avoids a dependency for it.

What the exporters emit for normalisations (as observed with torch 2.13, opset 18):

===================================  ==========================================================
monai layer                          ONNX nodes
===================================  ==========================================================
GroupNorm (SegResNet), dynamo        Reshape(N,G,-1) → InstanceNormalization → Reshape(x.shape)
                                     → Mul(gamma) → Add(beta)
GroupNorm, TorchScript exporter      the same five nodes (plus Shape / Constant feeders)
InstanceNorm3d (UNet), both          InstanceNormalization
BatchNorm3d (UNet), dynamo           folded into the preceding Conv (no node left)
BatchNorm3d, TorchScript exporter    BatchNormalization (where it cannot be folded)
LayerNorm / older exporters          LayerNormalization, or the ReduceMean decomposition
                                     ReduceMean → Sub → Pow/Mul → ReduceMean → Add(eps) → Sqrt
                                     → Div (or Reciprocal+Mul) → Mul(gamma) → Add(beta)
===================================  ==========================================================

:func:`find_norm_regions` finds each normalisation *region*: a seed (a normalisation op, or a
``Sub(x, ReduceMean(x))`` mean subtraction) grown backwards over layout-only producers
(Reshape/Transpose/...) and forwards over every consumer that only reads the region and constants
(layout ops, the per-channel affine Mul/Add, and for the ReduceMean form the statistics ops).
:func:`convert_fp16` computes all other float nodes in fp16 and the regions in fp32, with Casts at
the region borders; the graph input and output stay float32 (Casts inside). :func:`check_precision`
inspects the tensor types of a converted model: it is what the tests (and the export) use to prove
the regions compute in fp32.

The fp16 model is gated like every variant (:func:`gate_fp16`) against the torch fp32 reference,
on fresh standard-normal patches and on CT-like patches (a synthetic CT phantom, run through the
artifact's own intensity preprocessing). ORT's CPU provider runs it by casting the fp16 nodes it has
no fp16 kernel for back to float (ORT's insert-cast transformer), so the CPU gate sees fp16 storage
rounding of every tensor and weight - the dominant fp16 error - but float accumulation; GPU
kernels (cuDNN, TensorRT) also accumulate fp16 convolutions in fp32.

Thresholds (fp16): ``max|torch - ort| <= FP16_MAX_ABS_REL * max(1, max|torch logit|)`` and argmax
agreement ``>= FP16_MIN_ARGMAX_AGREEMENT``. The comments at those constants give their rationale and
where the measured figures are recorded.

Size: over 400 lines because finding normalisation regions in an ONNX graph, converting the rest to fp16 around them
and gating the result belong together: the gate's thresholds are about what the conversion keeps in fp32.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from segrt.errors import ExportError, GateFailed

__all__ = [
    "NORM_OPS", "FP16_MAX_ABS_REL", "FP16_MIN_ARGMAX_AGREEMENT", "NormRegion", "find_norm_regions",
    "convert_fp16", "check_precision", "export_fp16", "gate_fp16", "gate_reduced_precision",
    "ct_like_patches",
]

# Normalisation ops of the ONNX standard (and ORT's contrib fused forms).
NORM_OPS = frozenset({
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "MeanVarianceNormalization", "LpNormalization", "RMSNormalization",
    "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
})
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand"})
AFFINE_OPS = frozenset({"Mul", "Add"})
# ops a ReduceMean-based decomposition is made of (mean, centring, variance, eps, root, division)
STAT_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "Sub", "Pow", "Mul", "Add", "Div",
                      "Sqrt", "Reciprocal"}) | LAYOUT_OPS

# inputs that stay float32 whatever the node's precision (their type is not the node's T)
_FIXED_FLOAT_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}

# fp16 has a 2^-11 relative step; its rounding of every tensor and weight compounds over the ~30 conv
# layers of a SegResNet, so fp16 logits differ from fp32 noticeably more than fp32 reordering noise does
# (MAX_ABS_REL in segrt.export.gate) - most on CT-like patches, whose logits are larger. 3e-2 of the logit
# scale is more than an order of magnitude above the differences the gate has seen on SegResNets (the
# wholebody_small fixture and the full wholeBody network, random init) and still catches an fp16 overflow,
# a norm computed on a wrong axis or a wrong cast (errors of order 1).
FP16_MAX_ABS_REL = 3e-2
# Random-init networks produce near-tied logits on much of a patch (the more classes, the more ties), so
# an fp16-sized logit change may flip a voxel's label; trained networks are far more decisive. 1 voxel in
# 200 may flip, a few times the worst the gate has seen on the random-init 105-class wholeBody network.
#
# Where the figures are: each fp16 gate's report (max / mean |Δlogit| and argmax agreement, per input set:
# ``random`` and ``ct_like``) is recorded in the artifact's manifest (``gate["fp16"]``); no committed
# result under benchmarks/results/ holds them and no benchmark script runs the fp16 ONNX gate: reproduce
# with ``segrt export <bundle> -o <dir> --random-init --fp16``, which prints both input sets' figures.
FP16_MIN_ARGMAX_AGREEMENT = 0.995

_FLOAT = 1     # onnx.TensorProto.FLOAT
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


@dataclass
class NormRegion:
    """One normalisation and the nodes around it that must compute in fp32."""

    kind: str                       # the seed op, or "ReduceMean decomposition"
    nodes: list[str] = field(default_factory=list)  # node names, in graph order


# ---------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------

def _name_nodes(graph) -> None:
    """Give every nameless node a unique name (regions and checks refer to nodes by name)."""
    seen = {n.name for n in graph.node if n.name}
    for i, n in enumerate(graph.node):
        if not n.name:
            cand = f"segrt_{n.op_type}_{i}"
            while cand in seen:
                cand += "_"
            n.name = cand
            seen.add(cand)


def _const_names(graph) -> set[str]:
    """Tensors that do not depend on the graph input: initializers, Constants and what only reads them."""
    const = {i.name for i in graph.initializer}
    for n in graph.node:
        ins = [x for x in n.input if x]
        if n.op_type == "Constant" or (ins and all(x in const for x in ins) and n.op_type != "Shape"):
            const.update(o for o in n.output if o)
    return const


def _elem_types(model) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - fall back to what the file declares
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def find_norm_regions(model) -> list[NormRegion]:
    """The normalisation regions of ``model`` (an ``onnx.ModelProto``, nodes named; see module doc)."""
    g = model.graph
    _name_nodes(g)
    types = _elem_types(model)
    const = _const_names(g)
    producer = {o: n for n in g.node for o in n.output if o}
    consumers = defaultdict(list)
    for n in g.node:
        for x in n.input:
            if x:
                consumers[x].append(n)
    order = {n.name: i for i, n in enumerate(g.node)}

    def is_float_dynamic(x: str) -> bool:
        return bool(x) and x not in const and types.get(x, _FLOAT) in (_FLOAT, _FLOAT16)

    seeds: list[tuple[str, list]] = []
    for n in g.node:
        if n.op_type in NORM_OPS:
            seeds.append((n.op_type, [n]))
        elif n.op_type == "Sub" and len(n.input) == 2:
            x, m = n.input
            p = producer.get(m)
            if p is not None and p.op_type == "ReduceMean" and p.input and p.input[0] == x:
                seeds.append(("ReduceMean decomposition", [p, n]))

    regions: list[NormRegion] = []
    taken: set[str] = set()
    for kind, seed in seeds:
        if any(s.name in taken for s in seed):
            continue
        members = {s.name: s for s in seed}
        # backwards over layout-only producers of the data input
        x = seed[0].input[0]
        while x in producer and producer[x].op_type in LAYOUT_OPS and producer[x].name not in taken:
            p = producer[x]
            members[p.name] = p
            x = p.input[0]
        # forwards over consumers that read only the region and constants
        allowed = STAT_OPS if kind == "ReduceMean decomposition" else (LAYOUT_OPS | AFFINE_OPS)
        outs = [o for s in members.values() for o in s.output if o]
        frontier = list(outs)
        while frontier:
            t = frontier.pop()
            for c in consumers.get(t, []):
                if c.name in members or c.name in taken or c.op_type not in allowed:
                    continue
                dyn = [i for i in c.input if is_float_dynamic(i)]
                if all(i in producer and producer[i].name in members for i in dyn):
                    members[c.name] = c
                    frontier.extend(o for o in c.output if o)
        names = sorted(members, key=order.__getitem__)
        taken.update(names)
        regions.append(NormRegion(kind, names))
    return regions


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------

def _to_fp16_tensor(t, name: str):
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t).astype(np.float32)
    if arr.size and np.abs(arr).max() > 65504.0:
        raise ExportError(f"fp16 conversion: constant {t.name!r} holds values up to "
                          f"{float(np.abs(arr).max()):.4g}, beyond the fp16 range (65504)")
    return numpy_helper.from_array(arr.astype(np.float16), name)


def convert_fp16(model, fp32_nodes: set[str] | None = None, *, keep_norms_fp32: bool = True):
    """Return an fp16 copy of ``model`` whose nodes named in ``fp32_nodes`` compute in fp32.

    ``fp32_nodes`` defaults to every node of :func:`find_norm_regions` (``keep_norms_fp32=False``
    converts everything - only useful to show what the block list prevents). Graph inputs and
    outputs stay float32. Raises :class:`ExportError` when the result fails ``onnx.checker``'s full
    (type-checking) pass.
    """
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    _name_nodes(g)
    if fp32_nodes is None:
        fp32_nodes = ({n for r in find_norm_regions(m) for n in r.nodes} if keep_norms_fp32 else set())
    types = _elem_types(m)

    # float Constant nodes become initializers (converted or not like any other weight)
    kept = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type == _FLOAT:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            kept.append(n)
    del g.node[:]
    g.node.extend(kept)

    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    cur_type: dict[str, int] = {i.name: i.type.tensor_type.elem_type for i in g.input}
    fp16_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    used_fp32_inits: set[str] = set()
    new_nodes = []

    def is_float(x: str) -> bool:
        return types.get(x) in (_FLOAT, _FLOAT16)

    def cast(x: str, to: int) -> str:
        key = (x, to)
        if key not in casts:
            out = f"{x}__to_{'fp16' if to == _FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [x], [out], to=to, name=f"segrt_cast_{len(casts)}_{out}"))
            cur_type[out] = to
            casts[key] = out
        return casts[key]

    for n in g.node:
        float_outs = [o for o in n.output if o and types.get(o) == _FLOAT]
        fixed = _FIXED_FLOAT_INPUTS.get(n.op_type, set())
        if n.name in fp32_nodes:
            want = _FLOAT
        elif float_outs:
            want = _FLOAT16
        else:  # no float output (Shape, comparisons): follow its first dynamic float input
            dyn = [cur_type.get(x) for x in n.input if x and x not in inits and is_float(x)]
            want = dyn[0] if dyn else None
        if n.op_type == "Cast":
            # a Cast keeps its target unless it targets float inside the fp16 part
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == _FLOAT and want == _FLOAT16:
                to.i = _FLOAT16
            for o in n.output:
                cur_type[o] = to.i
            new_nodes.append(n)
            continue
        for k, x in enumerate(n.input):
            if not x or not is_float(x) or want is None:
                continue
            target = _FLOAT if k in fixed else want
            if x in inits:
                if target == _FLOAT16:
                    if x not in fp16_inits:
                        fp16_inits[x] = f"{x}__fp16"
                        g.initializer.append(_to_fp16_tensor(inits[x], fp16_inits[x]))
                    n.input[k] = fp16_inits[x]
                else:
                    used_fp32_inits.add(x)
            elif cur_type.get(x, _FLOAT) != target:
                n.input[k] = cast(x, target)
        if want == _FLOAT16:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == _FLOAT:
                    a.t.CopyFrom(_to_fp16_tensor(a.t, a.t.name))
        for o in n.output:
            if o and types.get(o) == _FLOAT:
                cur_type[o] = want if want is not None else _FLOAT
            elif o:
                cur_type[o] = types.get(o, 0)
        new_nodes.append(n)

    # graph outputs stay float32
    for out in g.output:
        if cur_type.get(out.name) == _FLOAT16:
            inner = f"{out.name}__fp16"
            for n in new_nodes:
                for k, o in enumerate(n.output):
                    if o == out.name:
                        n.output[k] = inner
                for k, x in enumerate(n.input):
                    if x == out.name:
                        n.input[k] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=_FLOAT,
                                              name=f"segrt_cast_output_{out.name}"))
    del g.node[:]
    g.node.extend(new_nodes)
    # drop fp32 weights that only fp16 nodes read
    keep = [i for i in g.initializer if i.data_type != _FLOAT or i.name in used_fp32_inits
            or i.name in graph_inputs or i.name not in fp16_inits]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several error types
        raise ExportError(f"fp16 conversion produced an invalid model: {type(exc).__name__}: "
                          f"{str(exc)[:400]}") from exc
    return m


def check_precision(model, fp32_nodes) -> dict:
    """Inspect tensor types: which nodes compute in fp32 / fp16 (a float output's type decides).

    Returns ``{"fp32_ok": [...], "fp32_violations": [...], "fp16_nodes": n, "fp32_other": [...],
    "passed": bool}``: a node of ``fp32_nodes`` is a violation if any float input or output of it
    is fp16 (or it is missing); ``fp32_other`` lists compute nodes outside ``fp32_nodes`` that are
    not fp16 (Casts excluded).
    """
    types = _elem_types(model)
    inits = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    fp32_nodes = list(fp32_nodes)
    ok, bad = [], []
    for name in fp32_nodes:
        n = by_name.get(name)
        if n is None:
            bad.append(f"{name} (missing)")
            continue
        fixed = _FIXED_FLOAT_INPUTS.get(n.op_type, set())
        ts = [types.get(x) for k, x in enumerate(n.input) if x and k not in fixed] + \
             [types.get(o) for o in n.output if o]
        (bad if _FLOAT16 in ts else ok).append(name)
    fp16, other = 0, []
    block = set(fp32_nodes)
    for n in model.graph.node:
        if n.name in block or n.op_type == "Cast":
            continue
        outs = [types.get(o) for o in n.output if o and o not in inits]
        if _FLOAT16 in outs:
            fp16 += 1
        elif _FLOAT in outs:
            other.append(n.name)
    return {"fp32_ok": ok, "fp32_violations": bad, "fp16_nodes": fp16, "fp32_other": other,
            "passed": not bad and not other and bool(fp32_nodes or fp16)}


def export_fp16(fp32_path, fp16_path) -> dict:
    """Write the fp16 variant of ``fp32_path`` to ``fp16_path``; return what the manifest records."""
    import onnx

    model = onnx.load(str(fp32_path))
    _name_nodes(model.graph)
    regions = find_norm_regions(model)
    names = [n for r in regions for n in r.nodes]
    t0 = time.perf_counter()
    half = convert_fp16(model, set(names))
    check = check_precision(half, names)
    if not check["passed"]:
        raise ExportError(f"fp16 conversion left normalisation nodes in fp16 {check['fp32_violations'][:5]} "
                          f"or other nodes in fp32 {check['fp32_other'][:5]}")
    onnx.save(half, str(fp16_path))
    kinds = defaultdict(int)
    for r in regions:
        kinds[r.kind] += 1
    return {
        "precision": "fp16",
        "converter": "segrt.export.fp16 (normalisation regions kept fp32, float32 graph IO)",
        "norm_regions": dict(kinds),
        "fp32_nodes": names,
        "fp16_nodes": check["fp16_nodes"],
        "convert_seconds": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------

def ct_like_patches(spec, samples: int, batch: int, seed: int) -> list[np.ndarray]:
    """``samples`` batches of roi-sized crops of a synthetic CT phantom after the spec's intensity ops.

    The phantom (:func:`segrt.phantom.make_phantom`, HU values of air, fat, soft tissue, organs and
    bone with noise) is drawn at the spec's target spacing in RAS, so only the intensity ops are
    applied - exactly the values the network sees at run time on such a scan.
    """
    from segrt.engine.preprocess import apply_intensity
    from segrt.phantom import make_phantom

    roi = tuple(int(r) for r in spec.inference.roi_size)
    sp = spec.preprocessing.spacing
    pixdim = tuple(float(p) for p in sp.pixdim) if sp is not None else (1.5, 1.5, 1.5)
    # the middle of the body (the phantom is centred on the grid): at most 1.5 roi per axis, within
    # a ~ 360 x 300 x 240 mm field of view, at least roi + 8
    shape = tuple(max(r + 8, min(int(round(f / p)), int(1.5 * r) + 8))
                  for r, f, p in zip(roi, (360.0, 300.0, 240.0), pixdim))
    img, _, _, _ = make_phantom(shape, pixdim, "RAS", seed=seed % (2 ** 31))
    img = apply_intensity(img[None], tuple(spec.preprocessing.intensity))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        b = np.empty((batch, spec.in_channels, *roi), np.float32)
        for j in range(batch):
            # crops centred within the middle half of each axis: mostly body
            c = [int(rng.integers(s // 4, 3 * s // 4 + 1)) for s in shape]
            o = [min(max(0, ci - r // 2), s - r) for ci, r, s in zip(c, roi, shape)]
            b[j] = img[:, o[0]:o[0] + roi[0], o[1]:o[1] + roi[1], o[2]:o[2] + roi[2]]
        out.append(b)
    return out


def _compare(ref_fn, got_fn, batches, want) -> dict:
    max_abs = sum_abs = scale = 0.0
    count = agree = voxels = 0
    finite = True
    for x in batches:
        ref = np.asarray(ref_fn(x), dtype=np.float32)
        got = np.asarray(got_fn(x), dtype=np.float32)
        if ref.shape != want or got.shape != want:
            raise GateFailed(f"gate: output shapes differ from {list(want)} (reference {list(ref.shape)}, "
                             f"tested {list(got.shape)})", {"passed": False, "reason": "shape"})
        finite &= bool(np.isfinite(got).all() and np.isfinite(ref).all())
        d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        max_abs = max(max_abs, float(np.nanmax(d)))
        sum_abs += float(np.nansum(d))
        count += d.size
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        voxels += ref.shape[0] * int(np.prod(ref.shape[2:]))
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": sum_abs / max(count, 1),
            "max_abs_logit": scale, "argmax_agreement": agree / max(voxels, 1), "finite": finite}


def gate_reduced_precision(reference, run, spec, *, samples: int = 2, seed: int = 0, batch: int = 2,
                           ct_like: bool = True, raise_on_fail: bool = True, what: str = "fp16 ONNX",
                           runtime: str = "onnxruntime CPUExecutionProvider",
                           reference_name: str = "torch fp32") -> dict:
    """Gate a reduced-precision runner against an fp32 reference with the fp16 thresholds.

    ``reference`` is a torch module (run on the CPU in fp32) or a callable ``np → np``; ``run`` a
    callable ``np (B, C, *roi) float32 → np (B, K, *roi)``. Inputs: ``samples`` batches of fresh
    standard-normal patches and (single-channel models) as many CT-like batches
    (:func:`ct_like_patches`). Returns the report; raises :class:`GateFailed` beyond the thresholds.
    """
    import segrt.export.gate as gm

    if samples < 1:
        raise ExportError(f"gate samples must be >= 1, got {samples}")
    if callable(reference) and not hasattr(reference, "eval"):
        ref_fn = reference
    else:
        reference.eval()
        ref_fn = lambda x: gm._run_torch(reference, x)  # noqa: E731
    roi = tuple(int(r) for r in spec.inference.roi_size)
    want = (batch, int(spec.num_classes), *roi)
    t0 = time.perf_counter()
    sets = {"random": ("standard normal float32",
                       gm._patches(seed, samples, (batch, int(spec.in_channels), *roi)))}
    if ct_like and int(spec.in_channels) == 1:
        sets["ct_like"] = ("synthetic CT phantom after the spec's intensity ops",
                           ct_like_patches(spec, samples, batch, seed + 1))
    report = {"passed": False, "reference": reference_name, "runtime": runtime,
              "samples": int(samples), "batch": int(batch), "seed": int(seed),
              "max_abs_rel": FP16_MAX_ABS_REL, "min_argmax_agreement": FP16_MIN_ARGMAX_AGREEMENT}
    if "ct_like" not in sets:
        report["ct_like"] = "skipped: only single-channel (CT) models get phantom patches"
    problems = []
    for key, (dist, batches) in sets.items():
        r = _compare(ref_fn, run, batches, want)
        r["input_distribution"] = dist
        r["tolerance_max_abs"] = FP16_MAX_ABS_REL * max(1.0, r["max_abs_logit"])
        report[key] = r
        if not r["finite"]:
            problems.append(f"{key}: non-finite logits")
        if not r["max_abs_logit_diff"] <= r["tolerance_max_abs"]:
            problems.append(f"{key}: max |logit diff| {r['max_abs_logit_diff']:.3g} > tolerance "
                            f"{r['tolerance_max_abs']:.3g}")
        if r["argmax_agreement"] < FP16_MIN_ARGMAX_AGREEMENT:
            problems.append(f"{key}: argmax agreement {r['argmax_agreement']:.6f} < {FP16_MIN_ARGMAX_AGREEMENT}")
    # headline figures (worst over the input sets) at the top level, like the fp32 report
    report["max_abs_logit_diff"] = max(report[k]["max_abs_logit_diff"] for k in sets)
    report["argmax_agreement"] = min(report[k]["argmax_agreement"] for k in sets)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["passed"] = not problems
    if problems and raise_on_fail:
        raise GateFailed(f"{what} accuracy gate failed ({reference_name} vs {what}): " + "; ".join(problems),
                         report)
    return report


def gate_fp16(reference, fp16_path, spec, **kw) -> dict:
    """Gate the fp16 ONNX (ONNX Runtime CPU) against ``reference`` (see :func:`gate_reduced_precision`)."""
    import segrt.export.gate as gm

    sess = gm._session(fp16_path)
    return gate_reduced_precision(reference, lambda x: gm._run_onnx(sess, x), spec, **kw)
