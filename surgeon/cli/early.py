"""Disk reads that start before torch is imported (opt-in: SURGEON_EARLY_READ=N reads in flight):
`surgeon split MODEL` pulls the model's shards into the page cache on N threads while Python imports
torch, opens the CUDA context and plans the split, so the pipeline's first reads find their bytes in
memory. Off by default: on the GPU machine's disk, cold, 8 reads in flight cut the 7B split's
pipeline by 4-6 s but slowed torch's own cold import from the same disk by more (wall +4 s,
bench/RESULTS.md, issue 29).

Imports only the standard library (it runs before anything heavy). It reads what the split reads
anyway, only regular files (no links) directly inside a local model folder, at most half of the
memory the kernel reports available, and never more than once; its bytes are dropped, not kept: the
split's reader still reads, validates and hashes every tensor itself.

    from surgeon.cli import early; early.start(["split", "path/to/model", "--out", "x"]); early.stop()
"""

from __future__ import annotations

import os
import stat
import threading
from itertools import pairwise
from pathlib import Path

CHUNK = 16 << 20  # bytes per positioned read
DEPTH = 8  # reads in flight
_OUT_FLAGS = {"--out", "-o"}


class Warmer:
    """`depth` threads read `files` in order, `chunk` bytes at a time, up to `budget` bytes, into
    one scratch buffer each; `stop()` ends them after their current read."""

    def __init__(self, files: list[Path], budget: int, depth: int = DEPTH, chunk: int = CHUNK):
        self.jobs = _chunks(files, budget, chunk)
        self.done_bytes = 0
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(chunk,), name="surgeon-early-read", daemon=True) for _ in range(depth)]
        for t in self._threads:
            t.start()

    def _take(self) -> tuple[Path, int, int] | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self.jobs):
                return None
            self._next += 1
            return self.jobs[self._next - 1]

    def _work(self, chunk: int) -> None:
        scratch = bytearray(chunk)
        fds: dict[Path, int] = {}
        try:
            while (job := self._take()) is not None:
                path, offset, n = job
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                got = os.preadv(fds[path], [memoryview(scratch)[:n]], offset)
                with self._lock:
                    self.done_bytes += got
        except OSError:
            pass  # only a head start: the split's own reader reports any error, as one line
        finally:
            for fd in fds.values():
                os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _chunks(files: list[Path], budget: int, chunk: int) -> list[tuple[Path, int, int]]:
    jobs = []
    for f in files:
        size = f.stat().st_size
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if budget < n:
                return jobs
            jobs.append((f, off, n))
            budget -= n
    return jobs


def model_files(argv: list[str]) -> list[Path]:
    """The shards a `split` command line will read, when its model is a local folder: regular
    *.safetensors files (no links) directly inside a folder that holds a config.json."""
    if not argv or argv[0] != "split":
        return []
    for prev, tok in pairwise(argv):
        if tok.startswith("-") or prev in _OUT_FLAGS:
            continue
        d = Path(tok)
        try:
            if not (d.is_dir() and (d / "config.json").is_file()):
                continue
            return sorted(p for p in d.iterdir() if p.name.endswith(".safetensors") and stat.S_ISREG(os.lstat(p).st_mode))
        except OSError:
            return []
    return []


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where there is none: no head start)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_warmer: Warmer | None = None


def start(argv: list[str]) -> Warmer | None:
    """Begin reading the model of a `split` command line (SURGEON_EARLY_READ: the number of reads in
    flight; unset or 0: none)."""
    global _warmer
    try:
        depth = int(os.environ.get("SURGEON_EARLY_READ", "0"))
    except ValueError:
        depth = 0
    if _warmer is not None or depth <= 0:
        return _warmer
    files = model_files(argv)
    budget = available_memory() // 2
    if files and budget:
        _warmer = Warmer(files, budget, depth=depth)
    return _warmer


def stop() -> None:
    global _warmer
    if _warmer is not None:
        _warmer.stop()
        _warmer = None
