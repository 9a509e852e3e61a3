"""Time of writing a whole-body label map as DICOM-SEG (segrt.dicomseg.write_dicom_seg).

    python benchmarks/bench_dicomseg.py                     # 512x512x400 series, 104 organs, 3 repeats
    python benchmarks/bench_dicomseg.py --shape 128 128 64 --classes 20 --repeats 1   # quick look

The case: a synthetic CT series of ``--shape`` (columns, rows, slices) as segrt.dicomio reads one - headers only,
no pixel data - and a label map of ``--classes`` classes (background + ``classes - 1`` organs: ellipsoids of
log-uniform sizes, 4..60 voxels across in-plane, 3..80 slices long, inside an elliptic body, later ones
overwriting earlier ones), as a C-ordered ``(X, Y, Z)`` uint8 array (the slowest layout: it is transposed).

Modes, each timed ``--repeats`` times after one untimed warm-up call (which includes importing highdicom and
its standard tables; reported as ``first_call_s``), the median reported:

* ``binary``: the default, segrt's fast frame path (1-bit frames, only where a segment is present);
* ``labelmap``: DICOM 2024 Label Map Segmentation (one 8-bit frame per non-empty slice; highdicom alone);
* ``binary_highdicom``: ``fast=False``, highdicom alone building the same BINARY object (the reference);
  ``--no-reference`` skips it (it takes several times longer).

Each written file is checked: NumberOfFrames equals the expected count (segment-slice pairs where the segment
is present; non-empty slices for labelmap) and the segment count equals the classes present.
Writes ``benchmarks/results/dicomseg_cpu_<date>.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"


def make_series(cols: int, rows: int, nslices: int, spacing=(0.8, 0.8, 1.5)):
    """Header-only CT datasets (as read with stop_before_pixels=True), ascending along the normal."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    out = []
    for z in range(nslices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Mark", "B1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261202", "120000", "", "1"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 2, z + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-204.6, -204.6, -600.0 + spacing[2] * z]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        out.append(ds)
    return out


def make_labels(cols: int, rows: int, nslices: int, classes: int, seed: int = 0) -> np.ndarray:
    """(X, Y, Z) uint8: ``classes - 1`` ellipsoid organs of varied sizes inside an elliptic body."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((cols, rows, nslices), np.uint8)
    x, y, z = np.ogrid[:cols, :rows, :nslices]
    scale = min(cols, rows) / 512
    for k in range(1, classes):
        r = np.array([np.exp(rng.uniform(np.log(2), np.log(30))) * scale,
                      np.exp(rng.uniform(np.log(2), np.log(30))) * scale,
                      np.exp(rng.uniform(np.log(1.5), np.log(40))) * nslices / 400])
        r = np.maximum(r, 1.0)
        # centre inside the body ellipse (semi-axes 0.42 * cols, 0.3 * rows around the middle)
        ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * 0.8
        c = np.array([cols / 2 + np.cos(ang) * rad * 0.42 * cols, rows / 2 + np.sin(ang) * rad * 0.3 * rows,
                      rng.uniform(0.05, 0.95) * nslices])
        sl = tuple(slice(max(0, int(c[i] - r[i])), int(c[i] + r[i]) + 2) for i in range(3))
        inside = (((x[sl[0]] - c[0]) / r[0]) ** 2 + ((y[:, sl[1]] - c[1]) / r[1]) ** 2
                  + ((z[:, :, sl[2]] - c[2]) / r[2]) ** 2) <= 1
        lab[sl][inside] = k
    return lab


def _expected_frames(labels: np.ndarray) -> tuple[int, int, int]:
    """(segments present, segment-slice pairs with the segment present, non-empty slices)."""
    top = int(labels.max())
    pairs, nonempty, present = 0, 0, np.zeros(top + 1, bool)
    for zi in range(labels.shape[2]):
        here = np.zeros(top + 1, bool)
        here[labels[:, :, zi].ravel()] = True
        here[0] = False
        pairs += int(here.sum())
        nonempty += int(here.any())
        present |= here
    return int(present.sum()), pairs, nonempty


def run(shape, classes: int, repeats: int, reference: bool, log=print) -> dict:
    import pydicom

    from segrt.dicomseg import write_dicom_seg

    cols, rows, nslices = shape
    t0 = time.perf_counter()
    srcs = make_series(cols, rows, nslices)
    labels = make_labels(cols, rows, nslices, classes)
    names = {k: f"organ_{k:03d}" for k in range(1, classes)}
    n_segments, n_pairs, n_slices = _expected_frames(labels)
    log(f"case: {cols}x{rows}x{nslices}, {n_segments} segments present, {n_pairs} segment-slice frames, "
        f"{n_slices} non-empty slices (made in {time.perf_counter() - t0:.1f} s)")
    modes = [("binary", dict(seg_type="binary"), n_pairs),
             ("labelmap", dict(seg_type="labelmap"), n_slices)]
    if reference:
        modes.append(("binary_highdicom", dict(seg_type="binary", fast=False), n_pairs))
    results = {}
    with tempfile.TemporaryDirectory(prefix="segrt-bench-dicomseg-") as tmp:
        for name, kwargs, frames in modes:
            out = Path(tmp) / f"{name}.dcm"
            try:
                t = time.perf_counter()
                write_dicom_seg(labels, srcs, out, names, **kwargs)
                first = time.perf_counter() - t
            except Exception as exc:  # e.g. LABELMAP with an old highdicom
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name:18s} failed: {exc}")
                continue
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                write_dicom_seg(labels, srcs, out, names, **kwargs)
                times.append(time.perf_counter() - t)
            ds = pydicom.dcmread(str(out), stop_before_pixels=True)
            n_seg = len([s for s in ds.SegmentSequence if int(s.SegmentNumber) != 0])
            ok = int(ds.NumberOfFrames) == frames and n_seg == n_segments
            results[name] = {"seconds_median": statistics.median(times), "seconds_runs": times,
                             "first_call_s": first, "file_bytes": out.stat().st_size,
                             "file_mib": round(out.stat().st_size / 2 ** 20, 2),
                             "frames": int(ds.NumberOfFrames), "segments": n_seg, "checked": ok}
            log(f"{name:18s} {statistics.median(times):7.2f} s median of {repeats} (first call {first:.2f} s), "
                f"{results[name]['file_mib']:8.1f} MiB, {ds.NumberOfFrames} frames, check {'ok' if ok else 'FAILED'}")
            out.unlink()
    if "binary" in results and "binary_highdicom" in results and "error" not in results["binary_highdicom"]:
        results["binary_speedup_vs_highdicom"] = round(
            results["binary_highdicom"]["seconds_median"] / results["binary"]["seconds_median"], 2)
    return {"case": {"shape_xyz": list(shape), "classes": classes, "segments_present": n_segments,
                     "segment_slice_frames": n_pairs, "nonempty_slices": n_slices, "labels_dtype": "uint8",
                     "labels_layout": "C-ordered (X, Y, Z)", "source": "header-only datasets, no pixel data"},
            "modes": results}


def main(argv=None) -> int:
    from benchmarks._machine import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 400), metavar=("COLS", "ROWS", "SLICES"))
    ap.add_argument("--classes", type=int, default=105, help="classes including background (default 105)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="skip highdicom alone (fast=False)")
    ap.add_argument("--out", default=None,
                    help="results file (default benchmarks/results/dicomseg_cpu_<date>.json; '-' to skip)")
    args = ap.parse_args(argv)
    report = {"benchmark": "dicomseg", "date": dt.date.today().isoformat(),
              "machine": machine_info(("numpy", "pydicom", "highdicom", "segrt")),
              "threads": "single-threaded (numpy/pydicom/highdicom, no worker pool)"}
    report.update(run(tuple(args.shape), args.classes, args.repeats, not args.no_reference))
    if args.out != "-":
        out = Path(args.out) if args.out else RESULTS / f"dicomseg_cpu_{report['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
