"""Sizes given on the command line, parsed without torch (surgeon.precheck checks them before it loads).

    parse_size("5GB") == 5_000_000_000; parse_size("2GiB") == 2 * 2**30
"""

from __future__ import annotations

from surgeon.errors import UsageError


def parse_size(text: str) -> int:
    """--shard-size text ("5GB", "500MB", "2GiB", bytes) → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num) :]]
    except (ValueError, KeyError) as e:
        raise UsageError(f"--shard-size {text!r} is not a size like 5GB, 500MB or 2GiB.") from e
    if value < 1:
        raise UsageError("--shard-size must be positive.")
    return int(value)
