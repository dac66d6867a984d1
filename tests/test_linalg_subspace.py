"""The subspace route (Chebyshev-filtered subspace iteration + certified gap) against a float64 SVD,
its certificate on adversarial blocks, the auto route's fallbacks, and spectrum=False's economy."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from surgeon.linalg import decompose, get_backend
from surgeon.linalg.backends import TorchBackend
from surgeon.linalg.decompose import _check, auto_route, singular_values
from surgeon.linalg.subspace import (
    certify_gap,
    chebyshev,
    orth,
    rayleigh_ritz,
    subspace_pairs,
)

CPU = get_backend("cpu")
F64 = torch.float64
dmod = importlib.import_module("surgeon.linalg.decompose")  # the module (the package exports the function)


def bases(m: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))  # (m, k)
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))  # (n, k)
    return u, v


def make(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    u, v = bases(m, n, seed)
    return (u * sigma) @ v.T  # (m, n)


def sin_theta(q_ref: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(q - q_ref @ (q_ref.T @ q), 2))


def reference(w: torch.Tensor, r: int, which: str):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sel = slice(-r, None) if which == "minor" else slice(0, r)
    return u[:, sel], s[sel], vh[sel].T


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """Let solver="auto" take the subspace route on the CPU (it does so only on CUDA by default)."""
    monkeypatch.setitem(dmod.SUBSPACE_MIN_K, "cpu", 1)


@pytest.mark.parametrize("shape", [(160, 64), (64, 160), (120, 120)])
@pytest.mark.parametrize("which", ["minor", "principal"])
@pytest.mark.parametrize("decades", [2, 4])
def test_subspace_matches_float64_svd(shape, which, decades):
    m, n = shape
    k, r = min(shape), 8
    w = make(m, n, torch.logspace(0, -decades, k, dtype=F64), seed=decades)
    t = decompose(w, r, which, CPU, solver="subspace", spectrum=False)
    e = decompose(w, r, which, CPU, solver="gram-eigh", spectrum=False)
    u0, s0, v0 = reference(w, r, which)
    assert t.solver == "subspace"
    assert t.subspace_bound <= 1e-6 and t.orth_error <= 1e-6  # certified and checked
    assert torch.allclose(t.S, s0, rtol=1e-9, atol=1e-11)  # σ₁ = 1: λ's absolute error ~eps·σ₁²
    err_u, err_v = sin_theta(u0, t.U), sin_theta(v0, t.Vh.T)
    # within 10x of syevd's accuracy, or below tol/8, where the iteration stops by design
    assert err_v <= max(10 * sin_theta(v0, e.Vh.T), 1e-6 / 8)
    assert err_u <= max(10 * sin_theta(u0, e.U), 1e-6 / 8)
    assert max(err_u, err_v) <= t.subspace_bound  # the bound bounds the true error
    assert torch.allclose(w @ t.Vh.T, t.U * t.S, atol=1e-9 * float(s0.max()))
    assert t.spectrum.numel() == r + 1  # the block and its neighbour: nothing else was computed


@pytest.mark.parametrize("which", ["minor", "principal"])
def test_subspace_with_spectrum_returns_every_value(which):
    w = make(90, 70, torch.logspace(0, -3, 70, dtype=F64), seed=1)
    t = decompose(w, 6, which, CPU, solver="subspace", spectrum=True)
    assert t.solver == "subspace"
    assert torch.allclose(t.spectrum, torch.linalg.svdvals(w), rtol=1e-6, atol=1e-10)
    assert torch.allclose(singular_values(w, CPU), torch.linalg.svdvals(w), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("which", ["minor", "principal"])
def test_spectrum_off_pays_for_no_full_eigendecomposition(which, auto_on_cpu):
    calls = []

    class Counting(TorchBackend):
        def eigh(self, g):
            calls.append(("eigh", g.shape[0]))
            return super().eigh(g)

        def eigvalsh(self, g):
            calls.append(("eigvalsh", g.shape[0]))
            return super().eigvalsh(g)

    k = 200
    w = make(260, k, torch.logspace(0, -3, k, dtype=F64), seed=2)
    t = decompose(w, 8, which, Counting(torch.device("cpu")), spectrum=False)
    assert t.solver == "subspace"
    assert calls and all(name == "eigh" and size < k // 2 for name, size in calls)  # Rayleigh–Ritz only


@pytest.mark.parametrize("shape,rank", [((8, 5), 1), ((8, 5), 4), ((5, 9), 3), ((12, 12), 11), ((40, 30), 29)])
@pytest.mark.parametrize("which", ["minor", "principal"])
def test_tiny_shapes_and_rank_near_k(shape, rank, which):
    m, n = shape
    k = min(shape)
    w = make(m, n, torch.logspace(0, -2, k, dtype=F64), seed=rank)
    t = decompose(w, rank, which, CPU, solver="subspace", spectrum=False)
    u0, s0, v0 = reference(w, rank, which)
    assert t.solver == "subspace" and t.subspace_bound <= 1e-6
    assert torch.allclose(t.S, s0, rtol=1e-9)
    assert sin_theta(v0, t.Vh.T) < 1e-8 and sin_theta(u0, t.U) < 1e-8


def test_seven_decades_auto_falls_back_past_the_gram_routes(auto_on_cpu):
    w = make(200, 120, torch.logspace(0, -7, 120, dtype=F64), seed=3)
    assert auto_route(torch.device("cpu"), 120, 12, spectrum=False) == "subspace"
    raw = decompose(w, 12, "minor", CPU, solver="subspace", spectrum=False)
    assert raw.solver == "gram-eigh" or raw.subspace_bound > 1e-6  # declined (no Cholesky factor) or failed its check
    t = decompose(w, 12, "minor", CPU, spectrum=False)
    assert t.solver == "qr-inverse"  # subspace → gram-eigh → QR + inverse iteration (the SVD's accuracy)
    u0, _, v0 = reference(w, 12, "minor")
    assert sin_theta(v0, t.Vh.T) < 1e-8 and sin_theta(u0, t.U) < 1e-8


def test_auto_takes_the_subspace_route_and_keeps_it_when_checked(auto_on_cpu):
    w = make(300, 200, torch.logspace(0, -3, 200, dtype=F64), seed=4)
    for which in ("minor", "principal"):
        t = decompose(w, 12, which, CPU, spectrum=False)
        assert t.solver == "subspace"
        u0, _, _ = reference(w, 12, which)
        assert sin_theta(u0, t.U) < 1e-8
        assert decompose(w, 12, which, CPU, spectrum=True).solver == "gram-eigh"  # spectra: the eigh route


def test_rank_deficient_minor_is_never_accepted_from_the_subspace_route(auto_on_cpu):
    sigma = torch.cat([torch.linspace(3, 1, 50, dtype=F64), torch.zeros(14, dtype=F64)])
    w = make(100, 64, sigma, seed=5)  # rank 50
    raw = decompose(w, 10, "minor", CPU, solver="subspace", spectrum=False)
    assert raw.solver == "gram-eigh" or raw.subspace_bound > 1e-6 or raw.orth_error > 1e-6
    t = decompose(w, 10, "minor", CPU, spectrum=False)
    assert t.solver == "svd-f64"
    assert torch.allclose(t.U.T @ t.U, torch.eye(10, dtype=F64), atol=1e-10)
    assert float(torch.linalg.matrix_norm(w @ t.Vh.T)) < 1e-12
    p = decompose(w, 6, "principal", CPU, spectrum=False)  # the principal side of the same weight is fine
    assert p.solver == "subspace"
    assert sin_theta(reference(w, 6, "principal")[0], p.U) < 1e-7


def test_clustered_spectra(auto_on_cpu):
    k, r = 80, 10
    inside = torch.cat([torch.full((6,), 2.0, dtype=F64), torch.linspace(1.5, 1.2, r - 6, dtype=F64), torch.logspace(0, -2, k - r, dtype=F64)])
    w = make(120, k, inside, seed=6)  # a 6-fold cluster at the top, well inside the kept block
    t = decompose(w, r, "principal", CPU, solver="subspace", spectrum=False)
    assert t.subspace_bound <= 1e-6 and sin_theta(reference(w, r, "principal")[0], t.U) <= t.subspace_bound
    tie = torch.cat([torch.logspace(0, -1, r - 1, dtype=F64), torch.full((2,), 0.05, dtype=F64), torch.logspace(-1.5, -3, k - r - 1, dtype=F64)])
    w = make(120, k, tie, seed=7)  # σ_r = σ_{r+1}: no subspace is determined, so none may be certified
    t = decompose(w, r, "principal", CPU, solver="subspace", spectrum=False)
    assert not t.subspace_bound <= 1e-6
    assert decompose(w, r, "principal", CPU, spectrum=False).solver == "svd-f64"


def _missing_start(v_missed: torch.Tensor, b: int, seed: int = 0) -> torch.Tensor:
    """A Gaussian block with no component along v_missed (k, 1)."""
    x = torch.randn(v_missed.shape[0], b, generator=torch.Generator().manual_seed(seed), dtype=F64)  # (k, b)
    return x - v_missed @ (v_missed.T @ x)  # (k, b)


def test_a_block_that_missed_an_eigenvector_is_rejected(auto_on_cpu):
    """The adversarial case: the iteration converges to an exact invariant subspace that lacks the
    top eigenvector (a start orthogonal to it, and σ₁/σ₂ = 1 + 1e-6, so that the rounding errors that
    reintroduce it grow too little). Residuals are tiny and the Ritz gap looks healthy: only the
    certificate can tell. (On the minor side, the solves' rounding errors, ~eps·κ(G), reseed the
    missed vector and the filter grows it back, so the same construction is caught earlier; the
    certificate's own adversarial test below covers both sides.)"""
    k, r = 60, 6
    sigma = torch.logspace(0, -2, k, dtype=F64)
    sigma[0] = sigma[1] * (1 + 1e-6)
    w = make(90, k, sigma, seed=8)
    _, v = bases(90, k, seed=8)
    g = w.T @ w  # (k, k)
    missed = v[:, :1]  # (k, 1)
    p = subspace_pairs(g, r, "principal", CPU, m_rows=90, start=_missing_start(missed, 2 * r))
    assert float(torch.linalg.matrix_norm(p.vecs.T @ missed)) < 1e-3  # it did miss it
    assert p.lam_next_bound is None  # ... and the certificate refuses the gap
    # what an uncertified check (gap from the Ritz values) would have said: accepted
    s = p.lam.clamp_min(0).sqrt()  # (r,)
    u = (w @ p.vecs) / s  # (m, r)
    ritz_gap = abs(float(s[-1]) - math.sqrt(p.lam_next))
    bound, _ = _check(w, u, s, p.vecs.T, ritz_gap, u)
    assert bound < 1e-6


@pytest.mark.parametrize("which", ["minor", "principal"])
def test_certificate_is_sound_and_tight(which):
    k, r = 50, 5
    w = make(70, k, torch.logspace(0, -2, k, dtype=F64), seed=9)
    g = w.T @ w
    lam, vec = torch.linalg.eigh(g)  # ascending
    if which == "principal":
        lam, vec = lam.flip(0), vec.flip(1)
    theta, res = lam.tolist(), [0.0] * k
    bound = certify_gap(g, vec[:, :r], theta, res, r, which, m_rows=70)
    assert bound is not None
    true_next, kept = theta[r], theta[r - 1]
    if which == "principal":
        assert true_next <= bound < kept and bound - true_next < 1e-10 * theta[0]
    else:
        assert kept < bound <= true_next and true_next - bound < 1e-10 * max(theta)
    wrong = torch.cat([vec[:, 1 : r + 1]], dim=1)  # skips the first wanted eigenvector
    assert certify_gap(g, wrong, theta[1:] + [theta[-1]], res, r, which, m_rows=70) is None


def test_chebyshev_filter_is_the_scaled_chebyshev_polynomial():
    a = torch.tensor([0.0, 0.3, 1.0, 1.5, 3.0], dtype=F64)  # eigenvalues of a diagonal operator
    x = torch.eye(5, dtype=F64)
    y = chebyshev(lambda z: a[:, None] * z, x, cut=1.0, top=3.0, degree=7)
    t = 2 * a - 1  # maps [0, 1] onto [-1, 1]
    expect = torch.cos(7 * torch.acos(t.clamp(-1, 1)))
    big = t.abs() > 1
    expect[big] = torch.cosh(7 * torch.acosh(t[big].abs())) * torch.sign(t[big]) ** 7
    expect = expect / math.cosh(7 * math.acosh(5.0))
    assert torch.allclose(y.diagonal(), expect, rtol=1e-12, atol=1e-15)


def test_orth_survives_a_nearly_dependent_block():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    x[:, 7] = x[:, 6] + 1e-13 * x[:, 5]  # κ ≈ 1e13: CholeskyQR2 breaks down, Householder takes over
    q = orth(x)
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=F64), atol=1e-12)
    q = orth(torch.randn(100, 8, generator=torch.Generator().manual_seed(1), dtype=F64))
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=F64), atol=1e-13)


