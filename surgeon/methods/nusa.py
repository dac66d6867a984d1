"""NuSA-CL: low-rank task updates confined to the approximate null space of the current weights.

Follows Jo, Kim, "Memory-Free Continual Learning with Null Space Adaptation for Zero-Shot
Vision-Language Models" as summarised in METHODS.md ("NuSA-CL"). Per targeted weight W (out, in),
thin SVD W = U Σ Vᵀ, k = min(out, in):
  1. principal rank p = the smallest p with Σ_{i≤p} σ_i² / Σ σ_i² ≥ ρ (authors: ρ = 0.95),
     null rank n = k − p, effective rank e = min(n, r);
  2. frozen, unscaled orthonormal bases of the e smallest directions,
        A = Vh[-e:]  (e, in),   B = U[:, -e:]  (out, e),
     and one trainable square M (e, e), zero at the start: ΔW = s·B M A, s = α/√r (authors α = 2,
     r = 128, dropout 0.25);
  3. after the task, merge W ← W + s·B M A (`surgeon absorb`) and split again (`surgeon split
     --method nusa` on the merged model) for the next task's bases.
The base weight is not changed: the written residual is W itself, so untrained, the model is the
original one exactly. A x = 0 for every x in the principal row space span(V_{1..p}) and ΔW's
output lies in span(U_{k−e+1..k}): the constraint holds by construction at every training step.

Decisions where the sources leave room:
  * Factor shapes must be known before solving (the writer pre-plans every byte), but e depends
    on the spectrum: A, B and M are stored at size r and zero-padded; rows e..r−1 of A and
    columns e..r−1 of B are zero, so those entries of M get zero gradient and carry no update.
    The first e rows/columns hold the e smallest directions in descending σ order. e, p, n and
    the energy of the kept directions are recorded per layer in surgeon.json.
  * With `--calibrate` (surgeon.linalg.calibrated) the triplets are those of W·T mapped back:
    the cutoff ρ applies to W·T's spectrum (the layer's output energy on the calibration text) and
    A is an orthonormal basis of the e kept rows of Vᵀ T⁻¹ (a QR), no longer singular vectors of W.
  * `--null-rank N` fixes n = N instead of the energy rule; given with `--null-energy`, the
    smaller of the two null spaces is used. With neither, ρ = 0.95 (the authors').
  * The scale is α/√r by the method's definition (recorded as use_rslora = true, as PEFT's rsLoRA
    scaling); --alpha defaults to 2 (the authors').
  * Not LoRA-shaped: training a PEFT LoRA would move its A and B out of the null space. The trained
    update has an exact rank-r PEFT LoRA form on the ORIGINAL model (base = W):
        lora_B = B,  lora_A = (M − M₀)·A,  same r, lora_alpha = α, use_rslora = true (PEFT's
        scaling α/√r = s),
    written by `surgeon export SPLIT --to lora` (see `lora_form`).
  * Dropout (the authors' 0.25 on the adapter input) is a runtime attribute, 0 by default: set
    `module.dropout.p` in the training script.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.errors import NumericsError
from surgeon.linalg import Triplets
from surgeon.methods.base import Method, MethodConfig, SplitResult
from surgeon.methods.lora import WrapsLinear

DEFAULT_ENERGY = 0.95  # ρ, the NuSA-CL authors' default
DEFAULT_ALPHA = 2.0  # the authors' α (with r = 128: s = 2/√128)


def energy_cutoff(cfg: MethodConfig) -> float | None:
    """The ρ in force: the given one, the default when neither option is set, None for --null-rank alone."""
    if cfg.null_energy is not None:
        return cfg.null_energy
    return DEFAULT_ENERGY if cfg.null_rank is None else None


def null_ranks(spectrum: torch.Tensor, cfg: MethodConfig) -> tuple[int, int, int]:
    """(p, n, e) from every singular value (k,), descending: principal, null and effective rank."""
    k = spectrum.numel()
    rho = energy_cutoff(cfg)
    n = k
    if rho is not None:
        e2 = spectrum.double().square()  # (k,)
        total = float(e2.sum())
        if total > 0:
            cum = e2.cumsum(0) / total  # (k,) cumulative energy fraction
            p = min(int((cum < rho).sum()) + 1, k)  # smallest p with cum[p-1] ≥ ρ
            n = k - p
    if cfg.null_rank is not None:
        n = min(n, cfg.null_rank, k)
    return k - n, n, min(n, cfg.rank)


def _row_basis(vh: torch.Tensor, calibrated: bool) -> torch.Tensor:
    """Orthonormal rows spanning vh's (e, in). Plain triplets: vh itself (already orthonormal, kept
    bit for bit). Calibrated ones (surgeon.linalg.calibrated: Vh = Vᵀ T⁻¹, unit rows, not orthogonal):
    the Q of a QR, signs fixed so that each row points along its component (deterministic)."""
    if not calibrated:
        return vh
    q, rr = torch.linalg.qr(vh.mT)  # (in, e), (e, e)
    sign = torch.where(rr.diagonal() < 0, -1.0, 1.0).to(q.dtype)  # (e,)
    return (q * sign).mT  # (e, in)


class NuSA(Method):
    name = "nusa"
    which = "minor"
    lora_shaped = False
    needs_spectrum = True
    rslora_scale = True
    options = ("null_energy", "null_rank")
    frozen_factors = ("nusa_A", "nusa_B")  # only the core M trains
    summary = "a trainable square core between frozen bases of the weight's approximate null space (NuSA-CL)"

    def default_alpha(self, rank: int) -> float:
        return DEFAULT_ALPHA

    def manifest_extra(self, cfg: MethodConfig) -> dict:
        return {"null_energy": energy_cutoff(cfg), "null_rank": cfg.null_rank}

    def factor_shapes(self, out_features, in_features, cfg):
        r = cfg.rank
        return {"nusa_A": (r, in_features), "nusa_B": (out_features, r), "nusa_M": (r, r)}

    def split(self, w: torch.Tensor, t: Triplets, cfg: MethodConfig) -> SplitResult:
        out_f, in_f = w.shape
        k, r = min(out_f, in_f), cfg.rank
        if t.spectrum.numel() != k:
            raise NumericsError(f"nusa needs all {k} singular values to place the energy cutoff, got {t.spectrum.numel()}.")
        p, n, e = null_ranks(t.spectrum, cfg)
        a = torch.zeros(r, in_f, dtype=torch.float32, device=w.device)  # (r, in)
        b = torch.zeros(out_f, r, dtype=torch.float32, device=w.device)  # (out, r)
        if e:
            a[:e] = _row_basis(t.Vh[r - e :], t.calibrated).to(torch.float32)  # (e, in): the e smallest right singular vectors
            b[:, :e] = t.U[:, r - e :].to(torch.float32)  # (out, e): the matching left ones
        m = torch.zeros(r, r, dtype=torch.float32, device=w.device)  # (r, r)
        kept = t.S[r - e :] if e else t.S[:0]  # (e,)
        total = t.energy
        stats = {
            "principal_rank": p,
            "null_rank": n,
            "effective_rank": e,
            "null_cutoff": energy_cutoff(cfg),
            # the promise: ‖W Aᵀ‖_F² = Σ of the kept σ² ≤ (1 − ρ)‖W‖_F²
            "factor_energy": float(kept.square().sum()) / total if total > 0 else 0.0,
            "factor_sigma": [float(kept[0]), float(kept[-1])] if e else [0.0, 0.0],
        }
        return SplitResult(w, {"nusa_A": a, "nusa_B": b, "nusa_M": m}, stats)

    def delta(self, factors, cfg):
        a, b, m = (factors[f].double() for f in ("nusa_A", "nusa_B", "nusa_M"))
        return cfg.scale * (b @ m @ a)  # (out, r)(r, r)(r, in) → (out, in)

    def lora_change(self, cur, init, cfg):
        dm = cur["nusa_M"].double() - init["nusa_M"].double()  # (r, r)
        lora_a = (dm @ cur["nusa_A"].double()).to(torch.float32)  # (r, in)
        return lora_a, cur["nusa_B"].to(torch.float32)  # (out, r)

    def runtime(self, base, factors, cfg, transposed):
        return NuSALinear(base, factors["nusa_A"], factors["nusa_B"], factors["nusa_M"], cfg.scale, transposed)


class NuSALinear(WrapsLinear):
    """y = base(x) + s · B(M(A x)): A (r, in) and B (out, r) frozen buffers, only M (r, r) trains."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, scale: float, transposed: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.transposed = transposed  # Conv1D base: the factors are in (out, in) orientation all the same
        self.scale = scale
        self.register_buffer("nusa_A", a.detach().clone().float())  # (r, in)
        self.register_buffer("nusa_B", b.detach().clone().float())  # (out, r)
        self.nusa_M = nn.Parameter(m.detach().clone().float())  # (r, r)
        self.dropout = nn.Dropout(dropout)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = nn.functional.linear(self.dropout(x.to(self.nusa_M.dtype)), self.nusa_A)  # (..., r) = A x
        h = nn.functional.linear(h, self.nusa_M)  # (..., r) = M (A x)
        z = nn.functional.linear(h, self.nusa_B)  # (..., out) = B M A x
        return y + (self.scale * z).to(y.dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"nusa_A": self.nusa_A.detach(), "nusa_B": self.nusa_B.detach(), "nusa_M": self.nusa_M.detach()}
