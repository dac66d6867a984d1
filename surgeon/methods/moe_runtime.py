"""The live side of the moe method: LoRA experts, one prompt-aware router per block, gate caching.

    sm = load_split("moe-split")                      # installs everything below
    out = sm.model.generate(ids, max_new_tokens=32)    # each block routes the prompt ONCE
    loss = task_loss + sm.extra_loss()                 # λ·(Switch load-balancing loss)

Per block b with hidden states H (B, T, d) entering it and E experts (its targeted linears):
    p     = pool(H, prompt mask)          # (B, d) attention pooling with a learned query q (default),
                                          #        mean or last-token pooling as options
    z     = p / rms(p)                    # parameter-free RMS normalisation (our addition, see below)
    a     = R(z),  R(x) = P₃(x) / (1 + |b₁x + b₂x²|)   # learnable rational activation
    probs = softmax(W a + c)              # (B, E)
    gates = probs · 1[e ∈ top-k(probs)]   # (B, E), Switch's rule: kept probabilities, not renormalised
and every expert e of the block adds gates[:, e] · s · B_e A_e x to its base layer's output; an
expert whose gate is 0 for every row is skipped (not computed).

Decisions (no public code exists; METHODS.md "MiLoRA-mixture" gives the paper's construction):
  * Rational activation: the paper's choice of a rational function, in the (3, 2) form of Boullé,
    Nakatsukasa, Townsend, "Rational neural networks" (2020), initialised with their coefficients
    for the best rational approximation of ReLU on [-1, 1] (max error 0.022); the denominator is
    made pole-free as in Molina et al.'s "safe" Padé units (1 + |·|), which leaves the init unchanged.
  * z = p / rms(p): the residual stream entering a pre-norm block is not normalised (LLM hidden
    states reach hundreds), while R was fitted on [-1, 1]; normalising keeps R in its range.
  * q starts at 0, so attention pooling starts as mean pooling; W is small random (seeded per block),
    c = 0. The router's init never changes the untrained model: every expert starts silent (B = 0).
  * Gates are not renormalised over the top-k (Switch): with k = 1 a renormalised gate is the
    constant 1 and the router would get no gradient from the task loss.
  * Load-balancing loss (Switch, Fedus et al. eq. 4): E · Σ_e f_e · P_e per block, f_e = fraction of
    the batch's prompts routed to e (top-k membership), P_e = mean router probability; averaged over
    blocks (as transformers' load_balancing_loss_func does over layers) and weighted λ = 1e-2. With
    dense routing (k = E) f_e ≡ 1 and the loss is the constant E: there is nothing to balance.

Gate life cycle (`Routing`): a forward without KV cache (or with an empty one) is a new prompt:
each block's pre-hook routes it and caches the gates; a forward with a filled cache (a decoding step)
reuses them. Inside `model.generate` only the first forward is the prompt, whatever the cache does.
`mode="per_step"` recomputes the gates at every step from the prompt's hidden states (kept per
block, or re-sliced from a cache-free forward): the baseline for bench/bench_moe_latency.py.
`fix(gates)` pins fixed per-block gates (what `surgeon absorb --fixed-gates` folds in).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from surgeon.errors import UsageError
from surgeon.methods.lora import LoRALinear

LB_WEIGHT = 1e-2  # λ of the load-balancing loss (Switch Transformer's α)
POOLINGS = ("attention", "mean", "last")
# Boullé et al.'s (3, 2) rational approximation of ReLU on [-1, 1]: P ascending a0..a3, Q = 1 + |b1 x + b2 x²|
RATIONAL_NUM = (0.0218, 0.5, 1.5957, 1.1915)
RATIONAL_DEN = (0.0, 2.383)


def init_router(index: int, hidden: int, n_experts: int) -> dict[str, torch.Tensor]:
    """The untrained router of block `index` (seeded by the index: splits are reproducible)."""
    g = torch.Generator().manual_seed(20241023 + index)
    return {
        "router.query": torch.zeros(hidden),  # (d,)
        "router.num": torch.tensor(RATIONAL_NUM),  # (4,)
        "router.den": torch.tensor(RATIONAL_DEN),  # (2,)
        "router.weight": torch.randn(n_experts, hidden, generator=g) / math.sqrt(hidden),  # (E, d)
        "router.bias": torch.zeros(n_experts),  # (E,)
    }


class Router(nn.Module):
    """One block's router; holds the cached gates of the current prompt."""

    def __init__(self, tensors: dict[str, torch.Tensor], top_k: int, pooling: str):
        super().__init__()
        self.query = nn.Parameter(tensors["router.query"].detach().clone().float())
        self.num = nn.Parameter(tensors["router.num"].detach().clone().float())
        self.den = nn.Parameter(tensors["router.den"].detach().clone().float())
        self.weight = nn.Parameter(tensors["router.weight"].detach().clone().float())
        self.bias = nn.Parameter(tensors["router.bias"].detach().clone().float())
        self.n_experts = self.weight.shape[0]
        self.k = top_k if 0 < top_k < self.n_experts else self.n_experts
        self.pooling = pooling
        self.gates: torch.Tensor | None = None  # (B, E) or (1, E), the cached routing
        self.active: list[bool] = []  # expert e is computed iff some row has a nonzero gate
        self.probs: torch.Tensor | None = None  # (B, E) of the last routing, for the balancing loss
        self.routed: torch.Tensor | None = None  # (B, E) 0/1 top-k membership of the last routing
        self.prompt_states: torch.Tensor | None = None  # (B, P, d), kept in per_step mode only
        self.skip_inactive = True  # False: compute every expert (gate 0 or not), never read the gates on the host

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, T, d) float32, mask (B, T) bool (the prompt's real tokens) -> (B, d)."""
        if self.pooling == "attention":
            scores = (h @ self.query) / math.sqrt(h.shape[-1])  # (B, T)
            w = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, T)
            return torch.einsum("bt,btd->bd", w, h)  # (B, d)
        if self.pooling == "mean":
            m = mask.to(h.dtype)  # (B, T)
            return torch.einsum("bt,btd->bd", m, h) / m.sum(1, keepdim=True).clamp_min(1)  # (B, d)
        pos = torch.arange(mask.shape[1], device=mask.device)  # last real token (left or right padding)
        last = (mask.long() * (pos + 1)).argmax(dim=1)  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]  # (B, d)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        a0, a1, a2, a3 = self.num
        b1, b2 = self.den
        return (a0 + x * (a1 + x * (a2 + x * a3))) / (1 + (x * (b1 + x * b2)).abs())

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Router probabilities (B, E) for prompt hidden states h (B, T, d) and mask (B, T)."""
        p = self.pool(h.float(), mask)  # (B, d)
        z = p * torch.rsqrt(p.square().mean(-1, keepdim=True) + 1e-6)  # (B, d)
        logits = nn.functional.linear(self.activation(z), self.weight, self.bias)  # (B, E)
        return torch.softmax(logits, dim=-1)

    def route(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        probs = self(h, mask)  # (B, E)
        if self.k < self.n_experts:
            top = probs.topk(self.k, dim=-1).indices  # (B, k)
            routed = torch.zeros_like(probs).scatter(-1, top, 1.0)  # (B, E)
        else:
            routed = torch.ones_like(probs)
        self.set_gates(probs * routed, probs, routed)

    def set_gates(self, gates: torch.Tensor, probs=None, routed=None) -> None:
        self.gates, self.probs, self.routed = gates, probs, routed
        if self.skip_inactive:  # one host sync per routing (once per prompt when cached)
            self.active = (gates.detach() != 0).any(0).tolist()
        else:
            self.active = [True] * self.n_experts

    def factors(self) -> dict[str, torch.Tensor]:
        return {f"router.{n}": p.detach() for n, p in self.named_parameters()}


class ExpertLinear(LoRALinear):
    """y = base(x) + g_e · s · B(A x), g_e the block router's cached gate of this expert."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool = False):
        super().__init__(base, a, b, scale, transposed)
        self.expert = -1
        object.__setattr__(self, "_router", None)  # a reference, not a submodule (it lives on the block)

    def bind(self, router: Router, expert: int) -> None:
        object.__setattr__(self, "_router", router)
        self.expert = expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        r = self._router
        if r is None or r.gates is None:
            raise UsageError("a moe expert ran before its block's router: call the whole model (its forward routes the "
                             "prompt), or pin gates with model.surgeon_routing.fix(...).")
        if not r.active[self.expert]:
            return y  # inactive for every row: skipped
        g = r.gates[:, self.expert]  # (B,) or (1,)
        if g.shape[0] not in (1, x.shape[0]):
            raise UsageError(f"cached gates are for a batch of {g.shape[0]} prompts, this step has {x.shape[0]} rows; "
                             "start a new prompt (a forward without KV cache) for a new batch.")
        u = nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A)  # (B, T, r)
        u = u * g.to(u.dtype).view(-1, *([1] * (u.dim() - 1)))  # gate on the rank-r side: cheaper than on (B, T, out)
        z = nn.functional.linear(u, self.lora_B)  # (B, T, out)
        return y + (self.scale * z).to(y.dtype)


