"""Text for people: the stage timings of a run and an artifact's manifest as a table (CLI and demo)."""

from __future__ import annotations

import json
import sys

__all__ = ["print_timings", "format_info"]


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def print_timings(timings: dict, out=sys.stdout) -> None:
    total = sum(timings.values())
    print("  stage        time", file=out)
    for k, v in timings.items():
        print(f"  {k:<10} {_fmt_seconds(v):>8}", file=out)
    print(f"  {'total':<10} {_fmt_seconds(total):>8}", file=out)


def format_info(art) -> str:
    m, s = art.manifest, art.spec
    pre, inf, post = s.preprocessing, s.inference, s.postprocessing
    rows = [
        ("artifact", str(art.root)),
        ("schema", f"{m['schema']} v{m['schema_version']}"),
        ("created", m.get("created", "?")),
        ("source", f"{m.get('source', {}).get('kind', '?')}: {m.get('source', {}).get('path', '?')}"),
    ]
    ov = m.get("source", {}).get("overrides")
    if ov:
        rows.append(("overrides", json.dumps(ov)))
    w = m.get("weights", {})
    rows.append(("weights", "RANDOM (exported with --random-init)" if w.get("random_init")
                 else f"{w.get('path', '?')} sha256 {str(w.get('sha256', '?'))[:16]}…"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())))
    rows.append(("channels", f"{s.in_channels} in → {s.num_classes} classes (labels {s.label_dtype})"))
    rows.append(("orientation", pre.orientation or "none (voxel order kept)"))
    rows.append(("spacing", "none" if pre.spacing is None
                 else f"{' × '.join(f'{v:g}' for v in pre.spacing.pixdim)} mm, {pre.spacing.mode}"))
    for n, op in enumerate(pre.intensity):
        args = ", ".join(f"{k}={v}" for k, v in op.params.items() if v is not None)
        rows.append(("intensity" if n == 0 else "", f"{op.op}({args})"))
    if not pre.intensity:
        rows.append(("intensity", "none"))
    rows.append(("roi / batch", f"{'×'.join(map(str, inf.roi_size))}, sw_batch_size {inf.sw_batch_size}"))
    rows.append(("overlap", ", ".join(f"{o:g}" for o in inf.overlap)))
    rows.append(("blending", inf.blend_mode + (f" (sigma_scale {inf.sigma_scale[0]:g})"
                                               if inf.blend_mode == "gaussian" else "")))
    rows.append(("padding", inf.padding_mode + (f" (cval {inf.cval:g})" if inf.padding_mode == "constant" else "")))
    rows.append(("post", f"{'softmax → ' if post.softmax else ''}"
                 + ("argmax → invert (nearest)" if post.order == "argmax_then_invert"
                    else f"invert ({post.invert_interp}) → argmax")))
    for variant, e in m.get("models", {}).items():
        rows.append((f"model {variant}", f"{e['path']}  {e.get('format', 'onnx')}  sha256 {e['sha256'][:16]}…  "
                     f"input {e.get('input_shape')}"))
    for variant, g in m.get("gate", {}).items():
        rows.append((f"gate {variant}", ("passed" if g.get("passed") else "FAILED") + "  " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in g.items() if k not in ("passed", "thresholds") and not isinstance(v, (dict, list)))))
    from segrt.engine.backends import passed_cpu_variants

    usable = passed_cpu_variants(art)
    rows.append(("cpu runs", (f"{usable[0]} (the fastest CPU variant that passed its gate)" if usable
                              else "fp32 (ONNX Runtime): no reduced-precision variant passed its gate")
                 + "; 'segrt run' uses it where this CPU supports it, else falls back saying why"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if s.class_names:
        lines.append(f"{'classes':<{width}}  {len(s.class_names)} named:")
        items = [f"{k:>3} {v}" for k, v in sorted(s.class_names.items())]
        col = max(len(t) for t in items) + 2
        per = max(1, 100 // col)
        for j in range(0, len(items), per):
            lines.append(" " * (width + 2) + "".join(t.ljust(col) for t in items[j:j + per]).rstrip())
    return "\n".join(lines)
