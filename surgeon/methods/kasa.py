"""KaSA: knowledge-aware singular-value adaptation, as a split method with its training losses.

    surgeon split --method kasa MODEL --rank 8 --out split-dir [--seed 0]
    surgeon absorb split-dir --out merged                    # W_world + s·B diag(d) A
    surgeon absorb split-dir --out merged --base original    # W + s·B diag(d) A (re-adds the truncated part)
    surgeon export split-dir --to lora --out lora-dir        # rank-r LoRA on the truncated base (split-dir)
    surgeon export split-dir --to kasa --out kasa-dir        # PEFT's own KaSA adapter, on the ORIGINAL base

Wang, Jiang, Park, Kim, Tang, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language
Models" (arXiv:2412.06071); the authors' code (github.com/juyongjiang/KaSA: peft/src/peft/tuners/
lora/layer.py, main.py); PEFT 0.21.2's port (peft/tuners/lora/variants.py KasaLinearVariant and
_kasa_layer_regularization_loss, config.py KasaConfig). What is followed, and where they disagree:

1. Truncation (frozen, one-time). W = U Σ Vᵀ, k = min(out, in); the r SMALLEST triplets are removed:
       W_world = W − U[:, −r:] diag(σ[−r:]) Vh[−r:]
   as in the paper and PEFT. The authors' script keeps `in_features − r` components instead, which
   drops the r smallest only when in ≤ out: a quirk, not copied. PEFT uses a float32 full SVD; here
   the checked float64 triplets of surgeon.linalg.decompose, so ours and PEFT's truncations agree to
   float32 rounding (tests/test_kasa.py compares them). The manifest records the removed σ per layer.
2. Update ΔW = s · B diag(d) A, s = alpha/r (alpha/√r with rsLoRA), PEFT's scaling. A (r, in) is
   initialised like LoRA's A (kaiming_uniform_, a = √5: U(−1/√in, 1/√in)), B (out, r) = 0, and the
   gates d (r) ~ N(0, 1) (torch.randn, as the authors and PEFT). Every layer draws from its own CPU
   generator seeded with sha256(seed, module name), so a split is reproducible, and independent of
   the device and of the order in which layers are solved. Default alpha = r (s = 1, PEFT's default
   ratio); the authors' GLUE scripts use r = 8, alpha = 16 (s = 2): pass --alpha to match them.
3. Training loss, per layer, summed over layers, in float32 (PEFT's `_get_kasa_loss`):
       β·Σ dᵢ² + γ·(‖BᵀB − I_r‖_F + ‖A Aᵀ − I_r‖_F),   β = 1e-4, γ = 1e-3
   PLAIN Frobenius norms, as PEFT and the authors' main.py compute them (torch.norm(·, 'fro')); the
   paper (Eq. 11) and the surgeon issue write squared norms. We follow the code, with which the
   published numbers and the default β, γ were obtained. The authors form the outer Grams AᵀA
   (in×in) and BBᵀ (out×out) and divide the sum by the number of layers: not followed (far more
   work; PEFT's r×r form is the documented port). `KasaLinear.regularizer()` gives one layer's term
   and `SplitModel.extra_loss()` the sum, so a trainer adds it without knowing the method.
4. Absorb folds the update into the truncated base by default (W_world + ΔW: the runtime forward,
   and what PEFT's merge_and_unload gives); `--base original` re-adds the truncated components
   (W + ΔW), see surgeon/absorb.py. Export: (a) an ordinary rank-r PEFT LoRA on W_world
   (lora_B = B diag(d), lora_A = A, same alpha); (b) PEFT's KaSA format (lora_A, lora_B, lora_diag,
   kasa_config) on the ORIGINAL base, which PEFT truncates itself when it loads the adapter.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from surgeon.linalg import Triplets
from surgeon.methods.base import Method, MethodConfig, SplitResult
from surgeon.methods.lora import WrapsLinear

PAPER = "arXiv:2412.06071"


def layer_seed(seed: int, module: str) -> int:
    """The per-layer seed: the first 63 bits of sha256("<seed>:<module>")."""
    digest = hashlib.sha256(f"{int(seed)}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_factors(out_features: int, in_features: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A like LoRA's A (Kaiming-uniform, a=√5), B zero, d ~ N(0, 1); float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, in_features, dtype=torch.float32)  # (r, in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    d = torch.randn(rank, generator=g, dtype=torch.float32)  # (r,)
    b = torch.zeros(out_features, rank, dtype=torch.float32)  # (out, r)
    return {"lora_A": a, "lora_B": b, "lora_diag": d}


def kasa_regularizer(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, beta: float, gamma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One layer's KaSA loss β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), plain norms (PEFT's form).

    Computed in `dtype` (float32 as PEFT; float64 for gradient checks). At an exactly orthonormal
    factor the norm is not differentiable; autograd gives the subgradient 0 there.
    """
    a, b, d = a.to(dtype), b.to(dtype), d.to(dtype)
    eye = torch.eye(d.shape[0], dtype=dtype, device=d.device)  # (r, r)
    gram_b = b.mT @ b  # (r, out) @ (out, r) -> (r, r)
    gram_a = a @ a.mT  # (r, in) @ (in, r) -> (r, r)
    orth = torch.linalg.matrix_norm(gram_b - eye) + torch.linalg.matrix_norm(gram_a - eye)
    return beta * d.square().sum() + gamma * orth


