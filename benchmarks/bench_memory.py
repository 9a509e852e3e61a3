"""Stitcher memory as a function of volume size and classes: the formula, and measurements that check it.

Usage::

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory_<date>.json, prints tables

1. **Formula** (``segrt.engine.stitch_memory.stitch_buffers``) for the wholeBody geometry (roi 96³, overlap 0.25,
   batch 1) at the 3 mm size (144×144×200), 256³ and the 1.5 mm size (287×287×397), for 6 and 105 classes,
   float32 / float16 accumulators, MONAI's window order and the ``compact`` order; with the old single-level
   ring (``4·(K+1)·roi_x·Y·Z``) and the full volume (``4·(K+1)·X·Y·Z``) for comparison.
2. **Measured** (``tracemalloc``: every NumPy buffer) peak of the stitcher alone on small volumes, with a
   NumPy predictor that allocates nothing, against the formula.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from segrt.engine.stitch import sliding_window_blocks

from segrt.engine.stitch_memory import stitch_buffers  # noqa: E402
from segrt.spec import InferenceSpec  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MIB = 2 ** 20


def wholebody_spec(bs: int = 1) -> InferenceSpec:
    return InferenceSpec(roi_size=(96, 96, 96), sw_batch_size=bs, overlap=(0.25,) * 3, blend_mode="gaussian",
                         padding_mode="replicate")


def formula_table() -> list[dict]:
    rows = []
    spec = wholebody_spec()
    for shape in ((144, 144, 200), (256, 256, 256), (287, 287, 397)):
        for k in (6, 105):
            ring = 4 * (k + 1) * 96 * shape[1] * shape[2]
            full = 4 * (k + 1) * int(np.prod(shape))
            for acc in ("float32", "float16"):
                for order in ("monai", "compact"):
                    t = stitch_buffers(shape, spec, k, accum_dtype=acc, order=order, inplace_weighting=True)
                    rows.append({"shape": list(shape), "classes": k, "accum_dtype": acc, "order": order,
                                 "stitch_bytes": sum(t.values()), "terms": t, "old_ring_bytes": ring,
                                 "full_volume_bytes": full})
    return rows


class _Predictor:
    def __init__(self, k, roi):
        self.buf = np.empty((1, k, *roi), np.float32)

    def __call__(self, x):
        for c in range(self.buf.shape[1]):
            np.multiply(x[:, 0], np.float32(c + 1), out=self.buf[:, c])
        return self.buf[:len(x)]


def measured_table() -> list[dict]:
    rows = []
    roi = (24, 24, 24)
    spec = InferenceSpec(roi_size=roi, sw_batch_size=1, overlap=(0.25,) * 3, blend_mode="gaussian",
                         padding_mode="replicate")
    for shape in ((60, 60, 60), (90, 70, 60), (120, 100, 80)):
        for k in (6, 32):
            for acc in ("float32", "float16"):
                img = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
                pred = _Predictor(k, roi)
                t = stitch_buffers(shape, spec, k, accum_dtype=acc, slabs=False)
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                for _, block in sliding_window_blocks(img, spec, pred, k, accum_dtype=acc):
                    del block
                peak = tracemalloc.get_traced_memory()[1] - base
                tracemalloc.stop()
                rows.append({"shape": list(shape), "classes": k, "accum_dtype": acc, "predicted_bytes": sum(t.values()),
                             "measured_bytes": int(peak), "ratio": peak / sum(t.values()),
                             "full_volume_bytes": 4 * (k + 1) * int(np.prod(shape))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default=None, help="JSON path (default: benchmarks/results/memory_<date>.json)")
    a = p.parse_args(argv)
    formula = formula_table()
    measured = measured_table()
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "numpy": np.__version__},
           "date": dt.date.today().isoformat(), "formula": formula, "measured": measured}
    path = Path(a.output) if a.output else RESULTS / f"memory_{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print("stitcher memory (MiB), wholeBody geometry (roi 96, overlap 0.25, batch 1), network output weighted in place")
    print(f"{'shape':>14} {'K':>4} {'accum':>8} {'order':>8} {'stitch':>8} {'cells':>8} {'old ring':>9} {'full':>8}")
    for r in formula:
        print(f"{'x'.join(map(str, r['shape'])):>14} {r['classes']:>4} {r['accum_dtype']:>8} {r['order']:>8} "
              f"{r['stitch_bytes'] / MIB:8.0f} {r['terms']['cells'] / MIB:8.0f} {r['old_ring_bytes'] / MIB:9.0f} "
              f"{r['full_volume_bytes'] / MIB:8.0f}")
    print("\nmeasured (tracemalloc) vs formula, roi 24, overlap 0.25")
    for r in measured:
        print(f"{'x'.join(map(str, r['shape'])):>14} K={r['classes']:<3} {r['accum_dtype']:>8} predicted "
              f"{r['predicted_bytes'] / MIB:7.2f} MiB measured {r['measured_bytes'] / MIB:7.2f} MiB "
              f"({r['ratio']:.3f})")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
