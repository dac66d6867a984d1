"""r principal or minor singular triplets of one weight, fast by default and checked every time.

    t = decompose(W, rank=64, which="principal", backend=get_backend("cuda"), spectrum=False)
    t.solver   # "subspace", "gram-eigh", "qr-inverse" or "svd-f64": the route that produced the result

Two fast routes, both on the float64 Gram matrix of the short side. For W (m, n) with m >= n:
    G = Wᵀ W            # (n, n), eigenvalues λ = σ², eigenvectors V
    U_r = W V_r / σ_r   # (m, r)
(and the mirror image, G = W Wᵀ, for m < n).
  * gram-eigh (METHODS.md, "Solvers"): the symmetric eigendecomposition of G (syevd). It gives
    every singular value on the way; its tridiagonal reduction is latency-bound on a GPU
    (~0.11 s for k = 4096 on an H200 whatever r is).
  * subspace (surgeon.linalg.subspace): Chebyshev-filtered subspace iteration on G (principal) or
    on G⁻¹ through its Cholesky factor (minor), GEMM/trsm-bound, with the gap at r certified by one
    more Cholesky factorization. It never computes the other singular values.
`auto_route` picks the first route (inside linalg only): gram-eigh whenever every singular value
is asked for (spectrum=True), and on the CPU, where flops decide and eigh of k ≲ 2000 is cheaper;
subspace on CUDA for k ≥ 1024 and r ≤ k/8.
Both lose the small singular directions when the spectrum spans many decades (λ = σ² doubles the
dynamic range). So every result is checked a posteriori against W itself:
  * orthonormality of the derived side:  ‖U_rᵀ U_r − I‖_max
  * a Wedin sin-θ bound on the subspace: ‖Wᵀ U_r − V_r Σ_r‖_F / δ, where δ is the gap between the
    kept singular values and the rest of the spectrum (gram-eigh: from its eigenvalues; subspace:
    from the certified bound on σ_{r+1}, which holds for W itself, rounding included),
and when either exceeds `tol` the next route is tried: subspace → gram-eigh → (minor side) qr-inverse
→ a float64 SVD (gesvd on CUDA, LAPACK on CPU), which is backward stable. qr-inverse
(surgeon.linalg.inverse) is one Householder QR and block inverse iteration on its triangular
factor, started from gram-eigh's vectors: it never forms the Gram matrix's squares, so it keeps
the SVD's accuracy on the spectra the Gram routes lose (calibrated weights W·C̃ span 6-11 decades)
at the cost of a QR and a few triangular solves instead of a full SVD. Both Gram routes leave residuals of about
eps·σ₁² in G, i.e. eps·σ₁²/σ_r in the check, whose floor is therefore about √r·eps·σ₁²/(σ_r·δ)
on the minor side (the SVD's: √r·eps·σ₁/δ): for a 3-decade log spectrum at k = 4096 that floor is
near 1e-6, so such weights may fall back although their subspace is right to ~1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.errors import NumericsError, UsageError
from surgeon.linalg.backends import Backend
from surgeon.linalg.inverse import minor_triplets
from surgeon.linalg.subspace import subspace_pairs


@dataclass
class Triplets:
    U: torch.Tensor  # (m, r) float64, orthonormal columns
    S: torch.Tensor  # (r,) float64, descending
    Vh: torch.Tensor  # (r, n) float64, orthonormal rows
    spectrum: torch.Tensor  # (k,) float64, every singular value of W, descending, k = min(m, n); with spectrum=False only the r kept and their neighbour (r+1,)
    solver: str  # the route: "subspace", "gram-eigh", "qr-inverse" or "svd-f64"
    subspace_bound: float  # Wedin sin-θ bound of the returned subspace (inf when the gap is 0)
    orth_error: float  # ‖UᵀU − I‖_max of the side derived by multiplication (0 for the SVD)
    energy: float  # ‖W‖_F² = Σ σ² (trace of the Gram matrix)
    calibrated: bool = False  # from surgeon.linalg.calibrated: Vh rows unit but NOT orthogonal, S not necessarily descending


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


def _gram(w64: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The float64 Gram matrix of the short side (k, k) and whether W is tall (G = WᵀW)."""
    tall = w64.shape[0] >= w64.shape[1]
    g = w64.mT @ w64 if tall else w64 @ w64.mT  # (k, k), k = min(m, n)
    if not bool(torch.isfinite(g.diagonal()).all()):  # diag(WᵀW)_j = Σ_i w_ij²: catches any NaN/Inf in W
        raise NumericsError("the weight contains NaN or Inf values; the checkpoint is damaged.")
    return g, tall


