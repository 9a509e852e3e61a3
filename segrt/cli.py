"""The ``segrt`` command line: one library call per subcommand.

    segrt export SOURCE -o ARTIFACT_DIR [--random-init] [--spec SPEC.json] [--override KEY=VALUE ...]
    segrt run ARTIFACT_DIR INPUT... -o OUTPUT [--format nifti|nrrd|dicom-seg] [--series UID] [--labels a,b]
              [--stats FILE.json|.csv] [--preview FILE.png] [--split DIR] [--device cpu|auto] [--threads N]
    segrt info ARTIFACT_DIR
    segrt demo [-o DIR] [--orientation RAS|LPS] [--spacing X,Y,Z] [--seed N]

Errors of segrt (``SegrtError``) print one line ``segrt: error: ...`` and exit with status 2; no traceback,
and no partial output file is left behind (outputs are written to a temporary name and renamed).

Size: over 400 lines because of 'segrt run''s options (devices, memory, clinical inputs and outputs) and their
up-front checks, each one line of help; the work itself is one library call per subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from segrt.cliargs import _positive_int, error_line
from segrt.report import format_info, print_timings

EXIT_ERROR = 2


def _parse_override(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override must look like KEY=VALUE (JSON value), got {text!r}")
    key, _, raw = text.partition("=")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _triple(text: str):
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 1.5,1.5,2.0, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers like 1.5,1.5,2.0, got {text!r}")
    return tuple(vals)


def _overlap(text: str):
    vals = _triple(text)
    if any(not (0.0 <= v < 1.0) for v in vals):
        raise argparse.ArgumentTypeError(f"overlap must be in [0, 1) (one value or X,Y,Z), got {text!r}")
    return vals


class _Parser(argparse.ArgumentParser):
    """argparse with segrt's error contract: one line ``segrt: error: ...`` and exit status 2 (no usage dump)."""

    def error(self, message):
        cmd = self.prog.split()[1] if " " in self.prog else None
        hint = f" (see 'segrt {cmd} --help')" if cmd else " (see 'segrt --help')"
        self.exit(EXIT_ERROR, f"segrt: error: {message}{hint}\n")


