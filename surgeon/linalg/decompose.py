"""r principal or minor singular triplets of one weight, fast by default and checked every time.

Default route (METHODS.md, "Solvers"): the float64 Gram matrix of the short side and its
symmetric eigendecomposition. For W (m, n) with m >= n:
    G = Wᵀ W            # (n, n), eigenvalues λ = σ², eigenvectors V
    U_r = W V_r / σ_r   # (m, r)
(and the mirror image, G = W Wᵀ, for m < n). It is about 10x faster than a float64 SVD on a GPU
but loses the small singular directions when the spectrum spans many decades (λ = σ² doubles the
dynamic range). So every result is checked a posteriori against W itself:
  * orthonormality of the derived side:  ‖U_rᵀ U_r − I‖_max
  * a Wedin sin-θ bound on the subspace: ‖Wᵀ U_r − V_r Σ_r‖_F / δ, where δ is the gap between the
    kept singular values and the rest of the spectrum,
and when either exceeds `tol` the triplets are recomputed with a float64 SVD (gesvd on CUDA,
LAPACK on CPU), which is backward stable. The solver that produced each result is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.errors import NumericsError, UsageError
from surgeon.linalg.backends import Backend


@dataclass
class Triplets:
    U: torch.Tensor  # (m, r) float64, orthonormal columns
    S: torch.Tensor  # (r,) float64, descending
    Vh: torch.Tensor  # (r, n) float64, orthonormal rows
    spectrum: torch.Tensor  # (k,) float64, every singular value of W, descending, k = min(m, n) (see decompose)
    solver: str  # "gram-eigh" or "svd-f64"
    subspace_bound: float  # Wedin sin-θ bound of the returned subspace (inf when the gap is 0)
    orth_error: float  # ‖UᵀU − I‖_max of the side derived by multiplication (0 for the SVD)
    energy: float  # ‖W‖_F² = Σ σ² (trace of the Gram matrix)


def _select(k: int, rank: int, which: str, ascending: bool) -> slice:
    """Index range of the wanted r values in a spectrum sorted ascending or descending."""
    minor = which == "minor"
    if ascending == minor:  # wanted values at the front
        return slice(0, rank)
    return slice(k - rank, k)


def _gap(spectrum: torch.Tensor, rank: int, which: str) -> float:
    """Gap between the kept r singular values and the rest (spectrum descending)."""
    k = spectrum.numel()
    if rank >= k:
        return math.inf
    if which == "minor":
        return float(spectrum[k - rank - 1] - spectrum[k - rank])
    return float(spectrum[rank - 1] - spectrum[rank])


def _check(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, gap: float, derived: torch.Tensor | None) -> tuple[float, float]:
    """(Wedin sin-θ bound, orthonormality error of `derived`).

    The residual is taken on the side that was not derived by multiplication (the derived side
    satisfies its relation to rounding by construction): Wᵀ u_i − σ_i v_i for a tall W.
    """
    if derived is None or derived is u:
        r = w.mT @ u - vh.mT * s  # (n, r)
    else:
        r = w @ vh.mT - u * s  # (m, r)
    res = math.sqrt(float(r.square().sum()))
    if derived is None:  # an SVD: both sides independent, check the other one as well
        r1 = w @ vh.mT - u * s
        res = math.sqrt(res**2 + float(r1.square().sum()))
    bound = res / gap if gap > 0 else (0.0 if res == 0 else math.inf)
    orth = 0.0
    if derived is not None and derived.shape[1]:
        eye = torch.eye(derived.shape[1], dtype=derived.dtype, device=derived.device)
        orth = float((derived.mT @ derived - eye).abs().max())
    return bound, orth


def svd_f64(w64: torch.Tensor, rank: int, which: str, backend: Backend) -> Triplets:
    u, s, vh = backend.svd(w64)  # (m, k), (k,), (k, n); s descending
    k = s.numel()
    sel = _select(k, rank, which, ascending=False)
    u, sr, vh = u[:, sel], s[sel], vh[sel]
    bound, _ = _check(w64, u, sr, vh, _gap(s, rank, which), None)
    return Triplets(u.contiguous(), sr.contiguous(), vh.contiguous(), s, "svd-f64", bound, 0.0, float(s.square().sum()))


def gram_eigh(w64: torch.Tensor, rank: int, which: str, backend: Backend, spectrum: bool = True) -> Triplets:
    m, n = w64.shape
    tall = m >= n
    g = w64.mT @ w64 if tall else w64 @ w64.mT  # (k, k), k = min(m, n)
    if not bool(torch.isfinite(g.diagonal()).all()):  # diag(WᵀW)_j = Σ_i w_ij²: catches any NaN/Inf in W
        raise NumericsError("the weight contains NaN or Inf values; the checkpoint is damaged.")
    k = g.shape[0]
    # the wanted r pairs plus the neighbouring eigenvalue, for the gap (ascending order)
    lo, hi = (0, rank + 1) if which == "minor" else (k - rank - 1, k)
    lam_all, lam_sel, vec_sel = backend.eigh_range(g, lo, hi, all_values=spectrum)
    if which == "minor":
        lam_r, q, neighbour = lam_sel[:rank], vec_sel[:, :rank], lam_sel[rank]
    else:
        lam_r, q, neighbour = lam_sel[1:], vec_sel[:, 1:], lam_sel[0]
    lam_r, q = lam_r.flip(0), q.flip(1)  # (r,), (k, r): descending order
    s = lam_r.clamp_min(0).sqrt()
    sigma_next = float(neighbour.clamp_min(0).sqrt())
    gap = (sigma_next - float(s[0])) if which == "minor" else (float(s[-1]) - sigma_next)
    if lam_all is not None:
        spec = lam_all.clamp_min(0).sqrt().flip(0)  # descending σ, all k
    else:  # only what was computed: the block and its neighbour
        spec = torch.cat([s, s.new_tensor([sigma_next])]) if which == "principal" else torch.cat([s.new_tensor([sigma_next]), s])
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    if tall:
        v = q  # (n, r)
        u = (w64 @ v) * inv  # (m, r)
        derived = u
    else:
        u = q  # (m, r)
        v = (w64.mT @ u) * inv  # (n, r)
        derived = v
    vh = v.mT
    bound, orth = _check(w64, u, s, vh, gap, derived)
    return Triplets(u.contiguous(), s, vh.contiguous(), spec, "gram-eigh", bound, orth, float(g.diagonal().sum()))


def decompose(w: torch.Tensor, rank: int, which: str, backend: Backend, tol: float = 1e-6, solver: str = "auto", spectrum: bool = True) -> Triplets:
    """The r `which` ("minor" or "principal") singular triplets of w (m, n), in float64.

    solver: "auto" (Gram-eigh, checked, float64 SVD fallback), "gram-eigh" (no fallback) or "svd".
    spectrum: also return every singular value (else only the block and its neighbour: cheaper
    with a subset eigensolver).
    """
    if which not in ("minor", "principal"):
        raise ValueError(f"which must be 'minor' or 'principal', not {which!r}")
    if w.ndim != 2:
        raise UsageError(f"can only decompose 2-D weights, got shape {list(w.shape)}")
    k = min(w.shape)
    if not 0 < rank < k:
        raise UsageError(f"rank {rank} must be between 1 and {k - 1} for a {w.shape[0]}x{w.shape[1]} weight; choose a smaller --rank.")
    w64 = w.to(device=backend.device, dtype=torch.float64)
    if solver == "svd":
        if not bool(torch.isfinite(w64).all()):
            raise NumericsError("the weight contains NaN or Inf values; the checkpoint is damaged.")
        return svd_f64(w64, rank, which, backend)
    if solver not in ("auto", "gram-eigh"):
        raise UsageError(f"unknown solver {solver!r}; choose auto, gram-eigh or svd.")
    t = gram_eigh(w64, rank, which, backend, spectrum)
    if solver == "gram-eigh" or (t.subspace_bound <= tol and t.orth_error <= tol):
        return t
    f = svd_f64(w64, rank, which, backend)
    if not math.isfinite(float(f.S.sum())):
        raise NumericsError("the float64 SVD returned non-finite values.")
    return f
