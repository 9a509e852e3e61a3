"""Stage timers on a torch device: CUDA events on CUDA (no synchronisation until the end), the orchestrator's
``perf_counter`` timer elsewhere."""

from __future__ import annotations

import torch

from segrt.engine.orchestrator import Timer

__all__ = ["StageTimer"]


class StageTimer(Timer):
    """:class:`segrt.engine.orchestrator.Timer` whose intervals, on a CUDA device, are pairs of events recorded on
    the current stream; :meth:`results` then synchronises once and sums them (seconds)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.cuda = torch.device(device).type == "cuda"
        self._events: list[tuple[str, object, object]] = []

    def start(self, name: str) -> int:
        if not self.cuda:
            return super().start(name)
        tok = next(self._tokens)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._open[tok] = (name, ev)
        return tok

    def stop(self, token: int) -> None:
        if not self.cuda:
            return super().stop(token)
        name, ev0 = self._open.pop(token)
        ev1 = torch.cuda.Event(enable_timing=True)
        ev1.record()
        self._events.append((name, ev0, ev1))

    def results(self, names=()) -> dict[str, float]:
        out = super().results(names)
        if self._events:
            torch.cuda.synchronize()
        for name, a, b in self._events:
            out[name] = out.get(name, 0.0) + a.elapsed_time(b) / 1000.0
        return out