def _add_verbose(parser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log what segrt decides (backend, threads, ...); on an error, also the traceback")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="segrt", description="Lean inference engine for MONAI 3D segmentation bundles.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    _add_verbose(p, False)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    e = sub.add_parser("export", help="export a MONAI bundle / TorchScript / ONNX model to an artifact")
    e.add_argument("source", help="MONAI bundle directory, TorchScript file, state dict (.pt/.pth, with "
                                  "'network': {'class': 'module:Class', 'kwargs': {...}} in the spec) or ONNX file "
                                  "(all but the bundle need --spec)")
    e.add_argument("-o", "--output", required=True, help="artifact directory to write")
    e.add_argument("--random-init", action="store_true",
                   help="export with random weights when the bundle has none (recorded in the manifest)")
    e.add_argument("--spec", help="JSON spec (schema of the manifest's 'spec') for TorchScript / ONNX sources")
    e.add_argument("--override", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                   help="bundle config override, e.g. displayable_configs#highres=false (repeatable)")
    e.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    e.add_argument("--cpu-variant", action="append", default=None, choices=["openvino-bf16", "openvino-int8"],
                   help="faster CPU variants to build and gate (repeatable; default: OpenVINO bf16 where the CPU "
                        "has native bf16); 'segrt run' uses the fastest that passed its accuracy gate (per-class "
                        "Dice >= 0.98 vs fp32)")
    e.add_argument("--int8", action="store_true",
                   help="also build the int8 CPU variant (static quantization, OpenVINO), gated like the others; "
                        "give it --calibration scans")
    e.add_argument("--no-cpu-variants", action="store_true", help="build no reduced-precision CPU variant")
    e.add_argument("--calibration", default=None, metavar="DIR",
                   help="folder of your own scans (NIfTI / NRRD / DICOM series folders): their windows gate the "
                        "CPU variants and calibrate int8")
    e.add_argument("--fp16", action="store_true",
                   help="also write an fp16 ONNX (normalisation layers kept fp32), gated against fp32")
    e.add_argument("--torch-program", action="store_true",
                   help="also write a torch program (torch.export) for the torch-CUDA backend")
    e.add_argument("--tensorrt", action="store_true",
                   help="also build a TensorRT plan (needs TensorRT >= 10 and a GPU; not verified on real TensorRT)")
    e.add_argument("--trt-timing-cache", default=None, help="TensorRT timing cache file")

    r = sub.add_parser("run", help="segment a volume (NIfTI, NRRD, DICOM series) with an artifact")
    r.add_argument("artifact", help="artifact directory written by 'segrt export'")
    r.add_argument("input", nargs="+",
                   help="input image: NIfTI (.nii / .nii.gz), NRRD (.nrrd / .nhdr), a DICOM series folder, a .dcm "
                        "file of the series, or the series' .dcm files (one image per run)")
    r.add_argument("-o", "--output", default=None,
                   help="output label image: .nii / .nii.gz, .nrrd, or .dcm (DICOM-SEG, DICOM input only); "
                        "required unless --plan, --split, --stats or --preview")
    r.add_argument("--format", default=None, choices=["nifti", "nrrd", "dicom-seg"],
                   help="output format (default: from the -o extension); with --split: nifti or nrrd files")
    r.add_argument("--series", default=None, metavar="UID",
                   help="SeriesInstanceUID to segment when the DICOM folder holds several series")
    r.add_argument("--labels", default=None, metavar="A,B,...",
                   help="keep only these classes (names or label numbers); the others become background in every "
                        "output")
    r.add_argument("--stats", default=None, metavar="FILE",
                   help="write per-structure statistics (volume, voxels, intensities) as .json or .csv")
    r.add_argument("--preview", default=None, metavar="FILE.png",
                   help="write a PNG of three orthogonal slices with the labels over the image (needs matplotlib)")
    r.add_argument("--split", default=None, metavar="DIR",
                   help="also write one mask file per class present: DIR/<class>.nii.gz (.nrrd with --format nrrd)")
    r.add_argument("--plan", action="store_true",
                   help="print the plan (grids, windows, predicted peak memory, predicted network time from a "
                        "one-batch calibration) and exit without segmenting; reads only the input's header")
    r.add_argument("--device", default="auto",
                   choices=["auto", "cpu", "ort-cpu", "openvino", "cuda", "tensorrt", "ort-cuda", "torch-cuda"],
                   help="where to run (default: auto = TensorRT → ORT-CUDA → torch-CUDA (with --trust-torch-program) → the "
                        "CPU: a gated OpenVINO bf16 variant, else ORT fp32)")
    r.add_argument("--variant", default=None, choices=["fp32", "fp16", "openvino-bf16", "openvino-int8"],
                   help="model precision (default: fp16 on a GPU when the artifact has it, fp32 on the CPU)")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: physical cores; more than the CPUs usable are reduced to that, "
                        "with a warning)")
    r.add_argument("--trust-torch-program", action="store_true",
                   help="allow the torch-CUDA backend to load the artifact's torch program (torch.export / "
                        "TorchScript unpickle and can run code): only for artifacts you made or trust")
    r.add_argument("--overlap", type=_overlap, default=None, metavar="X",
                   help="replace the artifact's sliding-window overlap (0 <= X < 1, or X,Y,Z): fewer windows, "
                        "results differ from the exported pipeline; recorded in the output header and metadata")
    r.add_argument("--no-skip", action="store_true",
                   help="run every window (default: windows the artifact's skip rule declares empty, e.g. all-air "
                        "CT, are not run and count as background)")
    r.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="RAM budget like 1.5G: batch size, threads and accumulator are planned to fit it; "
                        "fails before running when it cannot be met")
    r.add_argument("--accum-dtype", default=None, choices=["float32", "float16"],
                   help="stitching accumulator (CPU default float32: exact; float16 halves the stitcher's memory)")
    r.add_argument("--gpu-batch", type=_positive_int, default=None, metavar="N",
                   help="windows per network call on a GPU (default: torch-CUDA max(sw_batch_size, 4)); "
                        "does not change the result")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")

    i = sub.add_parser("info", help="print an artifact's manifest as a readable table")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")

    d = sub.add_parser("demo", help="phantom CT → export the shipped demo bundle → segment → Dice")
    d.add_argument("-o", "--output", default="segrt-demo", help="directory for the demo files (default: ./segrt-demo)")
    d.add_argument("--orientation", default="LPS", help="axcodes of the phantom's voxel grid (default: LPS)")
    d.add_argument("--spacing", type=_triple, default=(0.9, 0.9, 2.5), help="phantom voxel spacing in mm")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("-q", "--quiet", action="store_true")
    from segrt import batch as _batch, serve as _serve  # light modules: their heavy imports are inside

    bt = sub.add_parser("batch", help="segment many scans (files, folders, a CSV/text list) into a folder: "
                                      "resumable, exactly once, local pool or Ray")
    _batch.add_arguments(bt)
    sv = sub.add_parser("serve", help="keep the model loaded and segment scans POSTed over HTTP (localhost)")
    _serve.add_arguments(sv)
    for parser in (e, r, i, d, bt, sv):  # -v is accepted after the subcommand too
        _add_verbose(parser, argparse.SUPPRESS)
    return p


