"""Per-module ranks and alphas, with PEFT's `rank_pattern` / `alpha_pattern` semantics.

    surgeon split MODEL --rank 16 --rank-pattern 'mlp\\..*=32' --rank-pattern 'layers\\.0\\..*=8' --alpha-pattern 'v_proj=64'

A pattern is `REGEX=VALUE`. PEFT (peft/utils/other.py `get_pattern_key`, used by lora/model.py's
`_create_and_replace`) takes, for a module named `name` (its name in the base model, e.g.
"model.layers.0.mlp.up_proj"), the FIRST key in the dict's order for which
    re.match(rf"(.*\\.)?({key})$", name)
matches, i.e. the key matches a dotted suffix of the name completely; with no such key the module
gets the global `r` / `lora_alpha`. surgeon resolves every module with exactly that rule
(`pattern_key`), writes the patterns in the order given to adapter_config.json, and records the
resolved rank, alpha and scale per layer in surgeon.json; so PEFT rebuilds the same shapes and
scalings (tests/test_patterns.py compares against PEFT's own function).

Default alpha. surgeon's default is alpha = rank (scale 1). PEFT's default for a module whose rank
comes from a pattern is the global lora_alpha (scale alpha/r_m ≠ 1). So when --alpha is not given,
each rank-pattern key K also gets alpha_pattern[K] = the method's default alpha for rank r_K, placed
after the given --alpha-pattern keys (which therefore win): every module keeps the method's default
scale unless an alpha was asked for. With --alpha given, PEFT's own rule holds unchanged.
"""

from __future__ import annotations

import re
import time

import regex

from surgeon.errors import UsageError

REGEX_SECONDS = 2.0  # what all the matches of one user regex may take together (regex checks the clock coarsely: ~2x)


class UserRegex:
    """A regex the user typed (--target, --rank-pattern, --alpha-pattern, spectra --layers), matched by
    the `regex` engine under one time budget for all its matches: a pattern that backtracks
    exponentially, such as '(.*?.*?)*(X|Y)', is refused in one line instead of running for hours
    (Python's `re` has no timeout). `regex` is compatible with `re` for these patterns, and it also
    skips at once many a pattern that `re` gets lost in, such as '(.*.*)*X'."""

    def __init__(self, pattern: str, option: str, shown: str | None = None, seconds: float | None = None):
        """shown: the user's own text when `pattern` wraps it (PEFT's suffix rule)."""
        self.pattern, self.option = shown if shown is not None else pattern, option
        try:
            self.rx = regex.compile(pattern)
        except regex.error as e:
            raise UsageError(f"{option} {self.pattern!r} is not a regular expression ({e}).") from None
        self.seconds = REGEX_SECONDS if seconds is None else seconds
        self.deadline: float | None = None  # set by the first match

    def _run(self, how: str, text: str):
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        try:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return getattr(self.rx, how)(text, timeout=left)
        except TimeoutError:
            raise UsageError(f"{self.option} {self.pattern!r} takes more than {self.seconds:g} s to match names like {text!r} "
                             "(nested repeats such as (.*.*)* backtrack exponentially); simplify the regular expression.") from None

    def fullmatch(self, text: str):
        return self._run("fullmatch", text)

    def match(self, text: str):
        return self._run("match", text)

    def search(self, text: str):
        return self._run("search", text)


def parse(items: list[str] | None, option: str, integer: bool) -> dict[str, float | int]:
    """["REGEX=VALUE", ...] -> {REGEX: VALUE} in the given order (the last '=' splits)."""
    out: dict[str, float | int] = {}
    for item in items or []:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise UsageError(f"{option} {item!r}: write REGEX=VALUE, e.g. {option} 'mlp\\..*={16 if integer else 32}'.")
        try:
            re.compile(key)
            v = int(value) if integer else float(value)
        except re.error as e:
            raise UsageError(f"{option} {item!r}: {key!r} is not a valid regular expression ({e}).") from None
        except ValueError:
            raise UsageError(f"{option} {item!r}: {value!r} is not {'an integer' if integer else 'a number'}.") from None
        if not 0 < v < float("inf"):  # NaN fails too
            raise UsageError(f"{option} {item!r}: the value must be a positive, finite number.")
        out[key] = v
    return out


def pattern_key(keys, name: str, option: str = "a rank/alpha pattern") -> str | None:
    """PEFT's get_pattern_key: the first key matching a dotted suffix of `name` entirely, else None
    (each match bounded in time: UserRegex)."""
    for key in keys:
        if UserRegex(rf"(.*\.)?({key})$", option, shown=key).match(name):
            return key
    return None


def resolve(name: str, r: int, alpha: float, rank_pattern: dict, alpha_pattern: dict) -> tuple[int, float]:
    """(rank, alpha) of module `name` as PEFT computes them from an adapter config."""
    rk, ak = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
    return int(rank_pattern[rk]) if rk is not None else int(r), float(alpha_pattern[ak]) if ak is not None else float(alpha)


def layer_ranks(modules: list[str], rank: int, alpha: float, rank_pattern: dict, alpha_pattern: dict,
                alpha_given: bool, default_alpha) -> tuple[dict[str, tuple[int, float]], dict, dict]:
    """Per module (rank, alpha), and the rank_pattern / alpha_pattern to write.

    Refuses a pattern that matches no targeted module (a typo would otherwise pass silently)."""
    alpha_pattern = dict(alpha_pattern)
    if not alpha_given:
        for k, r in rank_pattern.items():  # every key, even one equal to the global alpha: a later key must not shadow it
            alpha_pattern.setdefault(k, float(default_alpha(int(r))))
    for option, pats in (("--rank-pattern", rank_pattern), ("--alpha-pattern", alpha_pattern)):
        for k in pats:
            if not any(pattern_key([k], m, option) for m in modules):
                raise UsageError(f"{option} {k!r} matches no targeted module (PEFT matches a whole dotted suffix, e.g. "
                                 f"'q_proj' or 'layers\\.0\\..*'); targeted modules look like {modules[0]}.")
    ranks = {m: resolve(m, rank, alpha, rank_pattern, alpha_pattern) for m in modules}
    return ranks, dict(rank_pattern), alpha_pattern


def layer_configs(targets: dict, cfg, method, opts) -> tuple[dict, dict, dict]:
    """Each targeted module's MethodConfig (its rank and alpha from --rank-pattern/--alpha-pattern), and the patterns."""
    import dataclasses

    rp = parse(opts.rank_pattern, "--rank-pattern", integer=True)
    ap = parse(opts.alpha_pattern, "--alpha-pattern", integer=False)
    modules = [t.module for t in targets.values()]
    if not rp and not ap:
        return {m: cfg for m in modules}, {}, {}
    ranks, rp, ap = layer_ranks(modules, cfg.rank, cfg.alpha, rp, ap, opts.alpha is not None, method.default_alpha)
    out = {m: dataclasses.replace(cfg, rank=r, alpha=a) for m, (r, a) in ranks.items()}
    for c in set(out.values()):
        method.check(c)
    return out, rp, ap
