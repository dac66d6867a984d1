"""Fault injection for the test suite: named points where a test can kill the process (SIGKILL,
as `kill -9` would) or slow it down, so that kills land exactly where they must.

    SURGEON_FAULT=after-rename surgeon split ...          # killed right after the final rename
    SURGEON_FAULT=tensor:5 surgeon split ...              # killed when the 5th tensor is handed to the writer
    SURGEON_SLOW=0.2 surgeon split ...                    # every solve takes 0.2 s longer

Unset (always, outside tests), each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}


def point(name: str) -> None:
    """Kill this process here if SURGEON_FAULT names this point ("name" or "name:N" for the N-th pass)."""
    spec = os.environ.get("SURGEON_FAULT")
    if not spec:
        return
    _counts[name] = _counts.get(name, 0) + 1
    for item in spec.split(","):
        want, _, nth = item.partition(":")
        if want == name and (not nth or int(nth) == _counts[name]):
            os.kill(os.getpid(), signal.SIGKILL)


def slow() -> None:
    """Sleep SURGEON_SLOW seconds (a slow solver, so that a test's kill lands mid-run)."""
    delay = os.environ.get("SURGEON_SLOW")
    if delay:
        time.sleep(float(delay))
