"""How long work reports progress, without knowing who listens (the CLI draws a rich bar)."""

from __future__ import annotations


class Reporter:
    def start(self, total_tensors: int, total_bytes: int, done: int = 0) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def close(self) -> None: ...


class NullReporter(Reporter):
    pass
