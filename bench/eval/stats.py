"""The statistics of protocol v2's report: bootstrap intervals, paired differences, matched accuracy.

Forgetting of a run = the mean over the general-text windows of (its NLL − the untrained model's NLL):
the change of log-perplexity in nats per token (paired by window). An arm's point (one lr) has one row
per seed; a bootstrap replicate resamples the seeds and the windows (or test items) with replacement,
the SAME window indices for every arm of a comparison (the text is shared), the same seed indices where
the seeds pair (a paired difference uses only the seeds both arms ran).

    boot(M)                              mean and 95 % interval of M (seeds × units), both levels resampled
    paired(MA, MB)                       the same for MA − MB over their common rows
    interp_at(accs, forgets, a)          forgetting where an lr curve first reaches accuracy a (linear between
                                         neighbouring grid points; None when it never does)
    matched(curves, a)                   per arm, forgetting at accuracy a with a bootstrap interval, and the
                                         paired difference of each arm against a reference arm
"""

from __future__ import annotations

import numpy as np

B = 2000  # bootstrap replicates
SEED = 0


def _rng(seed: int | None = None) -> np.random.Generator:
    return np.random.default_rng(SEED if seed is None else seed)


def boot(m, reps: int = B, seed: int | None = None) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the grand mean of M (rows: seeds, columns: windows or items)."""
    m = np.atleast_2d(np.asarray(m, dtype=float))
    rng = _rng(seed)
    s, w = m.shape
    si, wi = rng.integers(0, s, (reps, s)), rng.integers(0, w, (reps, w))
    stats = np.array([m[si[b]][:, wi[b]].mean() for b in range(reps)])
    return float(m.mean()), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def paired(ma: dict, mb: dict, reps: int = B, seed: int | None = None) -> tuple[float, float, float, int] | None:
    """MA, MB: {seed: row}. (mean, lo, hi, seeds used) of MA − MB over the common seeds; None if none."""
    common = sorted(set(ma) & set(mb))
    if not common:
        return None
    d = np.array([np.asarray(ma[s], float) - np.asarray(mb[s], float) for s in common])
    return boot(d, reps, seed) + (len(common),)


def verdict(ci: tuple | None, better: str, worse: str, floor: float = 0.0) -> str:
    """'better' when the whole interval is below −floor, 'worse' when above +floor, else unresolved."""
    if ci is None:
        return "not measured"
    _, lo, hi = ci[:3]
    if hi < -floor:
        return better
    if lo > floor:
        return worse
    return "no difference resolved (the interval spans 0)"


def interp_at(accs: list[float], forgets: list[float], a: float) -> float | None:
    """Along the curve (lr ascending), the forgetting where accuracy first reaches A, linear in accuracy
    between the two grid points that bracket it; None if the curve never reaches A."""
    for i, acc in enumerate(accs):
        if acc >= a:
            if i == 0:
                return forgets[0] if acc == a else None  # starts above A: no point below to interpolate from
            a0, a1, f0, f1 = accs[i - 1], acc, forgets[i - 1], forgets[i]
            return f0 + (f1 - f0) * (a - a0) / (a1 - a0)
    return None


def common_accuracy(curves: dict) -> float | None:
    """The highest accuracy every arm's curve reaches (min over arms of the max), where each starts below it.
    CURVES: {arm: {"acc": [accuracy, or a matrix whose mean is it, per lr]}}."""
    means = [[float(np.mean(m)) for m in c["acc"]] for c in curves.values() if len(c["acc"])]
    tops, lows = [max(m) for m in means], [min(m) for m in means]
    if not tops:
        return None
    a = min(tops)
    return a if all(lo < a for lo in lows) else None


def matched(curves: dict, a: float, ref: str, reps: int = B, seed: int | None = None) -> dict:
    """CURVES: {arm: {"acc": [S × I per lr], "forget": [S × W per lr]}} (per lr a seeds × items accuracy
    matrix and a seeds × windows forgetting matrix, lr ascending; the same seeds at every lr).
    Per arm: forgetting at accuracy A (point estimate, interval) and the paired difference against REF."""
    rng = _rng(seed)
    w = next(iter(curves.values()))["forget"][0].shape[1]
    est = {k: interp_at([m.mean() for m in c["acc"]], [m.mean() for m in c["forget"]], a) for k, c in curves.items()}
    draws = {k: [] for k in curves}
    for _ in range(reps):
        wi = rng.integers(0, w, w)
        s = next(iter(curves.values()))["acc"][0].shape[0]
        si = rng.integers(0, s, s)
        for k, c in curves.items():
            accs = [m[si].mean() for m in c["acc"]]
            fs = [m[si][:, wi].mean() for m in c["forget"]]
            draws[k].append(interp_at(accs, fs, a))
    out = {}
    for k, d in draws.items():
        ok = np.array([x for x in d if x is not None])
        row = {"forget": est[k], "reached": len(ok) / reps}
        if len(ok) >= 0.9 * reps:
            row["ci"] = (float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5)))
        if k != ref and est[k] is not None and est[ref] is not None:
            diff = np.array([x - y for x, y in zip(d, draws[ref]) if x is not None and y is not None])
            if len(diff) >= 0.9 * reps:
                row["diff"] = (est[k] - est[ref], float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5)))
        out[k] = row
    return out
