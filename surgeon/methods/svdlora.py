"""What PiSSA and MiLoRA share: r singular triplets become a LoRA pair with balanced halves.

    σ' = σ_r / s,  B = U_r diag(√σ'),  A = diag(√σ') Vh_r,  W_res = W − s·B A
with s PEFT's scaling (alpha/r), exactly as PEFT's `init_lora_weights="pissa"` (lora/layer.py,
`pissa_init`): B A·s = U_r Σ_r Vh_r, and A and B carry half of the spectrum each so their gradients
are balanced. The residual is formed from the rounded factors in float64, so W_res + s·B A = W to
float64 rounding before any cast.
"""

from __future__ import annotations

import torch

from surgeon.linalg import Triplets
from surgeon.methods.base import Method, MethodConfig, SplitResult


class SvdLoRA(Method):
    lora_shaped = True

    def factor_shapes(self, out_features, in_features, cfg):
        return {"lora_A": (cfg.rank, in_features), "lora_B": (out_features, cfg.rank)}

    def split(self, w: torch.Tensor, t: Triplets, cfg: MethodConfig) -> SplitResult:
        s = cfg.scale
        root = (t.S / s).sqrt()  # (r,)
        b = (t.U * root).to(torch.float32)  # (out, r)
        a = (root[:, None] * t.Vh).to(torch.float32)  # (r, in)
        residual = w - s * (b.double() @ a.double())  # (out, in)
        return SplitResult(residual, {"lora_A": a, "lora_B": b})

    def delta(self, factors, cfg):
        return cfg.scale * (factors["lora_B"].double() @ factors["lora_A"].double())  # (out, in)
