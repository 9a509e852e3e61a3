"""The one exception tree of segrt.

Every error segrt raises on purpose derives from :class:`SegrtError`; errors of the libraries
underneath (nibabel, ONNX Runtime, torch, monai) are translated at the boundary into one of
these, with a message that says what was expected and what was received.

    SegrtError
    ├── VolumeError        input image missing, unreadable, wrong dimensionality, NaN/Inf voxels
    ├── ArtifactError      artifact directory missing, manifest invalid, model file tampered (hash)
    ├── SpecError          a preprocessing / inference spec that segrt cannot honour
    │   └── UnsupportedTransform   a bundle transform segrt does not implement (named in the message)
    ├── ExportError        a source (bundle, TorchScript, ONNX) cannot be exported
    │   └── GateFailed     an exported model disagrees with its reference beyond the thresholds
    ├── BackendUnavailable the requested runtime backend cannot run here
    ├── InferenceError     the backend rejected an input (e.g. wrong ONNX input shape)
    ├── BudgetError        a declared memory budget cannot be met
    ├── UsageError         an option of the API or the CLI that is out of range or of the wrong type
    └── OutputError        an output that cannot or must not be written (an input, a missing or read-only
                           directory, an unknown extension, a name too long, no free space) - checked before work
"""

from __future__ import annotations

__all__ = [
    "SegrtError",
    "VolumeError",
    "ArtifactError",
    "SpecError",
    "UnsupportedTransform",
    "ExportError",
    "GateFailed",
    "BackendUnavailable",
    "InferenceError",
    "BudgetError",
    "OutputError",
    "UsageError",
]


class SegrtError(Exception):
    """Base class of every error segrt raises on purpose."""


class VolumeError(SegrtError):
    """The input image is missing, unreadable, of the wrong dimensionality or holds NaN/Inf."""


class ArtifactError(SegrtError):
    """The artifact directory is missing, its manifest is invalid, or a model file was altered."""


class SpecError(SegrtError):
    """A preprocessing / inference specification is invalid or cannot be honoured."""


class UnsupportedTransform(SpecError):
    """A bundle uses a transform (or a transform option) that segrt does not implement."""


class ExportError(SegrtError):
    """A model source cannot be exported to an artifact."""


class GateFailed(ExportError):
    """An exported model disagrees with its reference beyond the documented thresholds."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class BackendUnavailable(SegrtError):
    """The requested runtime backend cannot run on this machine."""


class InferenceError(SegrtError):
    """The runtime backend rejected an input."""


class BudgetError(SegrtError):
    """A declared memory budget cannot be met by any plan."""


class OutputError(SegrtError):
    """An output path that cannot or must not be written; raised before any work is done."""


class UsageError(SegrtError):
    """An option given to the API or the CLI is out of range or of the wrong type."""
