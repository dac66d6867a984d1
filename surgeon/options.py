"""Numeric options, checked in one place before any work starts (before a folder is made): each is a
finite number in its range, or the command stops with one line naming the option (exit 2).

    surgeon split MODEL --workers -1 --out o     # error: --workers -1 must be a whole number from 0 to 256.
    surgeon train SPLIT --min-lr-ratio nan ...   # error: --min-lr-ratio nan must be a number from 0 to 1.

split, absorb, train and push call `check` with their rules; `parse_size` reads --shard-size and
`device` reads --device. Library callers (SplitOptions, AbsorbOptions, TrainOptions) pass through
the same checks, so a value typed into Python is refused as one typed on the command line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from surgeon.errors import UsageError


@dataclass(frozen=True)
class Range:
    """Where a number may lie: lo ≤ v ≤ hi (< where open); always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False
    hi_open: bool = False

    def holds(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.integer and not isinstance(v, int)):
            return False
        if not math.isfinite(v):  # NaN and ±inf fail every range
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None and self.lo_open == self.hi_open:
            return f"{kind} {'strictly between' if self.lo_open else 'from'} {_num(self.lo)} {'and' if self.lo_open else 'to'} {_num(self.hi)}"
        parts = [f"{'>' if self.lo_open else '≥'} {_num(self.lo)}"] if self.lo is not None else []
        parts += [f"{'<' if self.hi_open else '≤'} {_num(self.hi)}"] if self.hi is not None else []
        return f"{kind} {' and '.join(parts)}".strip()


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
COUNT = Range(1, integer=True)  # steps, batch sizes: at least one
WORKERS = Range(0, 256, integer=True)  # 0: the default for the device


def check(*rules: tuple[str, object, Range], required: bool = False) -> None:
    """Refuse the first (option, value, range) whose value is outside its range; None passes (an option
    not given) unless `required`."""
    for option, value, rng in rules:
        if (value is not None or required) and not rng.holds(value):
            raise UsageError(f"{option} {value!r} must be {rng.describe()}.")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text, option: str = "--shard-size") -> int:
    """A size ("5GB", "500MB", "2GiB", bytes) → bytes: finite, at least one byte."""
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * SIZE_UNITS[t[len(num):]]
    except (ValueError, KeyError):
        raise UsageError(f"{option} {text!r} is not a size like 5GB, 500MB or 2GiB.") from None
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"{option} {text!r} must be a finite size of at least one byte, like 5GB or 500MB.")
    return int(value)


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device(value: str, option: str = "--device") -> str:
    """auto, cpu, cuda or cuda:N; anything else (meta, mps, a typo) is refused before any work."""
    if not isinstance(value, str) or not DEVICE.match(value):
        raise UsageError(f"{option} {value!r}: choose auto, cpu, cuda or cuda:N.")
    return value


CALIBRATE_MODES = ("kpm", "ipm", "asvd", "whiten")  # = surgeon.linalg.calibrated.MODES
CALIBRATE_DEFAULT_MODE = {"milora": "kpm", "kasa": "kpm", "nusa": "kpm", "pissa": "ipm"}  # the methods --calibrate serves
CALIBRATE_SIDE_FIXED = ("kasa", "nusa")  # they drop/train the minor side by definition: ipm would invert them


def calibrate_mode(method: str, data: str | None, tokens: int, mode: str | None, peft: bool = False, quantize: str | None = None) -> str | None:
    """The calibration mode in force for `surgeon split --calibrate` (None without --calibrate), or
    one UsageError line: a method it does not serve, an unknown mode, a bad --calibrate-tokens."""
    if data is None:
        given = [o for o, v in (("--calibrate-mode", mode is not None), ("--calibrate-peft", peft)) if v]
        if given:
            raise UsageError(f"{given[0]} only applies with --calibrate DATA; add --calibrate (e.g. --calibrate default) or drop it.")
        return None
    if method not in CALIBRATE_DEFAULT_MODE:
        raise UsageError(f"--calibrate is not available for --method {method}; use milora, pissa, kasa or nusa, or split without --calibrate.")
    check(("--calibrate-tokens", tokens, COUNT), required=True)
    mode = CALIBRATE_DEFAULT_MODE[method] if mode is None else mode
    if mode not in CALIBRATE_MODES:
        raise UsageError(f"--calibrate-mode {mode!r} unknown; choose kpm (train/drop the components the text needs least), ipm (the most), asvd or whiten.")
    if mode == "ipm" and method in CALIBRATE_SIDE_FIXED:
        raise UsageError(f"--calibrate-mode ipm would make {method} work on the components the text needs MOST; use kpm or asvd.")
    if quantize:
        raise UsageError("--calibrate and --quantize cannot be combined yet; split with one of them.")
    return mode
