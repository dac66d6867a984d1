"""Data-aware singular triplets: the weight decomposed as the layer is used on calibration text.

    t, rec = calibrated(W, cov, tokens, rank=8, mode="kpm", backend=get_backend("cpu"))
    # U Σ Vh reproduces the chosen r components of W; rec: {"mode", "regularised", "damping", ...}

A targeted layer computes y = W x, W (out, in). Calibration gives the sum of x xᵀ over N tokens,
cov (in, in) float64, and N. Two transforms T (in, in), both undone in the right side so that the
triplets still live in W's space:
  * CorDA (Yang et al., NeurIPS 2024; PEFT 0.21 peft/tuners/lora/corda.py): T = C̃ = C + λI,
    C = cov/N the mean input covariance, λ the damping (below). SVD of the product
        M = W C̃                    # (out, in)
        M = U Σ Vᵀ                   # checked r triplets of M (surgeon.linalg.decompose)
        Vh_cal = Vᵀ C̃⁻¹              # (r, in), a Cholesky solve: U Σ Vh_cal = the components of W
    kpm (knowledge-preserved mode): the r SMALLEST components of W C̃, i.e. the directions the
    layer's output on the calibration text needs least; ipm (instruction-previewed): the r largest.
  * ASVD (Yuan et al. 2023): T = S = diag(m^α), m the activation magnitude per input channel,
    α = 0.5: M = W S, Vh_cal = Vᵀ S⁻¹, the method's own side (minor or principal). Deviation: ASVD
    takes m = mean |x|; the covariance holds only second moments, so m = √(diag(cov)/N) (the RMS).
  * whiten (SVD-LLM's truncation-aware whitening, Wang et al. 2024): T = L, the Cholesky factor of
    C̃ = L Lᵀ (damped as CorDA's when singular), the method's own side. ‖X Δᵀ‖²_F/N = ‖Δ L‖²_F for
    any Δ, so the r smallest components of W L are exactly the rank-r part whose removal changes
    the layer's output on the calibration text least (Eckart–Young in the C̃-norm); CorDA's W·C
    weighs the inputs twice and is not that optimum.
Damping. ours (default): none while C is numerically positive definite in float64 (its Cholesky
factor exists and ‖C̃ C̃⁻¹ − I‖_F < 1e-8); otherwise CorDA's rule, λ = 0.01·mean(diag C), doubled
until the inverse passes. peft=True reproduces PEFT exactly: its covariance (each forward's
inputs divided by their max, the Grams averaged over forwards: the collector's job, see
surgeon.model.calibration) and its damping, λ = 0.01·mean(diag C) ALWAYS, doubled until
‖C̃ C̃⁻¹ − I‖_F < 0.05. The record says whether and how much was added ("regularised", "damping").
Scale: the subspaces do not depend on the scale of C, but σ(M) does; so each component is
reported at its size in weight space: Triplets.S_i = σ_i ‖vh_cal_i‖ and Triplets.Vh rows are
unit (not orthogonal), U Σ Vh unchanged. The methods split S between A and B as for plain triplets
(PEFT's corda_init uses σ of M as is, whose balance depends on the covariance scale).
Check: M's triplets pass decompose's a-posteriori check with its float64 fallback; then the back
transform is checked against W itself: Wᵀ U_r = Vh_calᵀ Σ_r holds for exact triplets, and
‖Wᵀ U_r − Vh_calᵀ Σ_r‖_F / ‖Vh_calᵀ Σ_r‖_F is recorded ("back_error"; it is C̃⁻¹ times M's own
residual, so it grows with C̃'s condition); above tol the float64 SVD of M is taken instead of the
Gram routes. Exactness of the split does not rest on it: the methods form the
residual from the rounded factors, W − s·B A, in float64.
Limits: the inverse costs one Cholesky factorisation of an (in, in) matrix per layer (shared
inputs could share it; not done); Triplets.spectrum is M's (its σ, descending), which NuSA's energy
cutoff then reads: the cutoff is on the layer's output energy on the text; Triplets.energy stays
‖W‖_F² (the split's errors are relative to W).
"""

