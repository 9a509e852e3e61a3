"""benchmarks/bench_gpu.py --smoke: the whole script (bundle copy with weights, export, MONAI in memory and file to
file, segrt through Engine in memory and file to file) runs on the CPU and records what it claims to."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("monai")
pytest.importorskip("torch")


def test_bench_gpu_smoke(tmp_path):
    from benchmarks import bench_gpu

    out = tmp_path / "smoke.json"
    prof = tmp_path / "profile.txt"
    assert bench_gpu.main(["--smoke", "--runs", "1", "--gpu-batch", "1", "3", "--no-cli", "--work",
                           str(tmp_path / "w"), "--out", str(out), "--profile", str(prof)]) == 0
    assert "Self CPU" in prof.read_text()
    r = json.loads(out.read_text())
    assert r["config"]["device"] == "cpu" and r["config"]["gpu_batch"] == [1, 3]
    for scope in ("in_memory", "file"):
        assert set(r["monai"][scope]) == {"fp32"}
        assert set(r["segrt"][scope]) == {"batch1_float16", "batch3_float16"}
        for entry in r["segrt"][scope].values():
            assert len(entry["runs"]) == 1 and entry["median_total_s"] > 0
            agree = [v for k, v in entry.items() if k.startswith("agreement_vs_monai")]
            assert agree and min(agree) > 0.999  # same weights, same pipeline (fp16 accumulator)
    mem = r["segrt"]["in_memory"]
    assert mem["batch1_float16"]["runs"][0]["windows"] == mem["batch3_float16"]["runs"][0]["windows"] >= 1
    assert set(r["segrt"]["file"]["batch1_float16"]["runs"][0]["stages"]) >= {"load", "write", "infer"}
    assert any(k.startswith("file:") for k in r["speedups"])
    assert (tmp_path / "w" / "segrt_batch3_float16.nii.gz").is_file()
    # the README's performance section formats this JSON (and still the first format's results)
    from benchmarks import report

    rows = report.gpu_section(out, r)
    assert any(row.startswith("| MONAI fp32 |") for row in rows)
    seg = [row for row in rows if row.startswith("| segrt batch3 float16 |")]
    assert len(seg) == 1 and "—" not in seg[0].split("|")[2:4]  # both columns filled
    legacy = report._newest("gpu_nvidia-h200_*.json")
    if legacy[1] is not None:  # the first format still renders
        assert any(row.startswith("| segrt") for row in report.gpu_section(*legacy))