def test_rayleigh_ritz_orders_wanted_first():
    g = torch.diag(torch.arange(1.0, 11.0, dtype=F64))
    x = orth(torch.randn(10, 10, generator=torch.Generator().manual_seed(2), dtype=F64))
    th_p, _, res = rayleigh_ritz(g, x, "principal", CPU)
    th_m, _, _ = rayleigh_ritz(g, x, "minor", CPU)
    assert th_p[0] == pytest.approx(10) and th_m[0] == pytest.approx(1) and float(res.max()) < 1e-12


def test_auto_route_policy():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_route(cuda, 4096, 64, spectrum=False) == "subspace"
    assert auto_route(cuda, 4096, 64, spectrum=True) == "gram-eigh"  # the spectrum costs the reduction anyway
    assert auto_route(cuda, 576, 64, spectrum=False) == "gram-eigh"  # small k, r/k > 1/8
    assert auto_route(cpu, 4096, 64, spectrum=False) == "gram-eigh"
    with pytest.raises(Exception, match="unknown solver"):
        decompose(torch.randn(6, 4, dtype=F64), 2, "minor", CPU, solver="qdwh")


@pytest.mark.parametrize("decades", [2, 4])
def test_explicit_inverse_is_as_accurate_as_solves(decades):
    """CUDA's default applies G⁻¹ = L⁻ᵀL⁻¹ by GEMMs; the CPU's by triangular solves. Same subspace."""
    k, r = 120, 8
    w = make(150, k, torch.logspace(0, -decades, k, dtype=F64), seed=11)
    g = w.T @ w
    _, _, v0 = reference(w, r, "minor")
    errs = {}
    for inverse in ("solve", "explicit"):
        p = subspace_pairs(g, r, "minor", CPU, m_rows=150, inverse=inverse)
        assert p.lam_next_bound is not None
        errs[inverse] = sin_theta(v0, p.vecs)
    eigh_err = sin_theta(v0, torch.linalg.eigh(g)[1][:, :r])
    # the route stops once its check is below tol/8, ~1e-11 here, while syevd reaches 1e-12 (one BLAS
    # thread) to 3e-12 (two): within 10x of syevd, or below 1e-10, whatever the thread count
    assert errs["explicit"] <= max(10 * eigh_err, 1e-10) and errs["solve"] <= max(10 * eigh_err, 1e-10)


@pytest.mark.parametrize("rank", [2, 4])
def test_principal_of_a_rank_five_weight(rank):
    """Block (b = r + 32) far wider than W's rank: the Ritz values past 5 are zero, so there is no
    Chebyshev interval to damp; plain steps end at once, and the certificate still holds."""
    sigma = torch.cat([torch.tensor([5.0, 4, 3, 2, 1], dtype=F64), torch.zeros(75, dtype=F64)])
    w = make(120, 80, sigma, seed=3)
    t = decompose(w, rank, "principal", CPU, solver="subspace", spectrum=False)
    assert t.solver == "subspace" and t.subspace_bound < 1e-12
    assert torch.allclose(t.S, sigma[:rank], rtol=1e-12)
    assert sin_theta(reference(w, rank, "principal")[0], t.U) < 1e-12
