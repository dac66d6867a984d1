"""Host memory this process may still use: MemAvailable (/proc/meminfo), capped by the cgroup's
memory.max less what the cgroup uses (plus its reclaimable page cache), as the kernel's OOM killer
sees it. Used before loading a whole model (`surgeon check`) and by the trainer's memory plan.

    from surgeon.runtime.memory import host_available
    host_available()          # bytes
"""

from __future__ import annotations

import os
from pathlib import Path


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_headroom() -> int | None:
    try:
        top = Path("/sys/fs/cgroup")
        limit = (top / "memory.max").read_text().strip()
        if limit == "max":
            return None
        stat = dict(line.split() for line in (top / "memory.stat").read_text().splitlines())
        reclaimable = int(stat.get("inactive_file", 0))  # page cache the kernel drops before it kills
        return int(limit) - int((top / "memory.current").read_text()) + reclaimable
    except (OSError, ValueError):
        return None


def host_available() -> int:
    """Bytes of host memory this process may still allocate before the kernel kills it."""
    try:
        avail = _meminfo_available()
    except OSError:  # not Linux
        import psutil

        avail = psutil.virtual_memory().available
    cg = _cgroup_headroom()
    return min(avail, cg) if cg is not None else avail