def cmd_export(a) -> int:
    from segrt.export import export

    from segrt.errors import UsageError
    from segrt.export.cpu_variants import auto_cpu_variants

    variants = ("fp32", "fp16") if a.fp16 else ("fp32",)
    if a.no_cpu_variants and (a.cpu_variant or a.int8):
        raise UsageError("--no-cpu-variants contradicts --cpu-variant / --int8")
    cpu = () if a.no_cpu_variants else tuple(a.cpu_variant) if a.cpu_variant else auto_cpu_variants()
    if a.int8 and "openvino-int8" not in cpu:
        cpu = (*cpu, "openvino-int8")
    t0 = time.perf_counter()

    def progress(msg):
        if not getattr(a, "quiet", False):
            print(f"  [{time.perf_counter() - t0:5.1f} s] {msg}", file=sys.stderr, flush=True)

    out = export(a.source, a.output, spec=a.spec, random_init=a.random_init,
                 overrides=dict(a.override) or None, force=a.force, variants=variants,
                 torch_program=a.torch_program, tensorrt=a.tensorrt, trt_timing_cache=a.trt_timing_cache,
                 cpu_variants=cpu, calibration=a.calibration, progress=progress)
    from segrt.artifact import Artifact

    art = Artifact.load(out)
    if art.random_weights:
        print("segrt: warning: the artifact holds RANDOM weights (--random-init); its labels are meaningless",
              file=sys.stderr)
    print(f"wrote artifact {out}")
    for variant, gate in art.manifest.get("gate", {}).items():
        parts = [gate] + [gate[k] for k in ("random", "ct_like", "calibration") if isinstance(gate.get(k), dict)]
        names = {id(gate.get("random")): "random", id(gate.get("ct_like")): "CT-like",
                 id(gate.get("calibration")): "your scans"}
        for g in parts:
            label = variant if g is gate else f"{variant} ({names[id(g)]})"
            if "max_abs_logit_diff" not in g:
                continue
            extra = ""
            if g is gate and isinstance(gate.get("worst_class_dice"), float):
                extra += f"  worst class Dice {gate['worst_class_dice']:.4f}"
            if g is gate and gate.get("seconds_per_window") and gate.get("fp32_seconds_per_window"):
                extra += f"  {gate['fp32_seconds_per_window'] / gate['seconds_per_window']:.1f}x fp32 speed"
            print(f"  gate {label}: {'passed' if gate.get('passed') else 'FAILED'}  "
                  f"max |Δlogit| {g.get('max_abs_logit_diff', float('nan')):.2e}  "
                  f"argmax agreement {g.get('argmax_agreement', float('nan')):.6f}{extra}")
        if not gate.get("passed") and gate.get("reason"):
            print(f"    ({gate['reason']})")
    from segrt.engine.backends import passed_cpu_variants

    usable = passed_cpu_variants(art)
    print(f"  'segrt run' on the CPU will use: {usable[0] if usable else 'fp32 (ONNX Runtime)'}")
    return 0


def _run_input(a):
    """The input as segrt.imageio takes it: one path, or the list of a DICOM series' files."""
    return a.input[0] if len(a.input) == 1 else list(a.input)


def _check_run_outputs(a, source) -> list | None:
    """Every output of 'segrt run' checked before the model loads; returns the --labels selection (or None)."""
    from segrt.engine.segmentation import _source_paths, check_run_input, check_run_output
    from segrt.errors import UsageError
    from segrt.safety import check_output_dir, check_output_file

    if a.output is None and not (a.split or a.stats or a.preview):
        raise UsageError("segrt run needs an output: -o LABELS.nii.gz (or --split DIR / --stats FILE / --preview "
                         "FILE.png, or --plan to only print the plan)")
    if a.output is not None:
        check_run_output(a.output, source, a.artifact, fmt=a.format)
    else:
        check_run_input(source)
    if a.series is not None and check_run_input(source) != "dicom":
        raise UsageError(f"--series selects a DICOM series, but the input {a.input[0]!r} is not DICOM")
    inputs = _source_paths(source)
    if a.stats:
        check_output_file(a.stats, inputs=inputs, exts=(".json", ".csv"), what="statistics file")
    if a.preview:
        check_output_file(a.preview, inputs=inputs, exts=(".png",), what="preview")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--preview needs matplotlib: pip install 'segrt[preview]'")
    if a.split:
        if a.format not in (None, "nifti", "nrrd"):
            raise UsageError(f"--split writes nifti or nrrd files, not {a.format}")
        check_output_dir(a.split, sources=inputs, what="split directory")
    if a.labels is None:
        return None
    import numpy as np

    from segrt.artifact import Artifact
    from segrt.stats import parse_label_list, select_labels

    keep = parse_label_list(a.labels)
    select_labels(np.zeros((1, 1, 1), np.uint8), Artifact.load(a.artifact).spec.class_names, keep)  # names checked
    return keep


