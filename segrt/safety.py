"""Output safety: every output is checked before any work is done, so that no run destroys its input and no run
fails after minutes of inference because of where it was told to write.

* :func:`check_output_file` — a file output (labels, later other formats): known extension, a name the file system
  accepts (together with the temporary name it is first written under), an existing writable directory (proved by
  creating and removing a probe file there: permission bits alone say nothing for root or on a read-only mount),
  free space where it can be known, and **never an input**: the same path, the same inode (a hard link), or a
  symbolic link to an input is refused.
* :func:`check_output_dir` — a directory output (an artifact, the demo folder): not a file, not a source or a
  folder holding one (``--force`` would delete it), a parent that exists and is writable.
* :func:`temp_name` — the temporary name an output is first written under (a bounded length, so that a long
  output name still fits the file system's limit), then renamed into place (``os.replace``: atomic).

All checks raise :class:`segrt.errors.OutputError` naming the problem and what was expected. They take well
under a second (a few ``stat`` calls and one probe file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from segrt.errors import OutputError

__all__ = ["check_output_file", "check_output_dir", "same_file", "temp_name", "format_bytes", "atomic_write",
           "TEMP_PREFIX_CHARS"]

#: characters of the final name kept in a temporary name (``.<name[:40]>.<random>.tmp<ext>``)
TEMP_PREFIX_CHARS = 40


def temp_name(name: str, ext: str = "") -> tuple[str, str]:
    """``(prefix, suffix)`` for ``tempfile.mkstemp`` of an output called ``name``: hidden, bounded in length."""
    return f".{name[:TEMP_PREFIX_CHARS]}.", f".tmp{ext}"


def atomic_write(path: str | os.PathLike, write, *, ext: str = "", mode: str = "wb", by_path: bool = False,
                 error=OutputError, translate: tuple = (OSError,), encoding: str | None = None,
                 newline: str | None = None) -> Path:
    """Write ``path`` all or nothing: ``write`` fills a temporary file beside it (:func:`temp_name`), which is then
    renamed into place; on any failure (Ctrl-C included) the temporary file is removed and an older ``path`` is
    left as it was. ``write(fileobj)`` gets the open file (``mode``/``encoding``/``newline``), or with ``by_path``
    ``write(tmp_path)`` its name (for writers that open files themselves). Exceptions of the ``translate`` types
    become ``error`` naming the output."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    prefix, suffix = temp_name(out.name, ext)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=str(folder))
    except OSError as exc:
        raise error(f"cannot write {str(out)!r}: {exc.strerror or exc}") from exc
    try:
        if by_path:
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding, "newline": newline})) as f:
                write(f)
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, translate):
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise error(f"cannot write {str(out)!r}: {why}") from exc
        raise
    return out


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(str(folder), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # pragma: no cover - non-POSIX
        return 255


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file: equal after resolving symbolic links and ``..``, or (both
    existing) the same device and inode — a hard link, a bind mount."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _is_within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (both resolved)."""
    i, o = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return i == o or o in i.parents


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the one test that holds for root, read-only mounts and ACLs."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".segrt-probe-", dir=str(folder))
    except OSError as exc:
        raise OutputError(f"cannot write the {what} into directory {str(folder)!r}: "
                          f"{exc.strerror or exc} (expected a writable directory)") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:  # pragma: no cover
        pass


def format_bytes(n: float, digits: int = 1) -> str:
    """``n`` bytes for a message, in binary units: ``512 B``, ``1.5 MiB`` (``digits`` decimals)."""
    for unit, f in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= f:
            return f"{n / f:.{digits}f} {unit}"
    return f"{n:.0f} B"


def check_output_file(path: str | os.PathLike, *, inputs: Iterable = (), exts: Iterable[str] = (".nii.gz", ".nii"),
                      what: str = "output", min_free_bytes: int = 0) -> Path:
    """Check that ``path`` can be written as a new or replaced file, before any work; return it as a Path.

    ``inputs``: paths the run reads (input image, artifact files): the output may be none of them. ``exts``: the
    accepted endings (case-insensitive). ``min_free_bytes``: refused when the file system has less free space
    (callers pass a lower bound of the output's size).
    """
    if path is None or str(path) == "":
        raise OutputError(f"{what} path is empty; expected a file name like labels.nii.gz")
    out = Path(path)
    exts = tuple(exts)
    name = out.name
    low = name.lower()
    ext = next((e for e in exts if low.endswith(e) and len(low) > len(e)), None)
    if ext is None:
        raise OutputError(f"{what} {str(out)!r} has an unknown extension; expected a name ending with "
                          f"{' or '.join(exts)}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.exists():
        raise OutputError(f"{what} directory {str(folder)!r} does not exist; create it first or choose another "
                          f"{what} path")
    if not folder.is_dir():
        raise OutputError(f"{what} directory {str(folder)!r} is not a directory")
    limit = _name_max(folder)
    tmp_len = len(os.fsencode("".join(temp_name(name, ext)))) + 8
    if len(os.fsencode(name)) > limit or tmp_len > limit:
        raise OutputError(f"{what} file name is {len(os.fsencode(name))} bytes long; this file system allows "
                          f"{limit} (choose a shorter name)")
    for inp in inputs:
        if inp is not None and same_file(out, inp):
            raise OutputError(f"{what} {str(out)!r} is the input {str(inp)!r} (the same file"
                              f"{', through a link' if os.path.realpath(out) != os.path.realpath(inp) else ''}); "
                              f"refusing to overwrite an input - choose another {what} path")
    if out.is_symlink() or out.exists():
        if out.is_dir():
            raise OutputError(f"{what} {str(out)!r} is a directory; expected a file path")
        if out.exists() and not out.is_file():
            raise OutputError(f"{what} {str(out)!r} exists and is not a regular file")
    _probe_writable(folder, what)
    if min_free_bytes > 0:
        try:
            free = shutil.disk_usage(str(folder)).free
        except OSError:  # pragma: no cover
            free = None
        if free is not None and free < min_free_bytes:
            raise OutputError(f"not enough free space for the {what} in {str(folder)!r}: it needs at least "
                              f"{format_bytes(min_free_bytes)}, {format_bytes(free)} are free")
    return out


def check_output_dir(path: str | os.PathLike, *, sources: Iterable = (), what: str = "output directory") -> Path:
    """Check that directory ``path`` can be created (or filled / replaced) without touching a source; return it.

    Refused: an existing file, a path that is a source or holds one (replacing it would delete the source), a
    source that holds it only when it *is* the source, a missing or unwritable parent, an over-long name. Whether an
    existing directory may be replaced is the caller's decision (``segrt export --force``)."""
    if path is None or str(path) == "":
        raise OutputError(f"{what} path is empty")
    out = Path(path).absolute()
    for src in sources:
        if src is None:
            continue
        if same_file(out, src) or (os.path.exists(src) and _is_within(src, out)):
            raise OutputError(f"{what} {str(out)!r} is or holds the source {str(src)!r}; refusing to write over "
                              f"a source - choose another {what}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {str(out)!r} exists and is not a directory")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"parent directory {str(parent)!r} of the {what} does not exist; create it first")
    limit = _name_max(parent)
    if len(os.fsencode(out.name)) + 24 > limit:
        raise OutputError(f"{what} name is {len(os.fsencode(out.name))} bytes long; this file system allows "
                          f"{limit - 24} here (room is kept for the temporary name)")
    _probe_writable(out if out.is_dir() else parent, what)
    return out
