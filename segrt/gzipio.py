"""gzip for NIfTI files: the fastest importable codec (ISA-L, zlib-ng, the standard library) for reading and writing,
and rapidgzip's parallel decoder for large inputs on many-core hosts. :mod:`segrt.volume` reads and writes through
it; ``python benchmarks/bench_io.py`` measures the codecs (results in ``benchmarks/results/io_*.json``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GzipCodec", "gzip_codec", "load_codec", "open_parallel", "gzip_isize", "readinto_full"]


# ---- gzip codec ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GzipCodec:
    """A gzip implementation: ``module`` has the standard ``gzip`` module's API (``GzipFile``, ``open``,
    ``compress``, ``decompress``); ``level`` is the compression level segrt writes with."""

    name: str  # "isal", "zlib-ng" or "stdlib"
    version: str
    module: object
    level: int

    @property
    def fast(self) -> bool:
        return self.name != "stdlib"


def load_codec(name: str) -> GzipCodec | None:
    """The codec ``name`` when its package is importable, else None."""
    import importlib

    try:
        if name == "isal":
            # python-isal (https://python-isal.readthedocs.io): ``isal.igzip`` is a drop-in ``gzip``
            # (IGzipFile subclasses gzip.GzipFile). ISA-L has levels 0-3 only (and its level 0 still
            # compresses, unlike zlib's; xopen's v1.9.0 notes use ISA-L at levels 1-2 only). Level 1
            # is about the size of zlib level 1, nibabel's default: see benchmarks/bench_io.py.
            igzip = importlib.import_module("isal.igzip")
            return GzipCodec("isal", importlib.import_module("isal").__version__, igzip, 1)
        if name == "zlib-ng":
            # python-zlib-ng (https://github.com/pycompression/python-zlib-ng): ``zlib_ng.gzip_ng`` is a
            # drop-in ``gzip`` (GzipNGFile subclasses gzip.GzipFile) with zlib's 0-9 level scale.
            gzip_ng = importlib.import_module("zlib_ng.gzip_ng")
            return GzipCodec("zlib-ng", importlib.import_module("zlib_ng").__version__, gzip_ng, 1)
        if name == "stdlib":
            import gzip
            import zlib

            # nibabel.save's own level (nibabel.openers.Opener.default_compresslevel)
            return GzipCodec("stdlib", zlib.ZLIB_RUNTIME_VERSION, gzip, 1)
    except ImportError:
        return None
    raise ValueError(f"unknown gzip codec {name!r}: expected 'isal', 'zlib-ng' or 'stdlib'")


CODEC: list = []  # the selected codec, chosen once (tests reset it)


def gzip_codec() -> GzipCodec:
    """The fastest importable gzip codec: ISA-L, then zlib-ng, then the standard library."""
    if not CODEC:
        for name in ("isal", "zlib-ng", "stdlib"):
            codec = load_codec(name)
            if codec is not None:
                CODEC.append(codec)
                break
    return CODEC[0]


# ---- parallel gzip decoding -----------------------------------------------------------------------
# rapidgzip (https://github.com/mxmlnkn/rapidgzip, Apache-2.0/MIT; optional, in the [gpu] extra) decodes any gzip
# file on several cores (speculative block finding, as in pugz; CRC32 checked, also in parallel mode). On 2 cores it
# is slower than ISA-L's single thread (benchmarks/results/io_2026-11-26.json, python benchmarks/bench_io.py). Its
# published scaling is to many cores,
# so it is used only from PARALLEL_MIN_THREADS usable CPUs (GPU hosts) and for files of at least
# PARALLEL_MIN_BYTES; that it helps there is NOT yet measured (benchmarks/device_session.sh runs bench_io on the
# lent GPU host to find out). SEGRT_PARALLEL_GZIP=0 switches it off, =1 uses it from 2 CPUs.
PARALLEL_MIN_BYTES = 16 << 20
PARALLEL_MIN_THREADS = 8
PARALLEL_MAX_THREADS = 16


def decode_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, PARALLEL_MAX_THREADS))


def address_space_limited() -> bool:
    """True when RLIMIT_DATA or RLIMIT_AS is set. rapidgzip reserves gigabytes of address space it never touches
    (see VmData against RSS while it decodes) and crashes the process with SIGSEGV, not an exception, when such a
    limit refuses the reservation (rapidgzip 0.16.2; ``tests/test_volume_read.py`` runs a child under such a
    limit) - so it is not used then."""
    try:
        import resource
    except ImportError:  # not POSIX
        return False
    for which in ("RLIMIT_DATA", "RLIMIT_AS"):
        res = getattr(resource, which, None)
        if res is not None and resource.getrlimit(res)[0] != resource.RLIM_INFINITY:
            return True
    return False


def open_parallel(p: Path):
    """A rapidgzip reader for ``p`` (caller closes it: an unclosed one aborts the interpreter at exit), or None
    when rapidgzip is not installed, switched off (``SEGRT_PARALLEL_GZIP=0``), fewer than
    ``PARALLEL_MIN_THREADS`` CPUs are usable (2 with ``SEGRT_PARALLEL_GZIP=1``), the file is small or the address
    space is limited (see :func:`address_space_limited`)."""
    threads = decode_threads()
    mode = os.environ.get("SEGRT_PARALLEL_GZIP", "")
    if mode == "0" or threads < (2 if mode == "1" else PARALLEL_MIN_THREADS) or address_space_limited():
        return None
    try:
        if p.stat().st_size < PARALLEL_MIN_BYTES:
            return None
        import rapidgzip
    except (ImportError, OSError):
        return None
    try:
        return rapidgzip.open(str(p), parallelization=threads)
    except Exception:  # noqa: BLE001 - not a gzip file etc.: the standard path decides
        return None


def gzip_isize(p: Path) -> int | None:
    """The last member's ISIZE field (uncompressed size mod 2**32) from the file's last 4 bytes."""
    try:
        with open(p, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little")
    except OSError:
        return None


def readinto_full(f, buf: memoryview) -> int:
    got = 0
    n = len(buf)
    while got < n:
        k = f.readinto(buf[got:got + (8 << 20)])
        if not k:
            break
        got += k
    return got
