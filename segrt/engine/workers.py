"""The stitcher's worker threads: a gather thread and an inference thread overlapped with stitching (bit-identical
to the sequential path), pinned one per physical core, and the malloc setting that keeps many cell-sized arrays from
fragmenting the heap."""

from __future__ import annotations

import os
import queue
import threading
from typing import Sequence

__all__ = ["physical_core_cpus", "fix_malloc_mmap_threshold"]


def physical_core_cpus() -> list[int]:
    """One logical CPU per physical core this process may run on (hyper-thread siblings dropped)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))
    seen, out = set(), []
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                sib = f.read().strip()
        except OSError:
            sib = str(cpu)
        if sib not in seen:
            seen.add(sib)
            out.append(cpu)
    return out or allowed


def _pin_current_thread(cpus: Sequence[int]) -> None:
    try:
        os.sched_setaffinity(0, set(cpus))  # pid 0: the calling thread (Linux)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux / not permitted
        pass


_MALLOC_FIXED = False


def fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap (returned to the system on
    free). glibc otherwise raises that threshold after the first large free (up to 32 MiB), and the stitcher's
    many cell-sized arrays then fragment the heap: resident memory grows past the live set (see the peak RSS of
    ``python benchmarks/bench_memory.py`` with and without it). Process-wide; done once; False where not glibc."""
    global _MALLOC_FIXED
    if _MALLOC_FIXED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _MALLOC_FIXED = bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        _MALLOC_FIXED = False
    return _MALLOC_FIXED


class _Stop(Exception):
    pass


def _threaded(batches, gather, infer, slots: int = 2):
    """Yield ``(windows, weighted)`` of each batch, gathering and inferring ahead in two pinned threads.

    At most ``slots`` weighted batches exist at once (the one the caller stitches and the one being inferred);
    the caller must call the returned ``release`` after it is done with each batch.
    """
    q_in: queue.Queue = queue.Queue(maxsize=1)
    q_out: queue.Queue = queue.Queue()
    sem = threading.Semaphore(slots)
    stop = threading.Event()
    cpus = physical_core_cpus()

    def put(q, item):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(q):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def gatherer():
        _pin_current_thread(cpus)
        try:
            for bw in batches:
                put(q_in, ("ok", bw, gather(bw)))
            put(q_in, ("end", None, None))
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            try:
                put(q_in, ("error", exc, None))
            except _Stop:
                return

    def inferer():
        _pin_current_thread(cpus)
        try:
            while True:
                kind, bw, buf = get(q_in)
                if kind != "ok":
                    put(q_out, (kind, bw, None))
                    return
                while not sem.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                try:
                    wb = infer(buf)
                except BaseException as exc:  # noqa: BLE001
                    put(q_out, ("error", exc, None))
                    return
                del buf
                put(q_out, ("ok", bw, wb))
        except _Stop:
            return

    threads = [threading.Thread(target=gatherer, name="segrt-gather", daemon=True),
               threading.Thread(target=inferer, name="segrt-infer", daemon=True)]
    for t in threads:
        t.start()

    def gen():
        try:
            while True:
                kind, bw, wb = q_out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise bw
                yield bw, wb
        finally:
            stop.set()
            for t in threads:
                t.join()

    return gen(), sem.release
