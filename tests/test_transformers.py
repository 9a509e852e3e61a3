"""monai's transformer networks (UNETR, SwinUNETR) as a bundle's network_def: export to ONNX and pass the gate.

133 output channels as the whole-brain bundle; CI-sized settings of the same classes (the full-size 96³
exports, feature_size 48 / hidden_size 768, are measured by ``benchmarks/bench_brain.py --transformers``).
Both exporters handle both networks once ``einops`` (which monai's ViT / Swin blocks import) is installed;
the manifest records which one produced the file.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from parity_util import FIXTURES

pytest.importorskip("monai")
pytest.importorskip("einops")

BRAIN = FIXTURES / "bundles" / "brain_small"


def _bundle(tmp_path: Path, network_def: dict, roi: int) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(BRAIN / "configs", dst / "configs")  # no scripts/: the network comes from monai
    cfg_path = dst / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["network_def"] = network_def
    cfg["inferer"]["roi_size"] = [roi] * 3
    cfg_path.write_text(json.dumps(cfg, indent=2))
    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 133
    meta_path.write_text(json.dumps(meta, indent=2))
    return dst


CASES = {
    # ViT encoder (patch 16, global self-attention), conv decoder
    "UNETR": ({"_target_": "UNETR", "in_channels": 1, "out_channels": 133, "img_size": [32, 32, 32],
               "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}, 32),
    # windowed and shifted-window attention (with attention masks; the second block of stage 1), patch merging;
    # 64³ is the smallest roi whose deepest stage keeps more than one voxel (InstanceNorm needs it). depths
    # [2, 1, 1, 1] instead of [2, 2, 2, 2] keeps the test near a minute (dynamo's export time grows with blocks)
    "SwinUNETR": ({"_target_": "SwinUNETR", "in_channels": 1, "out_channels": 133, "feature_size": 12,
                   "depths": [2, 1, 1, 1], "num_heads": [3, 6, 12, 24]}, 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transformer_bundle_exports_and_passes_gate(name, tmp_path):
    from segrt.artifact import Artifact
    from segrt.export import export

    net_def, roi = CASES[name]
    b = _bundle(tmp_path, net_def, roi)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="RANDOM"):
        out = export(b, tmp_path / "art", random_init=True, gate_samples=1)
    seconds = time.perf_counter() - t0
    m = Artifact.load(out).manifest
    fp32 = m["models"]["fp32"]
    print(f"TRANSFORMER {name} roi {roi}: exporter {fp32['exporter']} in {fp32['export_seconds']} s, "
          f"whole export {seconds:.1f} s, gate {json.dumps(m['gate']['fp32'])}")
    assert fp32["input_shape"] == ["batch", 1, roi, roi, roi]
    assert fp32["output_shape"] == ["batch", 133, roi, roi, roi]
    assert m["gate"]["fp32"]["passed"] is True
    assert m["gate"]["fp32"]["max_abs_logit_diff"] <= 1e-3 * max(1.0, m["gate"]["fp32"]["max_abs_logit"])
    # torch.export (dynamo) handles both networks; a fallback would be recorded with its reason
    assert fp32["exporter"] == "dynamo", fp32.get("exporter_note")
    assert m["spec"]["num_classes"] == 133
