"""The LoRA layer every LoRA-shaped method trains: y = base(x) + s · B(A x).

    from surgeon.methods.lora import LoRALinear
"""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
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
