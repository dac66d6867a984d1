"""Usage errors of `surgeon split` found before torch is imported (about 0.5 s instead of 3-5 s).

    surgeon split --method lora MODEL --out y        # error: unknown method 'lora' ... (no torch import)
    surgeon split MODEL --rank 100000 --out y        # error: --rank 100000 is not below ... (headers only)

Only what can be judged from the options and the safetensors headers (plain JSON at the start of
each file) is checked here; the full checks run again in surgeon.commands.split.plan_split, so this module
may only refuse what those would refuse too. The name lists are copies of the registries that live
beside torch code; tests/test_usage_speed.py asserts they agree.
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

from surgeon.errors import UsageError
from surgeon.options import parse_size

METHODS = ("kasa", "milora", "moe", "nusa", "pissa")  # = surgeon.methods.names()
SOLVERS = ("auto", "gram-eigh", "subspace", "qr-inverse", "svd")  # = surgeon.linalg.decompose.SOLVERS
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64")  # = surgeon.format.dtypes.USER_DTYPES
MAX_HEADER = 100 << 20  # safetensors' own limit on a header


def check_split_options(model: str, method: str, rank: int, dtype: str | None, solver: str, nusa_options: list[str],
                        shard_size: str = "5GB", check_rank: bool = True) -> None:
    """Raise UsageError for what the options alone (and the local headers) show to be impossible, in
    the order plan_split checks them. The rank comes last and only with `check_rank`: the caller
    passes False when an option plan_split judges first is given (--alpha, method options,
    --quantize ...), or when --target or --rank-pattern make the headers' bound say nothing."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    if nusa_options and method != "nusa":
        raise UsageError(f"{nusa_options[0]} is an option of --method nusa, not of {method}; drop it or choose nusa.")
    if dtype is not None and dtype.lower() not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} unknown; choose float32, bfloat16 or float16.")
    parse_size(shard_size)
    if solver not in SOLVERS:
        raise UsageError(f"--solver {solver!r} unknown; choose {', '.join(SOLVERS)}.")
    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}.")
    if check_rank:
        k = largest_min_side(Path(model).expanduser())
        if k is not None and rank >= k:
            raise UsageError(f"--rank {rank} is not below min(out, in) of any weight of {model} (the largest is {k}); choose a rank below {k}.")


def largest_min_side(path: Path) -> int | None:
    """The largest min(rows, cols) over the 2-D ".weight" tensors of a local safetensors model, from
    the headers alone; None when the model is not local or a header cannot be read (the full
    check then reports it)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.suffix == ".safetensors" and path.is_file() else []
    sides = []
    for f in files:
        header = _header(f)
        if header is None:
            return None
        sides += [min(v["shape"]) for k, v in header.items()
                  if k.endswith(".weight") and isinstance(v, dict) and _is_2d(v.get("shape"))]
    return max(sides) if sides else None


def _is_2d(shape) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in shape)


def _header(path: Path) -> dict | None:
    """The JSON header of a regular file (a FIFO or device would block: None, the full check names it)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    return header if isinstance(header, dict) else None
