"""Stage timers: CUDA events on a CUDA device (no synchronisation until the end), perf_counter elsewhere."""

from __future__ import annotations

import time

import torch

__all__ = ["StageTimer"]


class StageTimer:
    """Accumulates the time of named stages.

    ``with timer("stitch"): ...`` or ``t = timer.start("infer"); ...; timer.stop(t)``. On CUDA each interval is a
    pair of events recorded on the current stream; :meth:`results` synchronises once and sums them (seconds).
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._open: dict[int, tuple[str, object]] = {}
        self._spans: list[tuple[str, object, object]] = []
        self._n = 0

    def start(self, name: str) -> int:
        self._n += 1
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self._open[self._n] = (name, ev)
        return self._n

    def stop(self, token: int) -> None:
        name, ev0 = self._open.pop(token)
        if self.cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
        else:
            ev1 = time.perf_counter()
        self._spans.append((name, ev0, ev1))

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.tok = timer.start(name)
                return self_inner

            def __exit__(self_inner, *exc):
                timer.stop(self_inner.tok)
                return False

        return _Ctx()

    def results(self, names=()) -> dict[str, float]:
        out = {n: 0.0 for n in names}
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        for name, a, b in self._spans:
            dt = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out