def _assemble(w64, tall, lam_r, q, gap, spec, energy, solver) -> Triplets:
    """Triplets from r Gram eigenpairs (descending λ (r,), vectors (k, r)): the other side by
    multiplication, then the check. gap: between the kept σ and the rest (Wedin's δ)."""
    s = lam_r.clamp_min(0).sqrt()  # (r,)
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
    return Triplets(u.contiguous(), s, vh.contiguous(), spec, solver, bound, orth, energy)


def gram_eigh(w64: torch.Tensor, rank: int, which: str, backend: Backend, spectrum: bool = True, gram=None) -> Triplets:
    g, tall = _gram(w64) if gram is None else gram
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
        spec = _block_spectrum(s, sigma_next, which)
    return _assemble(w64, tall, lam_r, q, gap, spec, float(g.diagonal().sum()), "gram-eigh")


def _block_spectrum(s: torch.Tensor, sigma_next: float, which: str) -> torch.Tensor:
    nxt = s.new_tensor([sigma_next])
    return torch.cat([s, nxt]) if which == "principal" else torch.cat([nxt, s])


def subspace(w64: torch.Tensor, rank: int, which: str, backend: Backend, tol: float, spectrum: bool = False, gram=None) -> Triplets | None:
    """The Chebyshev-filtered subspace route (surgeon.linalg.subspace), checked like gram-eigh, with
    Wedin's δ from the certified bound on σ_{r+1} (0, hence an infinite bound, when the certificate
    fails). None when the route cannot run (minor side, G not positive definite)."""
    g, tall = _gram(w64) if gram is None else gram
    p = subspace_pairs(g, rank, which, backend, m_rows=max(w64.shape), tol=tol)
    if p is None:
        return None
    lam_r, q = (p.lam, p.vecs) if which == "principal" else (p.lam.flip(0), p.vecs.flip(1))  # descending
    s_edge = math.sqrt(max(float(p.lam[rank - 1]), 0.0))  # the kept σ next to the gap
    gap = 0.0
    if p.lam_next_bound is not None:
        alpha = math.sqrt(max(p.lam_next_bound, 0.0))
        gap = max(s_edge - alpha if which == "principal" else alpha - s_edge, 0.0)
    if spectrum:  # asked for every value: the route cannot give it, so pay for the values alone
        spec = singular_values(w64, backend, gram=(g, tall))
    else:
        spec = _block_spectrum(lam_r.clamp_min(0).sqrt(), math.sqrt(max(p.lam_next, 0.0)), which)
    return _assemble(w64, tall, lam_r, q, gap, spec, float(g.diagonal().sum()), "subspace")


def qr_inverse(w64: torch.Tensor, rank: int, tol: float, near: Triplets | None = None) -> Triplets | None:
    """The minor side by surgeon.linalg.inverse, checked like the other routes (both sides against
    W, Wedin's δ from the converged Ritz values), started from `near` (a Gram route's result on the
    same weight), whose spectrum it keeps outside the block. None when the iteration declines."""
    tall = w64.shape[0] >= w64.shape[1]
    start = None if near is None else (near.Vh.mT if tall else near.U)  # (k, r): the short side
    try:
        m = minor_triplets(w64, rank, tol, start)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as e:  # a singular R (LinAlgError), a build without geqrf/ormqr: the SVD's turn
        if "CUDA error" in str(e):
            raise
        return None
    if m is None:
        return None
    bound, _ = _check(w64, m.U, m.S, m.Vh, m.gap, None)
    eye = torch.eye(rank, dtype=m.U.dtype, device=m.U.device)
    orth = max(float((m.U.mT @ m.U - eye).abs().max()), float((m.Vh @ m.Vh.mT - eye).abs().max()))
    if near is not None and near.spectrum.numel() > rank + 1:  # every value: Gram's, the kept block replaced
        spec = near.spectrum.clone()
        spec[-rank:] = m.S
        # Gram's σ_{r+1}, σ_{r+2}, … carry its rounding, about k·eps·σ₁²/σ; the Ritz σ_{r+1} is right to
        # its residual. The neighbour takes whichever is closer; values above it that fall below it
        # (Gram's rounding at the bottom) are raised to it, so the spectrum stays descending
        gram_err = spec.numel() * 2.0**-53 * float(spec[0]) ** 2 / max(m.sigma_next, 1e-300)
        if m.next_residual < gram_err:
            spec[-(rank + 1)] = m.sigma_next
        else:
            spec[-(rank + 1)].clamp_(min=m.sigma_next - m.next_residual)
        spec[: -(rank + 1)].clamp_(min=float(spec[-(rank + 1)]))
    else:
        spec = _block_spectrum(m.S, m.sigma_next, "minor")  # (r+1,): the block and its neighbour
    energy = near.energy if near is not None else float(w64.square().sum())  # ‖W‖_F²: the Gram route's trace when it ran
    return Triplets(m.U, m.S, m.Vh, spec, "qr-inverse", bound, orth, energy)


