"""What the CLI's subcommands share (``segrt`` in segrt/cli.py, ``segrt batch`` in segrt/batch.py, ``segrt serve``
in segrt/serve.py): argument types, and the one line every failure is reported as (:func:`error_line`). Its own
module so that batch and serve need not import the CLI that imports them."""

from __future__ import annotations

import argparse

from segrt.errors import SegrtError

__all__ = ["error_line", "positive_int"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


positive_int = _positive_int


#: packages of the optional extras, and the extra that brings each
_EXTRA_OF = {"torch": "export", "monai": "export", "onnx": "export", "onnxscript": "export", "einops": "export",
             "openvino": "cpu", "triton": "gpu", "tensorrt": "tensorrt", "matplotlib": "preview",
             "pydicom": "dicom", "highdicom": "dicom", "nrrd": "nrrd"}


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for ``exc`` (without the ``segrt: error:`` prefix): segrt's own errors as they
    are; what a library or the system raised, translated into what was wrong and what to do."""
    if isinstance(exc, SegrtError):
        return " ".join(str(exc).split("\n"))
    if isinstance(exc, ModuleNotFoundError):
        top = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF.get(top)
        if extra:
            return (f"this command needs {top!r}, which is not installed: install segrt's [{extra}] extra "
                    f"(pip install 'segrt[{extra}]')")
        return f"a required module is missing: {exc.name!r} ({exc}); reinstall segrt"
    if isinstance(exc, MemoryError):
        return "out of memory: the input needs more RAM than this machine has free (try --max-memory, or a machine " \
               "with more memory)"
    if isinstance(exc, OSError):
        where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or type(exc).__name__}{where}"
    if isinstance(exc, RecursionError):
        return "input nested too deeply (recursion limit reached)"
    msg = " ".join(str(exc).split())[:300]
    return f"unexpected {type(exc).__name__}: {msg} (run with -v for the traceback; please report it)"
