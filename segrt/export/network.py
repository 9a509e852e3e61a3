"""A network held as a state dict plus its class: how nnU-Net, HD-BET and most research code keep trained models.

``segrt export weights.pt --spec spec.json`` where the spec has a ``"network"`` section::

    "network": {
        "class": "my_package.models:UNet3D",        # module:Class (module.Class also accepted)
        "kwargs": {"in_channels": 1, "num_classes": 3},
        "state_dict_key": "network_weights",         # optional: the checkpoint entry holding the weights
        "strip_prefix": "module.",                   # optional: removed from every key (DataParallel, Lightning)
        "strict": true,                              # optional (default true): every key must match
        "python_path": ["../code"]                   # optional: folders put on sys.path to import the class,
    }                                                #   relative to the spec file

The section is not part of the artifact's spec (the runtime never sees a class path); ``export`` records it in
the manifest's ``source.network``. Loading:

* the checkpoint is read with ``torch.load(weights_only=True)``: tensors, dicts, lists, strings and numbers only
  — a checkpoint that pickles other objects is refused (unpickling runs code) with a hint to save its
  ``state_dict()`` alone;
* the weights are the checkpoint itself when it is a flat ``{name: tensor}`` mapping, else
  ``checkpoint[state_dict_key]``, else the single entry among ``state_dict``, ``network_weights``, ``model``,
  ``model_state_dict``, ``net``, ``weights`` that is such a mapping;
* ``strip_prefix`` is removed from every key; with ``strict`` every parameter and buffer of the network must be in
  the state dict and the state dict may hold nothing else (the error lists the first missing / unexpected keys),
  and every shape must match;
* importing the class runs the user's module: that is the user's own code, named by the user's spec.

The loaded network goes through the same export as a TorchScript source (deep-supervision heads, norm
canonicalisation, fixed-batch fallback, gate against torch).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from segrt.errors import ExportError, SpecError

__all__ = ["NETWORK_KEYS", "STATE_DICT_SUFFIXES", "check_network_section", "load_network"]

NETWORK_KEYS = ("class", "kwargs", "state_dict_key", "strip_prefix", "strict", "python_path")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_CANDIDATE_KEYS = ("state_dict", "network_weights", "model", "model_state_dict", "net", "weights")


def check_network_section(section) -> dict:
    """Validate a spec's ``"network"`` section (types, unknown keys with a suggestion); return it normalised."""
    import difflib

    if not isinstance(section, dict):
        raise SpecError(f"spec 'network' must be an object like {{\"class\": \"module:Class\", \"kwargs\": {{}}}}, "
                        f"got {type(section).__name__}")
    for key in section:
        if key not in NETWORK_KEYS:
            near = difflib.get_close_matches(key, NETWORK_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SpecError(f"spec 'network' has an unknown key {key!r}{hint}; expected keys: {', '.join(NETWORK_KEYS)}")
    cls = section.get("class")
    if not isinstance(cls, str) or not cls.strip():
        raise SpecError("spec 'network.class' must be a string 'module:Class' (e.g. 'my_models.unet:UNet3D')")
    module, _, name = cls.partition(":") if ":" in cls else cls.rpartition(".")
    if not module or not name or not all(p.isidentifier() for p in module.split(".")) or not all(
            p.isidentifier() for p in name.split(".")):
        raise SpecError(f"spec 'network.class' {cls!r} is not 'module:Class' (dotted module path, then the class)")
    kwargs = section.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise SpecError(f"spec 'network.kwargs' must be an object, got {type(kwargs).__name__}")
    for key in ("state_dict_key", "strip_prefix"):
        if section.get(key) is not None and not isinstance(section[key], str):
            raise SpecError(f"spec 'network.{key}' must be a string, got {type(section[key]).__name__}")
    strict = section.get("strict", True)
    if not isinstance(strict, bool):
        raise SpecError(f"spec 'network.strict' must be true or false, got {strict!r}")
    paths = section.get("python_path", [])
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise SpecError("spec 'network.python_path' must be a folder or a list of folders")
    return {"class": cls, "module": module, "name": name, "kwargs": kwargs,
            "state_dict_key": section.get("state_dict_key"), "strip_prefix": section.get("strip_prefix"),
            "strict": strict, "python_path": paths}


def _import_class(net: dict, base_dir: Path | None):
    added = []
    for p in net["python_path"]:
        folder = (base_dir / p if base_dir is not None and not Path(p).is_absolute() else Path(p)).resolve()
        if not folder.is_dir():
            raise ExportError(f"spec 'network.python_path' entry {p!r} is not a folder ({folder})")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
            added.append(str(folder))
    try:
        try:
            obj = importlib.import_module(net["module"])
        except Exception as exc:  # noqa: BLE001 - any import-time failure of the user's module
            raise ExportError(f"cannot import {net['module']!r} for network class {net['class']!r}: "
                              f"{type(exc).__name__}: {exc}" + ("" if net["python_path"] else
                                                                 " (add its folder to 'network.python_path')"))
        for part in net["name"].split("."):
            if not hasattr(obj, part):
                raise ExportError(f"module {net['module']!r} has no {net['name']!r} (network class "
                                  f"{net['class']!r})")
            obj = getattr(obj, part)
    finally:
        for p in added:
            sys.path.remove(p)
    return obj


def _flat_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _pick_state_dict(ckpt, key: str | None, path: Path) -> tuple[dict, str | None]:
    if key is not None:
        if not isinstance(ckpt, dict) or key not in ckpt:
            have = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ExportError(f"{path}: no entry {key!r} (spec 'network.state_dict_key') in the checkpoint; it "
                              f"has {have}")
        if not _flat_tensor_dict(ckpt[key]):
            raise ExportError(f"{path}: checkpoint entry {key!r} is not a mapping of parameter names to tensors")
        return ckpt[key], key
    if _flat_tensor_dict(ckpt):
        return ckpt, None
    if isinstance(ckpt, dict):
        hits = [k for k in _CANDIDATE_KEYS if _flat_tensor_dict(ckpt.get(k))]
        if len(hits) == 1:
            return ckpt[hits[0]], hits[0]
        nested = [k for k, v in ckpt.items() if _flat_tensor_dict(v)]
        raise ExportError(f"{path}: cannot tell which checkpoint entry holds the weights (entries that are "
                          f"state dicts: {nested or 'none'}); name it with spec 'network.state_dict_key'")
    raise ExportError(f"{path}: the checkpoint is a {type(ckpt).__name__}, not a state dict")


def load_network(weights_path, section: dict, base_dir=None):
    """The network of ``section`` (:func:`check_network_section`'s result) with the weights of ``weights_path``
    loaded, in eval mode on the CPU; and what the manifest records about it."""
    import torch

    path = Path(weights_path)
    net = section
    cls = _import_class(net, Path(base_dir) if base_dir is not None else None)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln.split("WeightsUnpickler error:", 1)[-1].split(" was not an allowed")[0].strip()
                    for ln in lines if "Unsupported global" in ln), lines[0][:200] if lines else "")
        raise ExportError(f"{path}: not a checkpoint torch.load can read with weights_only=True "
                          f"({type(exc).__name__}: {why}); segrt does not unpickle arbitrary objects — "
                          f"save the weights alone with torch.save(model.state_dict(), 'weights.pt')") from exc
    state, key = _pick_state_dict(ckpt, net["state_dict_key"], path)
    prefix = net["strip_prefix"]
    if prefix:
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    try:
        model = cls(**net["kwargs"])
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        raise ExportError(f"{net['class']}(**{net['kwargs']!r}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{net['class']}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if net["strict"] and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        common = next((k for k in state if any(k.endswith(o) and k != o for o in own)), None)
        hint = ""
        if common is not None:
            owner = next(o for o in own if common.endswith(o))
            hint = f"; the keys seem to carry a prefix: set 'network.strip_prefix' to {common[:-len(owner)]!r}"
        raise ExportError(f"{path}: the state dict does not fit {net['class']}: " + ", ".join(parts) + hint +
                          " (set 'network.strict': false to load the matching keys only)")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state
           and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k, got, want = bad[0]
        raise ExportError(f"{path}: {len(bad)} weight shape(s) differ from {net['class']}({net['kwargs']}), e.g. "
                          f"{k!r} is {list(got)} in the file and {list(want)} in the network — check 'network.kwargs'")
    model.load_state_dict(state, strict=False)
    info = {"class": net["class"], "kwargs": net["kwargs"], "state_dict_key": key,
            "strip_prefix": prefix, "strict": net["strict"],
            "loaded_keys": len(own) - len(missing), "missing_keys": len(missing), "unexpected_keys": len(unexpected)}
    return model.eval(), info
