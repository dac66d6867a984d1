"""The qr-inverse route (Householder QR + two-sided block inverse iteration on R) against a float64
SVD: spectra the Gram routes lose, both shapes, calibrated weights, starts that point elsewhere,
and the cases where it must decline (rank-deficient, a cluster wider than its block)."""

from __future__ import annotations

import math

import pytest
import torch

import importlib

from surgeon.linalg import calibrated, decompose, get_backend
from surgeon.linalg import inverse
from surgeon.linalg.inverse import minor_triplets

dmod = importlib.import_module("surgeon.linalg.decompose")  # the module (the package exports the function)

CPU = get_backend("cpu")
F64 = torch.float64


def make(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    return (u * sigma) @ v.T  # (m, n), singular values sigma


def sin_theta(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle's sine between the column spaces of a and b (orthonormal columns)."""
    return float(torch.linalg.matrix_norm(a - b @ (b.T @ a), ord=2))


def minor_ref(w: torch.Tensor, r: int):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:].T, s


@pytest.mark.parametrize("shape", [(240, 120), (120, 240), (150, 150)])
@pytest.mark.parametrize("decades", [6, 8])
def test_matches_the_float64_svd_where_the_gram_route_fails(shape, decades):
    k = min(shape)
    w = make(*shape, torch.logspace(0, -decades, k, dtype=F64), seed=decades)
    raw = decompose(w, 8, "minor", CPU, solver="gram-eigh", spectrum=False)
    assert raw.subspace_bound > 1e-6 or raw.orth_error > 1e-6  # the Gram route's own check rejects it
    t = decompose(w, 8, "minor", CPU, spectrum=False)
    assert t.solver == "qr-inverse" and t.subspace_bound <= 1e-6 and t.orth_error < 1e-12
    u0, s0, v0, s_all = minor_ref(w, 8)
    ref = decompose(w, 8, "minor", CPU, solver="svd", spectrum=False)
    # both sides within the two routes' own Wedin bounds of each other (the bounds hold for the true
    # subspace), the values to eps·σ₁ absolute, and a gap no larger than the true one
    agree = t.subspace_bound + ref.subspace_bound + 1e-14
    assert sin_theta(u0, t.U) <= agree and sin_theta(v0, t.Vh.T) <= agree
    assert t.subspace_bound <= 3 * ref.subspace_bound + 1e-10  # the SVD's own floor, not stopped at tol's edge
    true_gap = float(s_all[k - 9] - s_all[k - 8])
    assert dmod.qr_inverse(w, 8, 1e-6) is not None
    m = minor_triplets(w, 8, 1e-6)
    assert 0 < m.gap <= true_gap * (1 + 1e-9)
    assert torch.allclose(t.S, s0, rtol=0, atol=50 * k * 2.2e-16 * float(s_all[0]))
    assert torch.equal(t.S, t.S.sort(descending=True).values)
    assert torch.allclose(t.U * t.S, w @ t.Vh.T, rtol=0, atol=1e-12 * float(s_all[0]))


def test_spectrum_next_to_the_block_stays_exact_above_a_flat_cluster():
    """A 30-value flat cluster just above the minor block: the Ritz neighbour is not converged there,
    so Gram's (accurate) values must be kept, not raised to it."""
    k = 120
    sig = torch.cat([torch.logspace(0, -3, k - 38, dtype=F64), torch.linspace(1.2e-5, 1.0e-5, 30, dtype=F64),
                     torch.logspace(-8.7, -9, 8, dtype=F64)])
    w = make(200, k, sig, seed=3)
    t = decompose(w, 8, "minor", CPU, spectrum=True)
    assert t.solver == "qr-inverse"
    s = torch.linalg.svdvals(w)
    assert float(((t.spectrum[:-8] - s[:-8]).abs() / s[:-8]).max()) < 1e-6
    assert torch.allclose(t.spectrum[-8:], s[-8:], rtol=1e-6, atol=0)
    assert bool((t.spectrum[:-1] >= t.spectrum[1:]).all())


def test_near_the_rounding_floor_the_best_result_is_kept():
    """The bound wobbles at the floor; a result under tol must not be thrown away for a slow rate."""
    w = make(160, 100, torch.logspace(0, -9, 100, dtype=F64), seed=6)
    t = decompose(w, 6, "minor", CPU, spectrum=False)
    assert t.solver == "qr-inverse" and t.subspace_bound <= 1e-6


def test_spectrum_keeps_the_gram_values_and_refines_the_block():
    w = make(160, 100, torch.logspace(0, -9, 100, dtype=F64), seed=2)
    t = decompose(w, 6, "minor", CPU, spectrum=True)
    assert t.solver == "qr-inverse" and t.spectrum.numel() == 100
    s_all = torch.linalg.svdvals(w)
    assert torch.allclose(t.spectrum[-7:], s_all[-7:], rtol=1e-6, atol=0)  # the block and its neighbour: exact
    assert torch.allclose(t.spectrum[:40], s_all[:40], rtol=1e-8)  # the top: Gram's, right there
    assert bool((t.spectrum[:-1] >= t.spectrum[1:]).all())  # descending throughout


def test_a_start_that_points_elsewhere_still_finds_the_minor_block():
    w = make(200, 120, torch.logspace(0, -8, 120, dtype=F64), seed=5)
    u0, _, v0, _ = minor_ref(w, 8)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    wrong = vh[:16].T.contiguous()  # the PRINCIPAL right vectors: orthogonal to the wanted ones
    m = minor_triplets(w, 8, 1e-6, start=wrong)
    assert m is not None
    assert sin_theta(v0, m.Vh.T) < 1e-8 and sin_theta(u0, m.U) < 1e-8


def test_a_full_width_start_blind_to_the_smallest_direction_is_never_wrong():
    k, r = 100, 8
    p = r + max(r, inverse.EXTRA_MIN)
    sig = torch.cat([torch.logspace(0, -4, k - 1, dtype=F64), torch.tensor([0.9e-4], dtype=F64)])
    w = make(160, k, sig, seed=1)
    u0, _, v0, _ = minor_ref(w, r)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    blind = vh[-(p + 1) : -1].T.contiguous()  # p columns: the p smallest right vectors except the smallest
    m = minor_triplets(w, r, 1e-6, start=blind)
    assert m is None or (sin_theta(v0, m.Vh.T) < 1e-6 and sin_theta(u0, m.U) < 1e-6)
    t = decompose(w, r, "minor", CPU)
    assert sin_theta(v0, t.Vh.T) < 1e-6


def test_reproducible_bit_for_bit():
    w = make(130, 90, torch.logspace(0, -8, 90, dtype=F64), seed=6)
    a, b = (decompose(w, 5, "minor", CPU, spectrum=False) for _ in range(2))
    assert a.solver == b.solver == "qr-inverse"
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_rank_deficient_weight_declines_to_the_svd():
    sigma = torch.cat([torch.linspace(3, 1, 50, dtype=F64), torch.zeros(14, dtype=F64)])
    w = make(100, 64, sigma, seed=7)
    assert minor_triplets(w, 10, 1e-6) is None  # R is singular: the triangular solves cannot run
    assert decompose(w, 10, "minor", CPU).solver == "svd-f64"


def test_a_cluster_wider_than_the_block_declines():
    # 40 equal smallest values: no gap at r = 8 for any method; the route must not claim one
    sigma = torch.cat([torch.logspace(0, -6, 60, dtype=F64), torch.full((40,), 1e-9, dtype=F64)])
    w = make(150, 100, sigma, seed=8)
    calls = []
    real = inverse._ritz
    inverse._ritz = lambda *a: calls.append(1) or real(*a)
    try:
        assert minor_triplets(w, 8, 1e-6) is None
    finally:
        inverse._ritz = real
    assert len(calls) <= inverse.NO_GAP_CHECKS  # declines early, not after MAX_ITER steps
    t = decompose(w, 8, "minor", CPU)
    assert t.solver == "svd-f64" and t.subspace_bound > 1e-6  # the last resort, and its check says so


def test_principal_side_and_forced_solver():
    w = make(120, 80, torch.logspace(0, -8, 80, dtype=F64), seed=9)
    assert decompose(w, 4, "principal", CPU, solver="qr-inverse").solver == "gram-eigh"  # principal: Gram is exact there
    easy = make(120, 80, torch.logspace(0, -2, 80, dtype=F64), seed=9)
    assert decompose(easy, 4, "minor", CPU, solver="qr-inverse").solver == "gram-eigh"  # kept where it passes
    assert decompose(w, 4, "minor", CPU, solver="qr-inverse").solver == "qr-inverse"


def test_calibrated_kpm_takes_it_instead_of_the_svd():
    """CorDA's W·C̃ with a few massive-activation channels: the Gram route fails its check (bound ~1),
    the exact route passes it, not the SVD."""
    g = torch.Generator().manual_seed(10)
    n, out, tokens = 96, 64, 4096
    x = torch.randn(tokens, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    x[:, :3] *= 100.0  # massive-activation channels
    cov = x.T @ x
    w = torch.randn(out, n, generator=g, dtype=F64) / math.sqrt(n)
    t, rec = calibrated(w, cov, tokens, 6, "kpm", CPU)
    ref, rec_svd = calibrated(w, cov, tokens, 6, "kpm", CPU, solver="svd")
    gram, _ = calibrated(w, cov, tokens, 6, "kpm", CPU, solver="gram-eigh")
    assert gram.subspace_bound > 1e-6
    assert rec["solver"] == "qr-inverse" and rec["back_error"] <= 1e-6
    assert sin_theta(ref.U, t.U) < 1e-8
    assert torch.allclose(t.S, ref.S, rtol=1e-8)
    # the components reproduce W's own part: U Σ Vh is the same matrix
    assert torch.allclose((t.U * t.S) @ t.Vh, (ref.U * ref.S) @ ref.Vh, rtol=0, atol=1e-10 * float(w.abs().max()))


def test_stops_as_soon_as_the_bound_is_far_below_tol():
    """A well-separated minor block converges in a few steps and the route stops there (GOOD·tol),
    not at the rounding floor: the steps after it would buy nothing any caller checks."""
    sigma = torch.cat([torch.logspace(0, -2, 72, dtype=F64), torch.logspace(-5, -6, 8, dtype=F64)])
    w = make(120, 80, sigma, seed=11)
    m = minor_triplets(w, 8, 1e-6)
    assert m is not None and m.steps <= 4
    goods, inverse.GOOD = inverse.GOOD, 0.0  # without the early stop it runs on to the floor
    try:
        late = minor_triplets(w, 8, 1e-6)
    finally:
        inverse.GOOD = goods
    assert late is not None and late.steps > m.steps
    u, s, vh, _ = minor_ref(w, 8)
    assert sin_theta(u, m.U) < 1e-9
    assert torch.allclose(m.S, s, rtol=1e-9)


def _one_sided_pair(w: torch.Tensor, r: int, exact_side: str):
    """The r minor triplets of w with the block's top pair tilted by 0.1 rad towards its neighbour
    outside the block, both sides still orthonormal, so that one residual (W v − σu, or Wᵀu − σv)
    is zero and only the other side shows the error."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = s.numel()
    i, j = k - r, k - r - 1  # the block's largest pair, its neighbour outside
    a = 0.1
    sa, sb = float(s[i]), float(s[j])
    sig = math.sqrt((sa * math.cos(a)) ** 2 + (sb * math.sin(a)) ** 2)
    b = math.atan2(sb * math.sin(a), sa * math.cos(a))  # the other side's angle that zeroes one residual
    U, V, S = u[:, -r:].clone(), vh[-r:].T.clone(), s[-r:].clone()
    ta, tb = (a, b) if exact_side == "right" else (b, a)  # right exact: W v = σ u
    V[:, 0] = math.cos(ta) * vh[i] + math.sin(ta) * vh[j]
    U[:, 0] = math.cos(tb) * u[:, i] + math.sin(tb) * u[:, j]
    S[0] = sig
    return U, S, V.T.contiguous()


@pytest.mark.parametrize("exact_side", ["right", "left"])
def test_the_check_looks_at_both_sides(exact_side, monkeypatch):
    """A route result that satisfies one singular relation exactly but not the other is refused:
    qr-inverse's pair is checked on both sides against W itself, and decompose falls back."""
    w = make(120, 80, torch.logspace(0, -8, 80, dtype=F64), seed=12)
    U, S, Vh = _one_sided_pair(w, 6, exact_side)
    one = (w @ Vh.T - U * S) if exact_side == "right" else (w.T @ U - Vh.T * S)
    assert float(one.abs().max()) < 1e-12  # that side alone would pass
    fake = inverse.Minor(U, S, Vh, sigma_next=float(S[0]) * 1.5, next_residual=0.0, gap=float(S[0]) * 0.5, steps=2)
    monkeypatch.setattr(dmod, "minor_triplets", lambda *a, **k: fake)
    t = dmod.qr_inverse(w, 6, 1e-6)
    assert t is not None and t.subspace_bound > 1e-3
    assert decompose(w, 6, "minor", CPU).solver == "svd-f64"


def test_a_slowly_separating_block_gets_its_steps_and_a_flat_one_is_declined():
    """The negative gaps a 4096×11008 calibrated-like W·C̃ showed (bench_inverse_route.py, CPU): the
    block separates at the 19th check and the route then converges (54 steps, sin θ 1.5e-11 against
    the SVD); a fixed 10-check limit declined it. A gap that stops closing is declined at once."""
    climbing = [-1.65e-03, -4.98e-04, -2.81e-04, -1.92e-04, -1.43e-04, -1.20e-04, -9.91e-05, -8.10e-05, -6.60e-05,
                -5.32e-05, -4.20e-05, -3.24e-05, -2.43e-05, -1.75e-05, -1.19e-05, -7.24e-06, -3.47e-06, -3.91e-07]
    assert not any(inverse._never_separates(climbing[:i], 2 * i) for i in range(1, len(climbing) + 1))
    flat = [-1e-4, -0.99e-4, -0.985e-4, -0.98e-4, -0.979e-4]
    stops = [i for i in range(1, len(flat) + 1) if inverse._never_separates(flat[:i], 2 * i)]
    assert stops and stops[0] == inverse.NO_GAP_STALL + 1
    assert inverse._never_separates(climbing[:3], 2 * inverse.NO_GAP_CHECKS)  # the hard limit holds regardless
