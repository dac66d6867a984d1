"""A TRUE per-token router for the mixture's latency baseline (issue 25: v1's "per-step" baseline re-routed
the prompt at every step and so recomputed the same gates).

    with PerToken(model):          # model: a loaded moe split (surgeon.runtime.load_split(...).model)
        model.generate(...)

Inside, every token of every forward routes itself: the block's trained router (the same RMS norm,
rational activation, linear and top-k) is applied to the token's own hidden state instead of the pooled
prompt, giving gates (B, T, E); every expert is computed for every row (the tokens of a batch choose
different experts, so none can be skipped) and its rank-r output is scaled per token. Outputs differ from
the prompt-routed model's (it is another routing, not the trained one): only its time is compared.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from surgeon.methods.moe_runtime import ExpertLinear, Router


def token_gates(router: Router, h: torch.Tensor) -> torch.Tensor:
    """(B, T, E) top-k gates of each token of h (B, T, d) under ROUTER's weights."""
    z = h.float()
    z = z * torch.rsqrt(z.square().mean(-1, keepdim=True) + 1e-6)
    probs = torch.softmax(nn.functional.linear(router.activation(z), router.weight, router.bias), dim=-1)
    if router.k < router.n_experts:
        top = probs.topk(router.k, dim=-1).indices
        return probs * torch.zeros_like(probs).scatter(-1, top, 1.0)
    return probs


def _forward(self: ExpertLinear, x: torch.Tensor) -> torch.Tensor:
    y = self.base(x)
    g = self._router.gates[..., self.expert]  # (B, T)
    u = nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A)  # (B, T, r)
    z = nn.functional.linear(u * g.unsqueeze(-1).to(u.dtype), self.lora_B)  # (B, T, out)
    return y + (self.scale * z).to(y.dtype)


class PerToken:
    def __init__(self, model: nn.Module):
        self.model, self.routing = model, model.surgeon_routing
        self.experts = [m for m in model.modules() if isinstance(m, ExpertLinear)]
        self.handles: list = []

    def _route(self, router: Router, module, args, kwargs) -> None:
        h = args[0] if args else kwargs["hidden_states"]  # (B, T, d) entering the block
        router.gates, router.active = token_gates(router, h), [True] * router.n_experts

    def __enter__(self) -> PerToken:
        rt = self.routing
        rt.fix({name: torch.ones(r.n_experts) for name, r in rt.routers.items()})  # the prompt routing stands still
        for name, router in rt.routers.items():
            block = self.model.get_submodule(name)
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._route, router), with_kwargs=True))
        for m in self.experts:
            m.forward = types.MethodType(_forward, m)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for m in self.experts:
            del m.forward  # back to the class's method
        self.routing.unfix()