def singular_values(w64: torch.Tensor, backend: Backend, gram=None) -> torch.Tensor:
    """Every singular value of w64 (k,), descending, from the eigenvalues of its float64 Gram matrix
    (eigvalsh: the tridiagonal reduction and its values, ~0.9 of a full eigh). Absolute error
    about eps·σ₁²/σ: right to ~1e-16·κ² relative for σ down to σ₁/κ; values below ~1e-8·σ₁ are noise.
    For `surgeon spectra` and methods that need the whole spectrum."""
    g, _ = _gram(w64.to(device=backend.device, dtype=torch.float64)) if gram is None else gram
    return backend.eigvalsh(g).clamp_min(0).sqrt().flip(0)


SOLVERS = ("auto", "gram-eigh", "subspace", "qr-inverse", "svd")
SUBSPACE_MIN_K = {"cuda": 1024}  # device type → smallest k where the subspace route beats one eigh (none on CPU: bench/RESULTS.md)


def auto_route(device: torch.device, k: int, rank: int, spectrum: bool) -> str:
    """The route `solver="auto"` starts with. The full spectrum costs a tridiagonal reduction, after
    which the eigenvectors are nearly free, so spectrum=True always takes gram-eigh; without it the
    subspace route where its filter is cheap: a latency-bound eigh (CUDA), k large, r ≤ k/8."""
    min_k = SUBSPACE_MIN_K.get(device.type)
    if spectrum or min_k is None or k < min_k or 8 * rank > k:
        return "gram-eigh"
    return "subspace"


def _passes(t: Triplets | None, tol: float) -> bool:
    return t is not None and t.subspace_bound <= tol and t.orth_error <= tol


def decompose(w: torch.Tensor, rank: int, which: str, backend: Backend, tol: float = 1e-6, solver: str = "auto", spectrum: bool = True) -> Triplets:
    """The r `which` ("minor" or "principal") singular triplets of w (m, n), in float64.

    solver: "auto" (the route of `auto_route`, checked; on failure gram-eigh, checked; on the minor
    side qr-inverse, checked; then the float64 SVD), "gram-eigh", "subspace" or "qr-inverse" (that
    route alone, no fallback: its check figures are returned; "subspace" runs gram-eigh where it
    cannot run, "qr-inverse" runs gram-eigh first and keeps it when it passes, on the principal side
    or where the iteration declines) or "svd". The route used is Triplets.solver.
    spectrum: also return every singular value. False skips them: then Triplets.spectrum holds the
    block and its neighbour only, and auto may take the subspace route, which never computes them.
    """
    if which not in ("minor", "principal"):
        raise ValueError(f"which must be 'minor' or 'principal', not {which!r}")
    if w.ndim != 2:
        raise UsageError(f"can only decompose 2-D weights, got shape {list(w.shape)}")
    k = min(w.shape)
    if not 0 < rank < k:
        raise UsageError(f"rank {rank} must be between 1 and {k - 1} for a {w.shape[0]}x{w.shape[1]} weight; choose a smaller --rank.")
    if solver not in SOLVERS:
        raise UsageError(f"unknown solver {solver!r}; choose {', '.join(SOLVERS)}.")
    w64 = w.to(device=backend.device, dtype=torch.float64)
    if solver == "svd":
        if not bool(torch.isfinite(w64).all()):
            raise NumericsError("the weight contains NaN or Inf values; the checkpoint is damaged.")
        return svd_f64(w64, rank, which, backend)
    gram = _gram(w64)
    route = auto_route(backend.device, k, rank, spectrum) if solver == "auto" else solver
    if route == "subspace":
        t = subspace(w64, rank, which, backend, tol, spectrum, gram)
        if (t is not None and solver == "subspace") or _passes(t, tol):
            return t
    t = gram_eigh(w64, rank, which, backend, spectrum, gram)
    if solver in ("auto", "qr-inverse") and which == "minor" and not _passes(t, tol):
        q = qr_inverse(w64, rank, tol, t)
        if (q is not None and solver == "qr-inverse") or _passes(q, tol):
            return q
    if solver != "auto" or _passes(t, tol):
        return t
    f = svd_f64(w64, rank, which, backend)
    if not math.isfinite(float(f.S.sum())):
        raise NumericsError("the float64 SVD returned non-finite values.")
    return f
