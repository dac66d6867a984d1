"""How a streaming job runs its stages: per-stage clocks and asynchronous device-to-host copies.

Shared by split's read → solve → write loop; knows no method and no file format.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch


class StageClock:
    """Seconds spent per stage, summed over threads: where the main loop waited (wait_read,
    wait_solve, wait_write, wait_commit) and how busy the solver and writer threads were. The
    largest wait names the bottleneck of a run."""

    def __init__(self):
        self._t: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._t[stage] = self._t.get(stage, 0.0) + time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in sorted(self._t.items())}



def write_all(outputs: list, clock: StageClock) -> None:
    """Write (writer, name, tensor) triples, waiting for any copy still in flight."""
    with clock("writer_busy"):
        for writer, name, t in outputs:
            if isinstance(t, HostCopy):
                t = t.wait()
            writer.write(name, t)


class HostCopy:
    """A device tensor being copied into page-locked host memory on the current CUDA stream; the
    solver thread goes on at once and the writer thread waits for the copy."""

    def __init__(self, t: torch.Tensor):
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # torch caches pinned blocks
        self.host.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> torch.Tensor:
        self.event.synchronize()
        return self.host
