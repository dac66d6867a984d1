"""The r minor singular triplets of W without squaring its condition number: one Householder QR,
then two-sided block inverse iteration on the triangular factor, float64, the same torch code on
CPU and CUDA (geqrf, trsm, ormqr: cuSOLVER / cuBLAS through torch).

    from surgeon.linalg.inverse import minor_triplets
    t = minor_triplets(w64, rank=8, tol=1e-6)   # None when it does not converge

Why: the Gram routes (surgeon.linalg.decompose) see σ² and lose the minor directions of weights
whose spectrum spans more than ~4 decades; a calibrated weight W·C̃ (surgeon.linalg.calibrated)
spans 6 to 11 on real models. The float64 SVD gets them right but is 1.9-3.2 s per 4096-wide
weight on an H100 and tens of seconds on a CPU. This route keeps the SVD's accuracy (every
operation backward stable in W, never in WᵀW) at the cost of one QR and a few triangular solves.

Algorithm, A = W (tall) or Wᵀ (wide), a×k with a ≥ k, block of p = r + max(r, 16) columns:
  * A = Q R (geqrf, Q kept as Householder reflectors). σ(A) = σ(R), R k×k upper triangular.
  * start: X (k, p) orthonormal, from `start` (the Gram route's minor vectors) topped up with at
    least 8 Gaussian columns from a fixed seed, so that every direction has a component (reproducible).
  * steps: Y = orth(R⁻ᵀ X), X = orth(R⁻¹ Y): inverse iteration on both sides at once, each side
    from a triangular solve (backward stable: the solve is exact for R + δR, |δR| ≤ c·eps·|R|).
  * two-sided Rayleigh–Ritz: Yᵀ R X = P Σ Qᵀ (p×p), U = Y P, V = X Q. The residuals of a pair,
    ‖R v − σu‖ and ‖Rᵀu − σv‖, fall to eps·σ₁ (SVD level). A one-sided Ritz step (U from R V / σ)
    would stall at eps·σ₁²/σ, which is what the Gram routes suffer from.
  * Wedin's δ: the (r+1)-th smallest Ritz value σ̃ with residual ρ has a true singular value within
    ρ, so δ = σ̃ − ρ − max(kept σ̃). Stop once ‖kept residuals‖/δ is below 1e-3·tol, or below tol/8
    and no longer improving, or at the rounding floor (three checks without a 10 % gain), or when
    the measured rate cannot reach tol/8 in MAX_ITER steps; None when the best bound is then above
    tol, when the block does not separate (its negative gap stops closing, or 40 steps pass: a cluster
    wider than it), or on a singular R.
  * left vectors of A: Q·[U; 0] (ormqr); then back to W's sides.
Limits: the gap is the Ritz estimate, not certified by an inertia test (the Cholesky-based one of
surgeon.linalg.subspace squares the condition, which is what this route avoids); a block that
missed a singular value below the (r+1)-th would pass it. Inverse iteration amplifies the smallest
directions most, and the random columns give every direction a component, so such a miss needs a
start orthogonal to it. The caller's check (decompose._check, both sides against W itself) is the
guarantee as for every route. Convergence is geometric in (σ_r / σ_{p+1})² from the bottom: flat
minor spectra (clusters wider than the block) need many steps; once the measured rate cannot reach
tol/8 within MAX_ITER steps the route declines (after ~8 steps) and the SVD runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXTRA_MIN = 16  # oversampling: the block holds r + max(r, EXTRA_MIN) columns
MAX_ITER = 80
STALL = 0.9  # a check that does not bring the bound below STALL × the best so far does not count as progress
GOOD = 1e-3  # stop at once below GOOD × tol: past what any caller needs
NO_GAP_CHECKS = 20  # checks (2 steps each) without a positive gap: a cluster wider than the block, decline
NO_GAP_STALL = 3  # ... or sooner, once the negative gap has not shrunk below STALL × itself over this many checks
RANDOM_MIN = 8  # seeded random columns always in the start block, whatever `start` holds
SEED = 0x5EED


@dataclass
class Minor:
    U: torch.Tensor  # (m, r) of W, descending σ
    S: torch.Tensor  # (r,)
    Vh: torch.Tensor  # (r, n)
    sigma_next: float  # Ritz estimate of the smallest singular value outside the block (an upper bound)
    next_residual: float  # its residual: a true singular value lies within it
    gap: float  # Wedin's δ (0 when not positive)
    steps: int


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x)[0]


def _start(k: int, p: int, start: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(k, p) orthonormal: `start`'s first columns, then at least RANDOM_MIN (or p) seeded Gaussian
    ones, so that a guess blind to some minor direction cannot hide it from the iteration."""
    cols = [] if start is None else [start[:, : max(0, p - RANDOM_MIN)].to(like)]
    have = sum(c.shape[1] for c in cols)
    if have < p:
        g = torch.Generator(device=like.device).manual_seed(SEED)
        cols.append(torch.randn(k, p - have, generator=g, dtype=like.dtype, device=like.device))
    return _orth(torch.cat(cols, dim=1))