def cmd_run(a) -> int:
    from segrt.engine.engine import Engine

    if a.plan:
        return _print_plan(a)
    source = _run_input(a)
    keep = _check_run_outputs(a, source)  # before the model is loaded: fails in well under a second
    with Engine.load(a.artifact, device=a.device, variant=a.variant, threads=a.threads,
                     overlap=a.overlap, skip_empty=not a.no_skip, max_memory=a.max_memory,
                     accum_dtype=a.accum_dtype, gpu_batch=a.gpu_batch,
                     trust_torch_program=a.trust_torch_program) as eng:
        seg = eng.segment(source, series=a.series, progress=None if not a.quiet else False)
        seg.timings["load"] += getattr(eng, "load_seconds", 0.0)
    if keep is not None:
        seg = seg.select(keep)
    extra = {}
    if a.output is not None:
        seg.save(a.output, a.format)
    if a.split:
        extra["split"] = [str(p) for p in seg.save_split(a.split, fmt="nrrd" if a.format == "nrrd" else "nifti")]
    if a.stats:
        extra["stats"] = str(seg.write_statistics(a.stats))
    if a.preview:
        extra["preview"] = str(seg.write_preview(a.preview))
    if a.json:
        print(json.dumps({"output": None if a.output is None else str(a.output), **extra, "timings": seg.timings,
                          "volumes_ml": seg.volumes_ml(), **seg.metadata}, indent=2))
    elif not a.quiet:
        m = seg.metadata
        skipped = f" ({m['windows_skipped']} skipped by the skip rule)" if m.get("windows_skipped") else ""
        shape = f"{seg.labels.shape[0]}×{seg.labels.shape[1]}×{seg.labels.shape[2]}"
        what = f"wrote {a.output}" if a.output is not None else "segmented"
        print(f"{what}  ({shape}, {m['windows_run']} of {m['windows']} windows run{skipped}, "
              f"backend {m['backend']})")
        if "split" in extra:
            print(f"  split: {len(extra['split'])} file(s) in {a.split}")
        for key in ("stats", "preview"):
            if key in extra:
                print(f"  {key}: {extra[key]}")
        if seg.metadata.get("overlap_overridden"):
            print(f"  overlap {','.join(f'{o:g}' for o in seg.metadata['overlap'])} "
                  f"(artifact: {','.join(f'{o:g}' for o in seg.metadata['artifact_overlap'])})")
        print_timings(seg.timings)
    return 0


def _print_plan(a) -> int:
    from segrt.engine.engine import Engine
    from segrt.engine.segmentation import check_run_input
    from segrt.niftiheader import inspect_nifti

    source = _run_input(a)
    if check_run_input(source) == "nifti":
        inspect_nifti(a.input[0])  # a bad input fails before the model is loaded
    with Engine.load(a.artifact, device=a.device, variant=a.variant, threads=a.threads,
                     overlap=a.overlap, skip_empty=not a.no_skip, max_memory=a.max_memory,
                     accum_dtype=a.accum_dtype, gpu_batch=a.gpu_batch,
                     trust_torch_program=a.trust_torch_program) as eng:
        plan = eng.plan(source, series=a.series)
        cal = eng.calibrate(plan.inference.sw_batch_size)
    if a.json:
        print(json.dumps(plan.to_dict(cal), indent=2))
    else:
        print(plan.describe(cal))
    return 0


def cmd_info(a) -> int:
    from segrt.artifact import Artifact

    art = Artifact.load(a.artifact)
    if a.json:
        print(json.dumps(art.manifest, indent=2))
        return 0
    print(format_info(art))
    return 0


def cmd_demo(a) -> int:
    from segrt.demo import run_demo

    run_demo(a.output, orientation=a.orientation, spacing=a.spacing, seed=a.seed, quiet=a.quiet)
    return 0


def cmd_batch(a) -> int:
    from segrt.batch import run_cli

    return run_cli(a)


def cmd_serve(a) -> int:
    from segrt.serve import run_cli

    return run_cli(a)


COMMANDS = {"export": cmd_export, "run": cmd_run, "info": cmd_info, "demo": cmd_demo, "batch": cmd_batch,
            "serve": cmd_serve}

def main(argv=None) -> int:
    """Run the CLI; every failure is one ``segrt: error: ...`` line on stderr and exit status 2 (130 on Ctrl-C).
    ``-v`` adds the traceback above that line."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if a.version:
        from segrt import __version__

        print(f"segrt {__version__}")
        return 0
    if not a.command:
        parser.print_help()
        return EXIT_ERROR
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[a.command](a)
    except KeyboardInterrupt:
        print("segrt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes one line and exit status 2
        if a.verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"segrt: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
