"""A split under torchrun that one rank breaks on purpose (tests/test_distributed.py).

    torchrun --standalone --nproc-per-node 2 tests/dist_driver.py SRC OUT --fail-rank 0 --fail-at 3 --slow 0.2

Every finished tensor is journaled at once (commit_seconds=0), rank `--fail-rank` raises a
NumericsError at its `--fail-at`-th solve, and every solve first sleeps `--slow` seconds, so the
other ranks are still working when the failure happens. Exits with the error's exit code; prints
"stopped after N solves" per rank on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgeon.commands.split as pipeline  # noqa: E402
import surgeon.engine.runner as runner  # noqa: E402
from surgeon.engine import distributed  # noqa: E402
from surgeon.errors import NumericsError, SurgeonError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--fail-rank", type=int, default=0)
    ap.add_argument("--fail-at", type=int, default=3)
    ap.add_argument("--slow", type=float, default=0.0)
    a = ap.parse_args()
    rank = distributed.env_rank()
    real, calls = runner.split_one, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if rank == a.fail_rank and calls["n"] == a.fail_at:
            raise NumericsError(f"injected failure on rank {rank}")
        time.sleep(a.slow)
        return real(*args, **kwargs)

    runner.split_one = flaky
    opts = pipeline.SplitOptions(rank=4, shard_size="100KB", commit_seconds=0, workers=1, prefetch=0)
    try:
        pipeline.split(a.src, Path(a.out), opts)
    except SurgeonError as e:
        print(f"rank {rank} stopped after {calls['n']} solves: {type(e).__name__}: {e}", flush=True)
        return e.exit_code
    print(f"rank {rank} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