class Routing:
    """The per-model state machine that decides when routers run (see the module docstring)."""

    def __init__(self, model: nn.Module, routers: dict[str, Router]):
        self.routers = routers
        self.mode = "cached"  # or "per_step"
        self.prompt_mask: torch.Tensor | None = None  # optional (B, T) bool: which positions are the prompt (training)
        self.fixed = False
        self.in_generate = False
        self.session: dict | None = None  # {"mask": (B, P) bool} of the current prompt
        self.phase = "prompt"
        self.cache_len = 0
        self.handles = [model.register_forward_pre_hook(self._model_hook, with_kwargs=True)]
        for name, router in routers.items():
            block = model.get_submodule(name)
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._block_hook, router), with_kwargs=True))
        original = getattr(model, "generate", None)  # an encoder (BERT) has none: every forward is a prompt
        if original is None:
            return

        @functools.wraps(original)
        def generate(*args, **kwargs):
            self.in_generate, self.session = True, None  # a new prompt: gates are routed on its first forward
            try:
                return original(*args, **kwargs)
            finally:
                self.in_generate, self.session = False, None

        model.generate = generate

    def fix(self, gates: dict[str, torch.Tensor | list[float]]) -> None:
        """Pin per-block gates, (E,) for every row or (B, E) per row, for every later forward, until `unfix()`."""
        for name, router in self.routers.items():
            if name not in gates:
                raise UsageError(f"fixed gates lack block {name}.")
            g = torch.as_tensor(gates[name], dtype=torch.float32, device=router.weight.device)
            if g.shape[-1] != router.n_experts or g.dim() > 2:
                raise UsageError(f"block {name} has {router.n_experts} experts, got gates of shape {list(g.shape)}.")
            g = g.reshape(-1, router.n_experts)  # (1, E) or (B, E)
            router.set_gates(g)
        self.fixed = True

    def unfix(self) -> None:
        self.fixed = False
        for r in self.routers.values():
            r.gates = None

    def _model_hook(self, module, args, kwargs):
        if self.fixed:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache_len = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        new_prompt = self.session is None if self.in_generate else self.cache_len == 0
        if not new_prompt:
            self.phase = "decode"
            return
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs["inputs_embeds"]
        am = kwargs.get("attention_mask")
        if self.prompt_mask is not None:
            mask = self.prompt_mask.bool()
        elif am is not None and am.dim() == 2:
            mask = am.bool()
        else:
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
        self.session = {"mask": mask.to(x.device)}
        self.phase = "prompt"

    def _block_hook(self, router: Router, module, args, kwargs):
        if self.fixed:
            return
        h = args[0] if args else kwargs["hidden_states"]  # (B, T, d) entering the block
        mask = self.session["mask"] if self.session else None
        if self.phase == "prompt":
            router.route(h[:, : mask.shape[1]], mask)
            router.prompt_states = h[:, : mask.shape[1]].detach() if self.mode == "per_step" else None
        elif self.mode == "per_step":  # the baseline: route again at every step, from the prompt
            states = h[:, : mask.shape[1]] if self.cache_len == 0 else router.prompt_states
            router.route(states, mask)
        elif router.gates is None:
            raise UsageError("a decoding step came before any prompt: run the prompt through the model first.")


def load_balancing_loss(routers) -> torch.Tensor | None:
    """λ · mean over blocks of E · Σ_e f_e · P_e (Switch), from each router's last routing."""
    terms = []
    for r in routers:
        if r.probs is None:
            continue
        f = r.routed.float().mean(0)  # (E,) fraction of prompts routed to each expert
        p = r.probs.mean(0)  # (E,) mean router probability
        terms.append(r.n_experts * (f * p).sum())
    return LB_WEIGHT * torch.stack(terms).mean() if terms else None
