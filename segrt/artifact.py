"""Artifact directory: ``manifest.json`` (versioned schema) + model files, with integrity hashes.

The artifact is the only thing the runtime reads. Layout::

    ARTIFACT_DIR/
      manifest.json
      model_fp32.onnx          (and later variants: model_fp16.onnx, *.plan, ...)

``manifest.json`` (schema ``segrt.artifact`` version 1)::

    {
      "schema": "segrt.artifact", "schema_version": 1,
      "created": "2026-11-26T00:00:00Z",
      "versions": {"segrt": "0.1.0", "onnx": "1.23.2", "opset": 18, "torch": "2.13.0", "monai": "1.6.1"},
      "source": {"kind": "bundle" | "torchscript" | "onnx", "path": "...", "name": "...",
                 "overrides": {...}, "bundle_version": "..."},
      "weights": {"random_init": false, "path": "models/model.pt", "sha256": "..."},
      "spec": {...},                         # segrt.spec.Spec.to_dict()
      "models": {"fp32": {"path": "model_fp32.onnx", "sha256": "...", "format": "onnx",
                          "input_name": "input", "output_name": "output",
                          "input_shape": ["batch", 1, 96, 96, 96], "output_shape": ["batch", 105, 96, 96, 96]}},
      "gate": {"fp32": {"passed": true, "max_abs_logit_diff": 1e-5, "argmax_agreement": 1.0, ...}}
    }
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from segrt.errors import ArtifactError, SpecError
from segrt.spec import Spec

__all__ = ["Artifact", "SCHEMA", "SCHEMA_VERSION", "sha256_file", "write_json_atomic"]

SCHEMA = "segrt.artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Artifact:
    """A loaded, verified artifact directory."""

    root: Path
    manifest: dict
    spec: Spec

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Artifact":
        root = Path(path)
        if not root.exists():
            raise ArtifactError(f"artifact directory {str(root)!r} does not exist")
        if not root.is_dir():
            raise ArtifactError(f"artifact {str(root)!r} is not a directory (expected a directory "
                                f"holding {MANIFEST} and model files, as written by 'segrt export')")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"artifact {str(root)!r} has no {MANIFEST}; expected a directory written "
                                f"by 'segrt export'")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{mpath}: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            raise ArtifactError(f"{mpath}: not a segrt manifest (expected schema {SCHEMA!r}, "
                                f"got {manifest.get('schema') if isinstance(manifest, dict) else None!r})")
        ver = manifest.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise ArtifactError(f"{mpath}: schema_version {ver!r} is not supported by this segrt "
                                f"(expected {SCHEMA_VERSION}); re-export the artifact")
        models = manifest.get("models")
        if not isinstance(models, dict) or not models:
            raise ArtifactError(f"{mpath}: 'models' must list at least one model file")
        try:
            spec = Spec.from_dict(manifest.get("spec"))
        except SpecError as exc:
            raise ArtifactError(f"{mpath}: invalid spec: {exc}") from None
        art = cls(root, manifest, spec)
        if verify:
            for variant in models:
                art.model_path(variant, verify=True)
        return art

    @property
    def variants(self) -> list[str]:
        return list(self.manifest["models"])

    def model_entry(self, variant: str = "fp32") -> dict:
        models = self.manifest["models"]
        if variant not in models:
            raise ArtifactError(f"artifact {str(self.root)!r} has no {variant!r} model "
                                f"(it has: {', '.join(models)})")
        return models[variant]

    def model_path(self, variant: str = "fp32", verify: bool = True) -> Path:
        entry = self.model_entry(variant)
        p = self.root / entry["path"]
        if not p.is_file():
            raise ArtifactError(f"artifact {str(self.root)!r}: model file {entry['path']!r} is missing")
        if verify:
            digest = sha256_file(p)
            if digest != entry.get("sha256"):
                raise ArtifactError(
                    f"artifact {str(self.root)!r}: model file {entry['path']!r} does not match its "
                    f"manifest hash (expected sha256 {entry.get('sha256')}, got {digest}); the file was "
                    f"altered or corrupted - re-export the artifact")
        return p

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("weights", {}).get("random_init", False))
