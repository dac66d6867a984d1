"""The r principal or minor eigenpairs of a Gram matrix without a tridiagonal reduction: checked,
Chebyshev-filtered subspace iteration, GEMM-bound, float64, the same torch code on CPU and CUDA.

    from surgeon.linalg.subspace import subspace_pairs
    p = subspace_pairs(g, rank=64, which="minor", backend=get_backend("cuda"), m_rows=11008)

Algorithm (G = WᵀW or WWᵀ, k×k, float64; a block of b = r + p columns, p the oversampling):
  * operator A: G itself for the principal side; G⁻¹ for the minor side, applied through the
    Cholesky factor G = LLᵀ (two triangular solves, backward stable). Either way the wanted pairs
    are A's largest. A G that is not positive definite in floating point (rank-deficient W, or
    σ_min/σ_max below ~1e-8) has no Cholesky factor: the minor route declines (returns None).
  * start: X = orth(A·A·Ω), Ω Gaussian (k, b) from a fixed seed, so results are reproducible.
  * rounds of: a Chebyshev filter T_d(t(A)) that damps A's spectrum on [0, a_cut], a_cut being A's
    value at the block's far edge (the last Ritz value), scaled at the top so that nothing overflows,
    restarted after every orthonormalization (CholeskyQR2, Householder QR when that fails), which
    happens before the growth across the block can reach 1e6; the minor side ends each round with
    two plain steps of A: they damp the components along G's large eigenvalues, which a filter on
    [0, a_cut] leaves at its ripple level and which dominate ‖Gx − θx‖; then Rayleigh–Ritz with G
    (H = XᵀGX, b×b, the backend's eigh). The degree of a round comes from the current estimate of
    the Wedin bound and the Chebyshev rate acosh(t(θ_r)); rounds stop when the estimate is below
    tol/8, stops improving (rounding floor) or after 5 rounds.
Limits: the convergence rate is set by the ratio of the wanted eigenvalue to the block's edge,
λ_r/λ_{b+1} (principal) or λ_{b+1}/λ_r (minor, from the bottom); with flat spectra (r/k ≳ 1/8 or
σ ratios near 1 across the block) a dense eigensolver is cheaper. The minor side inherits the
Cholesky factor's accuracy, like syevd's: about eps·κ(G) relative to the gap.

Check: nothing here decides; the caller assembles the triplets and runs surgeon's Wedin check
(decompose._check). What this module adds is the GAP, the one quantity a subspace method does not
see: Ritz values are one-sided (principal θ_{r+1} ≤ λ_{r+1}, minor θ_{r+1} ≥ λ_{r+1}), so the Ritz
estimate of σ_{r+1} errs on the unsafe side, and no residual can rule out an eigenvalue that the
block missed. `certify_gap` makes it rigorous with one Cholesky factorization (an inertia test):
for the principal side, if M = τI − G + c·V_r V_rᵀ is positive definite (c ≥ 0, V_r any k×r
matrix), Weyl's inequality gives λ_{r+1}(G) ≤ λ_max(G − cV_rV_rᵀ) < τ; for the minor side
M = G + cV_rV_rᵀ − τI positive definite gives λ_{r+1}^↑(G) > τ. The bound returned accounts for
every rounding error by the standard worst-case bounds: the Cholesky backward error
(γ_{k+1}·trace M, Higham Thm 10.3, doubled for blocked implementations), the rounding of forming M,
and the Gram product (γ_m·‖W‖_F², m the long side), so it bounds σ_{r+1} of W itself. It holds
whatever the iteration did; a block that missed an eigenvalue fails it (tests build such cases).
These worst-case allowances (~(2k + m)·eps·‖W‖_F² on λ) are smaller than what the Wedin check's
own rounding floor demands of the gap for k ≤ ~10⁴ (decompose's docstring), so the rigour costs no
weight that the check would have passed; on the minor side they end the route at ~4 decades.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.linalg.backends import Backend

EPS = 2.0**-53  # unit roundoff of float64
ORTH_GROWTH = 1e6  # orthonormalize before the columns' norms can spread further than this
MAX_ROUNDS = 5
MAX_DEGREE = 48  # per round
RR_ON_HOST_MAX = 0  # Rayleigh–Ritz eigh on the host CPU for b up to this (0: always on the backend)


def gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u), the worst-case relative error of an n-term inner product."""
    return n * EPS / (1 - n * EPS)


