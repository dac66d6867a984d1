"""The solver against a float64 SVD reference, on matrices with controlled spectra."""

from __future__ import annotations

import pytest
import torch

from surgeon.errors import NumericsError, UsageError
from surgeon.linalg import decompose, get_backend

CPU = get_backend("cpu")


def make(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))  # (m, k)
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))  # (n, k)
    return (u * sigma) @ v.T  # (m, n)


def subspace_error(q_ref: torch.Tensor, q: torch.Tensor) -> float:
    """sin of the largest principal angle between two column spaces (orthonormal columns)."""
    return float(torch.linalg.matrix_norm(q - q_ref @ (q_ref.T @ q), 2))


def reference(w: torch.Tensor, r: int, which: str):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    sel = slice(-r, None) if which == "minor" else slice(0, r)
    return u[:, sel], s[sel], vh[sel]


@pytest.mark.parametrize("shape", [(96, 96), (160, 64), (64, 160)])
@pytest.mark.parametrize("which", ["minor", "principal"])
@pytest.mark.parametrize("decades", [2, 4])
def test_matches_float64_svd(shape, which, decades):
    m, n = shape
    k = min(m, n)
    w = make(m, n, torch.logspace(0, -decades, k, dtype=torch.float64))
    t = decompose(w, 8, which, CPU)
    u0, s0, vh0 = reference(w, 8, which)
    # σ = √λ: the absolute error of λ is ~eps·σ₁², so small σ are right to ~eps·σ₁²/σ
    assert torch.allclose(t.S, s0, rtol=1e-9, atol=1e-11 * float(torch.linalg.svdvals(w)[0]))
    assert subspace_error(u0, t.U) < 1e-7
    assert subspace_error(vh0.T, t.Vh.T) < 1e-7
    # orthonormal factors and the singular value relation W v = σ u
    assert torch.allclose(t.U.T @ t.U, torch.eye(8, dtype=torch.float64), atol=1e-7)  # derived side: ~eps·κ²
    assert torch.allclose(w @ t.Vh.T, t.U * t.S, atol=1e-9 * float(s0.max()))
    assert torch.allclose(t.spectrum, torch.linalg.svdvals(w), rtol=1e-6, atol=1e-10)
    assert t.energy == pytest.approx(float(w.square().sum()), rel=1e-12)


def test_seven_decades_leave_the_gram_route_for_an_exact_one():
    w = make(200, 120, torch.logspace(0, -7, 120, dtype=torch.float64), seed=3)
    raw = decompose(w, 16, "minor", CPU, solver="gram-eigh")
    u0, _, vh0 = reference(w, 16, "minor")
    assert subspace_error(vh0.T, raw.Vh.T) > 1e-4  # the Gram route really is wrong here ...
    assert raw.subspace_bound > 1e-6  # ... and its own check says so
    for solver, route in (("auto", "qr-inverse"), ("svd", "svd-f64")):  # QR + inverse iteration, or the SVD
        t = decompose(w, 16, "minor", CPU, solver=solver)
        assert t.solver == route
        assert subspace_error(u0, t.U) < 1e-8
        assert subspace_error(vh0.T, t.Vh.T) < 1e-8


def test_rank_deficient_minor_components_are_orthonormal():
    sigma = torch.cat([torch.linspace(3, 1, 50, dtype=torch.float64), torch.zeros(14, dtype=torch.float64)])
    w = make(100, 64, sigma, seed=5)  # rank 50
    t = decompose(w, 10, "minor", CPU)
    assert t.solver == "svd-f64"  # σ = 0 makes U = WV/σ undefined: the check must catch it
    assert torch.allclose(t.U.T @ t.U, torch.eye(10, dtype=torch.float64), atol=1e-10)
    assert float(t.S.abs().max()) < 1e-12
    assert float(torch.linalg.matrix_norm(w @ t.Vh.T)) < 1e-12  # null directions of W


def test_principal_of_rank_deficient_matrix_stays_on_gram_route():
    sigma = torch.cat([torch.linspace(3, 1, 50, dtype=torch.float64), torch.zeros(14, dtype=torch.float64)])
    w = make(100, 64, sigma, seed=6)
    t = decompose(w, 10, "principal", CPU)
    assert t.solver == "gram-eigh"
    u0, s0, _ = reference(w, 10, "principal")
    assert subspace_error(u0, t.U) < 1e-9


def test_float32_and_bf16_inputs_are_decomposed_in_float64():
    w = make(80, 48, torch.logspace(0, -2, 48, dtype=torch.float64)).to(torch.bfloat16)
    t = decompose(w, 4, "minor", CPU)
    assert t.U.dtype == torch.float64
    u0, s0, _ = reference(w.double(), 4, "minor")
    assert torch.allclose(t.S, s0, rtol=1e-9)


def test_bad_inputs():
    w = torch.randn(16, 8)
    with pytest.raises(UsageError, match="rank 8"):
        decompose(w, 8, "minor", CPU)
    with pytest.raises(UsageError):
        decompose(torch.randn(4, 4, 4), 1, "minor", CPU)
    w[3, 2] = float("nan")
    with pytest.raises(NumericsError, match="NaN"):
        decompose(w, 2, "minor", CPU)


def test_forced_svd_solver():
    w = make(50, 30, torch.logspace(0, -1, 30, dtype=torch.float64))
    t = decompose(w, 5, "principal", CPU, solver="svd")
    assert t.solver == "svd-f64"
    u0, s0, _ = reference(w, 5, "principal")
    assert torch.allclose(t.S, s0)


@pytest.mark.parametrize("which", ["minor", "principal"])
def test_without_the_full_spectrum_the_triplets_are_the_same(which):
    """spectrum=False lets a backend with a subset eigensolver skip the other pairs; the triplets stay."""
    w = make(150, 90, torch.logspace(0, -3, 90, dtype=torch.float64), seed=9)
    full, part = decompose(w, 6, which, CPU), decompose(w, 6, which, CPU, spectrum=False)
    assert part.solver == full.solver == "gram-eigh"
    assert torch.allclose(part.S, full.S, rtol=1e-10)
    assert torch.allclose((part.U * part.S) @ part.Vh, (full.U * full.S) @ full.Vh, atol=1e-10)
    assert part.energy == pytest.approx(full.energy, rel=1e-12)
