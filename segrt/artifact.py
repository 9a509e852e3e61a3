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
from segrt.spec import Spec, _check_keys

__all__ = ["Artifact", "contained_file", "SCHEMA", "SCHEMA_VERSION", "sha256_file", "write_json_atomic"]

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


#: the manifest's top-level keys (anything else is a typo or a manifest from another tool: refused)
MANIFEST_KEYS = ("schema", "schema_version", "created", "versions", "source", "weights", "spec", "models", "gate",
                 "export_seconds")
#: model file formats the runtime loads; each is data, not code, except the torch program (see README, Security)
MODEL_FORMATS = ("onnx", "tensorrt", "torch.export", "torchscript")


def contained_file(root: Path, rel, what: str, owner: str | None = None, error=ArtifactError) -> Path:
    """``root / rel`` after checking, before anything is opened, that ``rel`` is a relative, normalised path that
    resolves (symbolic links followed) to a regular file inside ``root``. The message says what is wrong with the
    *name* and nothing about a file outside the artifact (no hash, no size, no existence). ``owner`` starts the
    message (default: the artifact), ``error`` is the exception class raised."""
    import posixpath
    from pathlib import PurePosixPath, PureWindowsPath

    owner = owner or f"artifact {str(root)!r}"
    bad = (not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel
           or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive
           or posixpath.normpath(rel) != rel or any(part in ("..", ".") for part in PurePosixPath(rel).parts))
    if bad:
        raise error(f"{owner}: {what} path {rel!r} is not allowed: expected a relative, normalised path to a "
                    f"file inside {str(root)!r} (no '..', no absolute path)")
    base = root.resolve()
    try:
        real = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise error(f"{owner}: {what} {rel!r} is missing") from None
    if base not in real.parents:
        raise error(f"{owner}: {what} {rel!r} resolves outside {str(root)!r} (a symbolic link?); refusing to "
                    f"open it")
    if not real.is_file():
        raise error(f"{owner}: {what} {rel!r} is not a regular file")
    return real


def _check_model_entry(root: Path, variant, entry, spec: Spec) -> None:
    """A model entry's fields: a string path, a sha256, a known format, and input/output shapes that agree with the
    spec (the roi is the network's fixed spatial input: a manifest roi the model does not take is refused here,
    before anything is allocated for it)."""
    where = f"artifact {str(root)!r}: models[{variant!r}]"
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where} must be an object with 'path' and 'sha256', got {type(entry).__name__}")
    for key in ("path", "sha256"):
        if not isinstance(entry.get(key), str):
            raise ArtifactError(f"{where}: missing or invalid {key!r} (expected a string)")
    fmt = entry.get("format", "onnx")
    if fmt not in MODEL_FORMATS:
        raise ArtifactError(f"{where}: unknown format {fmt!r}; expected one of {', '.join(MODEL_FORMATS)}")
    inf = spec.inference
    fixed_batch = entry.get("fixed_batch")
    if fixed_batch is not None:
        if isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or not 1 <= fixed_batch <= 4096:
            raise ArtifactError(f"{where}: fixed_batch must be an integer in 1..4096, got {fixed_batch!r}")
        if fixed_batch < inf.sw_batch_size:
            raise ArtifactError(f"{where}: the model takes a fixed batch of {fixed_batch} windows, fewer than the "
                                f"spec's inference.sw_batch_size {inf.sw_batch_size}")
    for key, channels, name in (("input_shape", spec.in_channels, "in_channels"),
                                ("output_shape", spec.num_classes, "num_classes")):
        shape = entry.get(key)
        if shape is None:
            continue
        if not isinstance(shape, list) or len(shape) != 5:
            raise ArtifactError(f"{where}: {key} must be a list of 5 dimensions (batch, channels, x, y, z), "
                                f"got {shape!r}")
        fixed = [d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape]
        if fixed[1] is not None and fixed[1] != channels:
            raise ArtifactError(f"{where}: {key} has {fixed[1]} channels, the spec's {name} is {channels}")
        for axis, (d, r) in enumerate(zip(fixed[2:], inf.roi_size)):
            if d is not None and d != r:
                raise ArtifactError(f"{where}: the model takes windows of {shape[2:]} voxels, but the spec's "
                                    f"inference.roi_size is {list(inf.roi_size)}; expected the model's fixed "
                                    f"spatial input")


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
        mpath = contained_file(root, MANIFEST, "manifest")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ArtifactError(f"{mpath}: not valid JSON ({str(exc)[:200]})") from None
        except OSError as exc:
            raise ArtifactError(f"{mpath}: cannot be read ({exc.strerror or exc})") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            raise ArtifactError(f"{mpath}: not a segrt manifest (expected schema {SCHEMA!r}, "
                                f"got {manifest.get('schema') if isinstance(manifest, dict) else None!r})")
        ver = manifest.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise ArtifactError(f"{mpath}: schema_version {ver!r} is not supported by this segrt "
                                f"(expected {SCHEMA_VERSION}); re-export the artifact")
        try:
            _check_keys(manifest, MANIFEST_KEYS, "manifest")
        except SpecError as exc:
            raise ArtifactError(f"{mpath}: {exc}") from None
        models = manifest.get("models")
        if not isinstance(models, dict) or not models:
            raise ArtifactError(f"{mpath}: 'models' must list at least one model file")
        try:
            spec = Spec.from_dict(manifest.get("spec"))
        except SpecError as exc:
            raise ArtifactError(f"{mpath}: invalid spec: {exc}") from None
        for variant, entry in models.items():
            _check_model_entry(root, variant, entry, spec)
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
        p = contained_file(self.root, entry["path"], "model file")
        if verify:
            digest = sha256_file(p)
            if digest != entry.get("sha256"):
                raise ArtifactError(
                    f"artifact {str(self.root)!r}: model file {entry['path']!r} does not match its "
                    f"manifest hash (expected sha256 {entry.get('sha256')}, got {digest}); the file was "
                    f"altered or corrupted - re-export the artifact")
            if entry.get("format", "onnx") == "onnx":
                self._check_onnx_embedded(p, entry["path"])
        return p

    def _check_onnx_embedded(self, p: Path, rel: str) -> None:
        """segrt's exporter embeds every tensor: an ONNX model here that refers to external data files (possibly
        outside the artifact) is refused before ONNX Runtime opens it."""
        from segrt.onnxproto import OnnxFormatError, external_data_locations

        try:
            locations = external_data_locations(p)
        except (OnnxFormatError, OSError, ValueError) as exc:
            raise ArtifactError(f"artifact {str(self.root)!r}: model file {rel!r} is not a valid ONNX file "
                                f"({exc})") from None
        if locations:
            raise ArtifactError(f"artifact {str(self.root)!r}: model file {rel!r} refers to {len(locations)} "
                                f"external data file(s); segrt artifacts embed all weights in the model file - "
                                f"re-export the artifact")

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("weights", {}).get("random_init", False))