class KasaLinear(WrapsLinear):
    """y = W_world x (+ bias) + s · B(d ⊙ (A x)); W_world is the (frozen) truncated base layer."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, scale: float, beta: float, gamma: float, transposed: bool = False):
        super().__init__()
        self.base = base
        self.transposed = transposed  # base stores (in, out) (Conv1D); the factors are always (out, in)-convention
        self.scale = scale
        self.beta = beta
        self.gamma = gamma
        self.lora_A = nn.Parameter(a.detach().clone().float())  # (r, in)
        self.lora_B = nn.Parameter(b.detach().clone().float())  # (out, r)
        self.lora_diag = nn.Parameter(d.detach().clone().float())  # (r,)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        z = nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        z = nn.functional.linear(z * self.lora_diag, self.lora_B)  # (..., out)
        return y + (self.scale * z).to(y.dtype)

    def regularizer(self) -> torch.Tensor:
        return kasa_regularizer(self.lora_A, self.lora_B, self.lora_diag, self.beta, self.gamma)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach(), "lora_diag": self.lora_diag.detach()}


class KaSA(Method):
    name = "kasa"
    which = "minor"
    lora_shaped = False  # three factors (A, B, d): surgeon.factors.safetensors; `export --to lora|kasa` for PEFT
    truncates = True
    summary = "the r minor singular components are removed from the frozen base; a gated rank-r update s·B diag(d) A is trained"

    def factor_shapes(self, out_features, in_features, cfg):
        r = cfg.rank
        return {"lora_A": (r, in_features), "lora_B": (out_features, r), "lora_diag": (r,)}

    def split(self, w: torch.Tensor, t: Triplets, cfg: MethodConfig) -> SplitResult:
        removed = (t.U * t.S) @ t.Vh  # (out, r) @ (r, in) -> (out, in): U_r diag(σ_r) Vh_r, the r minor
        residual = w - removed  # (out, in) W_world
        seed = layer_seed(cfg.seed, cfg.module)
        factors = init_factors(w.shape[0], w.shape[1], cfg.rank, seed)
        stats = {"truncated_sigma": [float(s) for s in t.S], "init_seed": seed}
        return SplitResult(residual, factors, stats)

    def delta(self, factors, cfg):
        b = factors["lora_B"].double() * factors["lora_diag"].double()  # (out, r) · diag(d)
        return cfg.scale * (b @ factors["lora_A"].double())  # (out, r) @ (r, in) -> (out, in)

    def lora_form(self, factors, cfg):
        b = factors["lora_B"].double() * factors["lora_diag"].double()  # (out, r): B diag(d)
        return {"lora_A": factors["lora_A"].float().contiguous(), "lora_B": b.float().contiguous()}

    def runtime(self, base, factors, cfg, transposed):
        return KasaLinear(base, factors["lora_A"], factors["lora_B"], factors["lora_diag"], cfg.scale, cfg.kasa_beta, cfg.kasa_gamma, transposed)

    def regularizer(self, modules):
        terms = [m.regularizer() for m in modules if isinstance(m, KasaLinear)]
        return torch.stack([t.to(terms[0].device) for t in terms]).sum() if terms else None

    def describe(self, cfg):
        return {
            "reference": f"KaSA, {PAPER}; authors' code github.com/juyongjiang/KaSA; PEFT 0.21 KasaLinearVariant",
            "truncation": "W_world = W - U[:, -r:] diag(s[-r:]) Vh[-r:], the r smallest of k = min(out, in), float64 (paper, PEFT)",
            "update": "dW = scale * B diag(d) A; A kaiming_uniform(a=sqrt(5)), B = 0, d ~ N(0, 1); per-layer seed sha256(seed:module)",
            "seed": cfg.seed,
            "regularizer": "beta*sum(d^2) + gamma*(||B^T B - I||_F + ||A A^T - I||_F), plain Frobenius norms (PEFT _get_kasa_loss; "
            "the paper writes squared norms), summed over layers, float32",
            "beta": cfg.kasa_beta,
            "gamma": cfg.kasa_gamma,
            "absorb_default": "residual: W_world + dW (--base original re-adds the truncated components: W + dW)",
            "exports": {"lora": "rank-r PEFT LoRA on the truncated base (this folder)", "kasa": "PEFT KaSA adapter on the ORIGINAL base"},
        }
