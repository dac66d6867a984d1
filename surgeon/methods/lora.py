"""The LoRA layers every LoRA-shaped method trains: y = base(x) + s · B(A x) on a linear layer (LoRALinear), and
W + s·ΔW on a fused MoE expert parameter (FusedLoRA, a parametrization).

    from surgeon.methods.lora import LoRALinear
"""

from __future__ import annotations

import torch
from torch import nn


class WrapsLinear(nn.Module):
    """A runtime module standing in for a linear layer (self.base): the model code that reads the layer's
    weight or bias (T5 for its dtype, Gemma 3's vision path for its device) reads the wrapped layer's, as
    with PEFT's layers."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)


class LoRALinear(WrapsLinear):
    """y = base(x) + s · B(A x): the runtime of every LoRA-shaped method (MiLoRA, PiSSA)."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool = False):
        super().__init__()
        self.base = base
        self.transposed = transposed
        self.scale = scale
        self.lora_A = nn.Parameter(a.detach().clone().float())  # (r, in)
        self.lora_B = nn.Parameter(b.detach().clone().float())  # (out, r)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        # under autocast the products run in the autocast dtype anyway: casting x to the factors'
        # float32 first (as PEFT does) would only add a kernel; outside autocast, match dtypes
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        z = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return y + (self.scale * z).to(y.dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}


class FusedLoRA(nn.Module):
    """A parametrization of a fused MoE expert parameter (E, out, in): W + s·ΔW, ΔW_e = B_e A_e, the
    factors held in PEFT's ParamWrapper layout (surgeon/model/moe.py): lora_A (E·R, in), lora_B (out, R·E)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, experts: int, scale: float):
        super().__init__()
        self.experts, self.scale = experts, scale
        self.lora_A = nn.Parameter(a.detach().clone().float())  # (E·R, in)
        self.lora_B = nn.Parameter(b.detach().clone().float())  # (out, R·E)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.reshape(self.experts, -1, self.lora_A.shape[1])  # (E, R, in)
        b = self.lora_B.reshape(self.lora_B.shape[0], -1, self.experts)  # (out, R, E)
        return w + (self.scale * torch.einsum("ore,eri->eoi", b, a)).to(w.dtype)  # (E, out, in)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}