def oversampling(rank: int, k: int) -> int:
    """Default p: as many extra columns as wanted ones, at least 32 (the block edge sets the rate)."""
    return min(max(rank, 32), k - rank)


@dataclass
class SubspacePairs:
    lam: torch.Tensor  # (r,) Ritz values of G, wanted first (principal descending, minor ascending)
    vecs: torch.Tensor  # (k, r) Ritz vectors, orthonormal
    lam_next: float  # Ritz value r+1 (the uncertified estimate of λ_{r+1})
    lam_next_bound: float | None  # certified bound on λ_{r+1} of WᵀW (upper: principal, lower: minor); None: not certified
    rounds: int
    degree: int  # A-applications in all


def orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of y (k, b): CholeskyQR2 on unit columns, Householder QR
    when either b×b Gram matrix is not numerically positive definite (one host sync)."""
    y0 = y / torch.linalg.vector_norm(y, dim=0).clamp_min(1e-300)  # (k, b)
    q, bad = y0, 0
    for _ in range(2):
        l, info = torch.linalg.cholesky_ex(q.mT @ q)  # (b, b) = L Lᵀ
        q = torch.linalg.solve_triangular(l.mT, q, upper=True, left=False)  # (k, b) = q L⁻ᵀ
        bad = bad + info
    if int(bad) != 0:
        return torch.linalg.qr(y0).Q  # (k, b)
    return q


def chebyshev(apply, x: torch.Tensor, cut: float, top: float, degree: int) -> torch.Tensor:
    """T_d(t(A)) x / T_d(t(top)) with t(a) = 2a/cut − 1, which maps [0, cut] onto [−1, 1].

    Scaled three-term recurrence on the ratios s_j = T_{j−1}/T_j at t0 = t(top): no overflow.
    """
    c = e = cut / 2  # centre and half-width of the damped interval [0, cut]
    t0 = (top - c) / e
    s = 1.0 / t0
    y_prev, y = x, apply(x).sub_(x, alpha=c).mul_(s / e)  # (k, b), Y_1 = t(A) X / t0
    for _ in range(degree - 1):
        s_new = 1.0 / (2 * t0 - s)
        y_next = apply(y).sub_(y, alpha=c).mul_(2 * s_new / e).sub_(y_prev, alpha=s * s_new)  # (k, b)
        y_prev, y, s = y, y_next, s_new
    return y


def _small_eigh(h: torch.Tensor, backend: Backend):
    """eigh of the b×b Rayleigh quotient: on the backend, or on the host CPU when h is on a GPU and
    b ≤ RR_ON_HOST_MAX (a small syevd is latency-bound on a GPU; the probe measures both)."""
    if h.is_cuda and h.shape[0] <= RR_ON_HOST_MAX:
        theta, z = torch.linalg.eigh(h.cpu())
        return theta.to(h.device, non_blocking=True), z.to(h.device, non_blocking=True)
    return backend.eigh(h)


def rayleigh_ritz(g: torch.Tensor, x: torch.Tensor, which: str, backend: Backend):
    """Ritz values (b,) wanted first, vectors (k, b) and residual norms ‖G x_i − θ_i x_i‖ (b,)."""
    gx = g @ x  # (k, b)
    h = x.mT @ gx  # (b, b)
    theta, z = _small_eigh((h + h.mT) / 2, backend)  # ascending
    if which == "principal":
        theta, z = theta.flip(0), z.flip(1)
    x, gx = x @ z, gx @ z  # (k, b), (k, b)
    res = torch.linalg.vector_norm(gx - x * theta, dim=0)  # (b,)
    return theta, x, res


def _estimate(theta: list[float], res: list[float], rank: int) -> float:
    """The Wedin bound the final check will compute, from Ritz data: ‖(Gv − θv)/σ‖_F / |σ_r − σ_{r+1}|."""
    sig = [math.sqrt(max(t, 0.0)) for t in theta[: rank + 1]]
    gap = abs(sig[rank - 1] - sig[rank])
    if gap == 0 or min(sig[:rank]) == 0:
        return math.inf
    return math.sqrt(sum((res[i] / sig[i]) ** 2 for i in range(rank))) / gap


def _steps_per_orth(t0: float) -> int:
    """Chebyshev steps whose growth (t0 + √(t0² − 1)) per step stays below ORTH_GROWTH."""
    growth = t0 + math.sqrt(max(t0 * t0 - 1, 0.0))
    return max(1, int(math.log(ORTH_GROWTH) / math.log(max(growth, 1.0 + 1e-12))))


class _Operator:
    """A = G (principal) or G⁻¹ through its Cholesky factor (minor); `a(θ)` maps a G-value to A's.

    inverse="solve": two triangular solves per application (backward stable); "explicit": L⁻¹ once
    (one triangular solve with k right-hand sides), then two GEMMs per application: fewer flops
    in sequence, for GPUs; the subspace it converges to is as accurate (tests, probe); "auto":
    explicit on CUDA, solve on the CPU (where a trsm with b right-hand sides is as fast as a GEMM).
    """

    def __init__(self, g: torch.Tensor, which: str, inverse: str = "auto"):
        if inverse == "auto":
            inverse = "explicit" if g.is_cuda else "solve"
        self.g, self.which, self.l, self.li = g, which, None, None
        if which == "minor":
            l, info = torch.linalg.cholesky_ex(g)
            self.l = l if int(info) == 0 else None
            if self.l is not None and inverse == "explicit":
                eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
                self.li = torch.linalg.solve_triangular(self.l, eye, upper=False)  # (k, k) = L⁻¹

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.l is None:
            return self.g @ x  # (k, b)
        if self.li is not None:
            return self.li.mT @ (self.li @ x)  # (k, b) = L⁻ᵀ L⁻¹ x
        return torch.cholesky_solve(x, self.l)  # (k, b) = G⁻¹ x

    def a(self, theta: float) -> float:
        return theta if self.which == "principal" else 1.0 / max(theta, 1e-300)


def _round(op: _Operator, x: torch.Tensor, theta: list[float], rank: int, est: float, goal: float) -> tuple[torch.Tensor, int]:
    """One filter round (degree chosen from the estimate); returns the new block, unorthonormalized RR input."""
    cut, top, want = op.a(theta[-1]), op.a(theta[0]), op.a(theta[rank - 1])
    steps = 0
    if cut > 0 and top > cut * (1 + 1e-9) and want > cut * (1 + 1e-12):
        t_want, t0 = 2 * want / cut - 1, 2 * top / cut - 1
        reduce = math.log(8 * max(est / goal, 2.0))  # ≈ acosh of the wanted reduction
        degree = min(MAX_DEGREE, max(2, math.ceil(reduce / math.acosh(t_want))))
        chunk = _steps_per_orth(t0)
        while steps < degree:
            d = min(chunk, degree - steps)
            x = orth(chebyshev(op, x, cut, top, d)) if d > 1 else orth(op(x))
            steps += d
    else:  # the block shows no separation yet: plain power steps
        for _ in range(4):
            x = orth(op(x))
        steps += 4
    if op.which == "minor":  # two plain steps of G⁻¹: damp G's large eigenvalues below the ripple level
        for _ in range(2):
            x = orth(op(x))
        steps += 2
    return x, steps


def subspace_pairs(g: torch.Tensor, rank: int, which: str, backend: Backend, m_rows: int, tol: float = 1e-6,
                   oversample: int | None = None, seed: int = 0, inverse: str = "auto", start: torch.Tensor | None = None) -> SubspacePairs | None:
    """The `rank` wanted eigenpairs of symmetric PSD g (k, k) by filtered subspace iteration, with
    the gap at r certified (`certify_gap`). m_rows: the long side of W (for the Gram's rounding
    bound). start: the initial block (k, b) instead of a seeded Gaussian one (tests). None when the
    route cannot run (the minor side of a G with no Cholesky factor)."""
    k = g.shape[0]
    b = min(k, rank + (oversampling(rank, k) if oversample is None else oversample))
    if b <= rank:
        b = min(k, rank + 1)
    op = _Operator(g, which, inverse)
    if which == "minor" and op.l is None:
        return None
    if start is None:
        gen = torch.Generator(device=g.device).manual_seed(seed)
        start = torch.randn(k, b, dtype=g.dtype, device=g.device, generator=gen)  # (k, b)
    x, b = start, start.shape[1]
    x = orth(op(orth(op(x))))
    theta_t, x, res_t = rayleigh_ritz(g, x, which, backend)
    degree, rounds, goal, est_prev = 2, 0, tol / 8, math.inf
    while b < k and rounds < MAX_ROUNDS:
        theta, res = theta_t.tolist(), res_t.tolist()
        est = _estimate(theta, res, rank)
        if est <= goal or est > est_prev / 4:  # converged, or at the rounding floor
            break
        x, steps = _round(op, x, theta, rank, est, goal)
        theta_t, x, res_t = rayleigh_ritz(g, x, which, backend)
        degree, rounds, est_prev = degree + steps, rounds + 1, est
    del op  # free L (and L⁻¹) before the certificate's k×k factorization
    theta, res = theta_t.tolist(), res_t.tolist()
    bound = certify_gap(g, x[:, :rank], theta, res, rank, which, m_rows)
    return SubspacePairs(theta_t[:rank], x[:, :rank], theta[rank], bound, rounds, degree)


def certify_gap(g: torch.Tensor, v: torch.Tensor, theta: list[float], res: list[float], rank: int, which: str, m_rows: int) -> float | None:
    """A rigorous bound on λ_{r+1} of WᵀW (upper for the principal side, lower for the minor side),
    from the positive definiteness of a shifted, deflated G (see the module docstring); None when
    the Cholesky factorization fails or no bound separates λ_{r+1} from the kept Ritz values.

    v (k, r): the kept Ritz vectors; theta, res: Ritz values (wanted first) and residual norms, at
    least r+1 of them, used only to place the shift τ (any τ is sound; a bad one merely fails).
    """
    k = g.shape[0]
    if rank >= k:
        return None
    kept, nxt = theta[rank - 1], theta[rank]
    trace_g = float(g.diagonal().sum())  # = ‖W‖_F² up to rounding
    err_gram = gamma(m_rows) * trace_g * (1 + 1e-6)  # ‖fl(WᵀW) − WᵀW‖₂ ≤ γ_m ‖|W|‖₂² ≤ γ_m ‖W‖_F²
    slack = 2 * res[rank] + 4 * k * EPS * max(abs(theta[0]), abs(theta[-1]))
    if which == "principal":
        tau = nxt + slack
        c = max(theta[0], 0.0) + tau  # ≥ every kept eigenvalue: the deflated block sinks below τ
        m = torch.addmm(g, v * c, v.mT, beta=-1)  # (k, k) = cV Vᵀ − G
        m.diagonal().add_(tau)
    else:
        tau = nxt - slack
        c = 2 * max(tau, 0.0)  # the kept (bottom) eigenvalues rise above τ
        m = torch.addmm(g, v * c, v.mT)  # (k, k) = G + cV Vᵀ
        m.diagonal().sub_(tau)
    if not math.isfinite(tau):
        return None
    _, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        return None
    trace_m = float(m.diagonal().sum())
    norm_g = float(torch.linalg.matrix_norm(g))  # Frobenius
    err_form = 2 * EPS * (abs(tau) * math.sqrt(k) + norm_g + 2 * c * rank) + gamma(rank) * c * rank
    err_chol = 2 * gamma(k + 1) * trace_m * (1 + 1e-6)
    err = err_form + err_chol + err_gram
    if which == "principal":
        bound = tau + err
        return bound if bound < kept else None
    bound = tau - err
    return bound if bound > kept else None