from __future__ import annotations

import math

import torch

from surgeon.errors import NumericsError, UsageError
from surgeon.linalg.backends import Backend
from surgeon.linalg.decompose import Triplets, decompose

MODES = ("kpm", "ipm", "asvd", "whiten")
ASVD_ALPHA = 0.5
OURS_INV_TOL = 1e-8  # ‖C̃ C̃⁻¹ − I‖_F below which C counts as invertible in float64
PEFT_INV_TOL = 0.05  # PEFT's (float32) threshold
DAMP_START = 0.01  # CorDA / PEFT: λ = 0.01·mean(diag C), doubled
MAX_DOUBLINGS = 40


def side(mode: str, method_which: str) -> str:
    """Which components of the transformed weight are taken: kpm minor, ipm principal, asvd and whiten the method's."""
    if mode not in MODES:
        raise UsageError(f"unknown calibration mode {mode!r}; choose {', '.join(MODES)}.")
    return {"kpm": "minor", "ipm": "principal"}.get(mode, method_which)


def _inverse(c: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(C⁻¹ or None, ‖C C⁻¹ − I‖_F) through the Cholesky factor; None when C is not PD. At most three
    (in, in) buffers live at once (C, L then C⁻¹, C C⁻¹ − I formed in place): a 7B down_proj's is 0.97 GB."""
    l, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        return None, math.inf
    inv = torch.cholesky_inverse(l)  # (in, in)
    del l
    r = c @ inv  # (in, in)
    r.diagonal().sub_(1.0)  # C C⁻¹ − I, without an identity matrix
    return inv, float(torch.linalg.matrix_norm(r))


def regularise(c: torch.Tensor, peft: bool = False) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(C̃, C̃⁻¹, λ, inverse error): C itself when it inverts (ours), else C + λI by CorDA's doubling.
    C̃ is C modified in place (its diagonal set to diag C + λ each try): the caller's C is not kept."""
    tol = PEFT_INV_TOL if peft else OURS_INV_TOL
    if not peft:
        inv, err = _inverse(c)
        if inv is not None and err < tol:
            return c, inv, 0.0, err
    diag = c.diagonal().clone()  # (in,)
    mean_diag = float(diag.mean())
    if not (mean_diag > 0 and math.isfinite(mean_diag)):
        raise NumericsError("the calibration covariance is zero or not finite: the layer saw no usable input; give other --calibrate text.")
    lam = DAMP_START * mean_diag
    for _ in range(MAX_DOUBLINGS):
        c.diagonal().copy_(diag + lam)  # C + λI: the off-diagonal entries as they were
        inv, err = _inverse(c)
        if inv is not None and err < tol:
            return c, inv, lam, err
        lam *= 2
    raise NumericsError("the calibration covariance could not be regularised (CorDA's damping did not converge).")


def _back(w64, t: Triplets, t_inv: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(S (r,), Vh (r, in) unit rows, back error) of W from M's triplets: Vh_cal = Vh T⁻¹."""
    vh_cal = t.Vh @ t_inv  # (r, in) @ (in, in) -> (r, in)
    r = w64.mT @ t.U - vh_cal.mT * t.S  # (in, r): Wᵀ U − Vh_calᵀ Σ
    norms = torch.linalg.vector_norm(vh_cal, dim=1)  # (r,)
    size = float(torch.linalg.vector_norm(t.S * norms))  # ‖Vh_calᵀ Σ‖_F: the components' size in weight space
    err = math.sqrt(float(r.square().sum())) / size if size > 0 else 0.0
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return t.S * norms, vh_cal / safe[:, None], err


def transform(cov: torch.Tensor, tokens: int, mode: str, peft: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(T, T⁻¹, record) for a mode: CorDA's damped mean covariance, its Cholesky factor (whiten) or
    ASVD's diagonal scaling. T need not be symmetric: W = M T⁻¹ = U Σ (Vh T⁻¹)."""
    if tokens <= 0:
        raise UsageError("the calibration saw no tokens for this layer; give more --calibrate text.")
    c = cov.to(torch.float64) / tokens  # (in, in) mean covariance: a new tensor, which regularise may change in place
    if mode == "asvd":
        m = c.diagonal().clamp_min(0).sqrt()  # (in,) RMS per input channel
        floor = float(m.max()) * 1e-6 if m.numel() else 0.0
        dead = int((m <= floor).sum())
        scale = m.clamp_min(floor if floor > 0 else 1.0).pow(ASVD_ALPHA)  # (in,)
        rec = {"regularised": dead > 0, "damping": floor if dead else 0.0, "inverse_error": 0.0, "alpha": ASVD_ALPHA}
        return torch.diag(scale), torch.diag(1.0 / scale), rec
    fixed, inv, lam, err = regularise(c, peft)
    rec = {"regularised": lam > 0, "damping": lam, "inverse_error": err}
    if mode == "whiten":  # T = L, C̃ = L Lᵀ: ‖X Δᵀ‖² = ‖Δ L‖² exactly
        del inv
        l = torch.linalg.cholesky(fixed)  # (in, in) lower
        del fixed
        eye = torch.eye(l.shape[0], dtype=l.dtype, device=l.device)
        return l, torch.linalg.solve_triangular(l, eye, upper=False), rec
    return fixed, inv, rec


def calibrated(w: torch.Tensor, cov: torch.Tensor, tokens: int, rank: int, mode: str, backend: Backend, which: str = "minor",
               peft: bool = False, tol: float = 1e-6, solver: str = "auto", spectrum: bool = True) -> tuple[Triplets, dict]:
    """The r components of w (out, in) picked on the transformed weight W·T (see the module
    docstring); which: the method's own side, used by mode "asvd" only. Returns (Triplets, record)."""
    which = side(mode, which)
    if cov.ndim != 2 or cov.shape != (w.shape[1], w.shape[1]):
        raise UsageError(f"the calibration covariance has shape {list(cov.shape)}, the weight {list(w.shape)}: they do not match.")
    w64 = w.to(device=backend.device, dtype=torch.float64)
    t_fwd, t_inv, rec = transform(cov.to(backend.device), tokens, mode, peft)
    m = w64 @ t_fwd  # (out, in) @ (in, in) -> (out, in)
    t = decompose(m, rank, which, backend, tol=tol, solver=solver, spectrum=spectrum)
    s, vh, err = _back(w64, t, t_inv, tol)
    if err > tol and t.solver != "svd-f64" and solver == "auto":
        t = decompose(m, rank, which, backend, tol=tol, solver="svd", spectrum=spectrum)
        s, vh, err = _back(w64, t, t_inv, tol)
    rec.update(mode=mode, which=which, peft_settings=peft, back_error=err, solver=t.solver, subspace_bound=t.subspace_bound)
    energy = float(w64.square().sum())  # ‖W‖_F²: what the callers measure errors against
    out = Triplets(t.U, s, vh.contiguous(), t.spectrum, t.solver, t.subspace_bound, t.orth_error, energy, calibrated=True)
    return out, rec


def output_share(delta: torch.Tensor, w: torch.Tensor, cov: torch.Tensor) -> float:
    """‖X Δᵀ‖²_F / ‖X Wᵀ‖²_F = tr(Δ C Δᵀ) / tr(W C Wᵀ): the share of the layer's output on the
    calibration text carried by Δ (out, in); cov (in, in) the raw sum of x xᵀ (its scale cancels)."""
    c = cov.to(device=w.device, dtype=torch.float64)
    d64, w64 = delta.to(torch.float64), w.to(torch.float64)
    num = float(((d64 @ c) * d64).sum())  # tr(Δ C Δᵀ)
    den = float(((w64 @ c) * w64).sum())
    return num / den if den > 0 else 0.0