def _ritz(r: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """(U, σ descending, V, residual per pair) of R on the spaces Y (left) and X (right)."""
    rx, ytr = r @ x, y.mT @ r  # (k, p), (p, k): the only products with R
    pb, sb, qbh = torch.linalg.svd(y.mT @ rx)  # (p, p)
    u, v = y @ pb, x @ qbh.mT  # (k, p) each
    res_r = rx @ qbh.mT - u * sb  # R v − σ u, as (R X) Q
    res_l = (pb.mT @ ytr).mT - v * sb  # Rᵀ u − σ v, as (Pᵀ Yᵀ R)ᵀ: no transposed copy of R
    res = (res_r.square().sum(0) + res_l.square().sum(0)).sqrt()  # (p,)
    return u, sb, v, res


def _hopeless(history: list[float], tol: float, step: int) -> bool:
    """True when the rate of the last checks (two steps each) cannot reach tol/8 within MAX_ITER
    steps: a minor cluster wider than the block. Declining then costs a few steps, not MAX_ITER."""
    if len(history) < 4 or history[-1] <= tol / 8:
        return False
    rate = (history[-1] / history[-4]) ** (1 / 3)  # per check
    if rate >= STALL:
        return False  # at the rounding floor or not converging: the stall counter ends it
    checks = math.log(tol / 8 / history[-1]) / math.log(rate)
    return step + 2 * checks > MAX_ITER


def _never_separates(gaps: list[float], step: int) -> bool:
    """True when the block has shown no positive gap for NO_GAP_CHECKS checks, or its (negative) gap
    stopped closing: a slowly separating block (the gap climbing towards 0) gets the time it needs,
    a true cluster (the gap flat) is declined after a few checks."""
    if step >= 2 * NO_GAP_CHECKS:
        return True
    if len(gaps) <= NO_GAP_STALL:
        return False
    return -gaps[-1] > STALL * -gaps[-1 - NO_GAP_STALL]


def minor_triplets(w64: torch.Tensor, rank: int, tol: float, start: torch.Tensor | None = None) -> Minor | None:
    """The `rank` smallest singular triplets of w64 (m, n) float64; `start` (k, ≤ p) an optional
    guess of the minor vectors of the short side (k = min(m, n)). None when the iteration does not
    reach tol/8 in MAX_ITER steps (or the block cannot hold a neighbour)."""
    tall = w64.shape[0] >= w64.shape[1]
    a = w64 if tall else w64.mT  # (a, k), a ≥ k
    k = a.shape[1]
    p = min(k, rank + max(rank, EXTRA_MIN))
    if p <= rank:
        return None
    qr, tau = torch.geqrf(a)  # (a, k) reflectors and R, (k,)
    r = qr[:k].triu()  # (k, k)
    x = _start(k, p, start, r)
    kept, nxt = slice(p - rank, p), p - rank - 1
    best, stalled, found, history, gaps = math.inf, 0, None, [], []
    for step in range(1, MAX_ITER + 1):
        y = _orth(torch.linalg.solve_triangular(r.mT, x, upper=False))  # R⁻ᵀ X
        x = _orth(torch.linalg.solve_triangular(r, y, upper=True))  # R⁻¹ Y
        if step % 2:
            continue
        u, s, v, res = _ritz(r, x, y)
        if not bool(torch.isfinite(res).all()):  # a singular R (rank-deficient W): the SVD's case
            return None
        gap = float(s[nxt] - res[nxt] - s[p - rank])
        bound = float(torch.linalg.vector_norm(res[kept])) / gap if gap > 0 else math.inf
        if math.isfinite(bound):  # before the block separates, the gap is not yet positive
            stalled = 0 if bound < STALL * best else stalled + 1
            history.append(bound)
        if bound < best:
            best, found = bound, (u, s, v, res, gap, step)
        if best <= GOOD * tol or (best <= tol / 8 and stalled >= 1) or stalled >= 3:  # done, or at the rounding floor
            break
        if not history:  # not separated yet
            gaps.append(gap)
            if _never_separates(gaps, step):  # a cluster wider than the block
                return None
        if _hopeless(history, tol, step):
            break  # the best so far decides below
    if found is None or best > tol:
        return None
    u, s, v, res, gap, steps = found
    pad = torch.zeros(a.shape[0], rank, dtype=u.dtype, device=u.device)  # (a, r)
    pad[:k] = u[:, kept]
    ua = torch.ormqr(qr, tau, pad)  # Q [U; 0]: left vectors of A
    va = v[:, kept]  # (k, r)
    uw, vw = (ua, va) if tall else (va, ua)
    return Minor(uw.contiguous(), s[kept].contiguous(), vw.mT.contiguous(), float(s[nxt]), float(res[nxt]), max(gap, 0.0), steps)
