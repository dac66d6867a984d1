"""The training loss without the full logits: Σ cross-entropy over the labelled positions only.

    impl = resolve("auto", device)             # "chunked": the torch loss below, on CUDA and the CPU
    with HeadCapture(model) as cap:            # the output head is swapped out: no (b, L, V) logits
        model(input_ids=x, position_ids=p, use_cache=False)
        ce_sum = cap.ce_sum(labels, loss)      # (,) float32, Σ over positions whose next token has a label

How: the model's own forward runs with its output head (lm_head, tied or not) replaced by a stand-in
that keeps the final hidden states H (b, L, d) and returns an empty (b, L, 0) tensor, so the model's
hooks (moe's routers) and every post-processing of the logits see a normal call. Then
  * the positions whose shifted label is not IGNORE are gathered first: h = H[mask] (n, d);
  * z = s·h Wᵀ + b, optionally z ← c·tanh(z / c), and Σ (logsumexp(z) − z[target]) is computed
    by one of: "chunked" (this file: rows in chunks of ≈128 MiB of float32 logits, the gradient
    with respect to h is formed chunk by chunk in the forward pass, as liger does, so no chunk is
    kept; with compile, each chunk's softmax and gradient run as one compiled function,
    compiled_chunk), "liger" (liger-kernel's LigerFusedLinearCrossEntropyLoss, Triton, CUDA), "cce"
    (cut-cross-entropy's linear_cross_entropy, Triton, CUDA), or "full" (the model's real head and
    F.cross_entropy on all logits: the reference, and the only choice for a head that is unknown).
    s (Cohere's logit_scale, 1/Granite's logits_scaling) and c (Gemma 2/3's
    final_logit_softcapping) come from the config.
`HeadCapture.verify` checks once, on a few tokens, that W, b, s and c reproduce the model's own
logits; an architecture whose head does anything else is refused with a one-line error (`--loss full`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import UsageError

IGNORE = -100
CHUNK_BYTES = 128 * 2**20  # float32 logits per chunk of the torch loss
LOSSES = ("auto", "chunked", "liger", "cce", "full")


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """(b, L) → (b, L): position j's target is labels[j+1]; the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: Σ cross-entropy from full logits (b, L, V), as transformers' ForCausalLMLoss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted_labels(labels).flatten(), ignore_index=IGNORE, reduction="sum")


def chunk_loss_grad(hc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tc: torch.Tensor, softcap: float | None):
    """One chunk under a frozen head: (Σ CE, ∂/∂hc (c, d)). Written for torch.compile to fuse (the
    one-hot as a comparison, nothing in place): after the matmul the chunk's logits are read about
    twice instead of about eight times (compiled_chunk)."""
    z = F.linear(hc, w).float()  # (c, V)
    if b is not None:
        z = z + b.float()
    th = None
    if softcap:
        th = torch.tanh(z / softcap)  # (c, V)
        z = th * softcap
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    loss = (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
    hot = torch.arange(z.shape[1], device=z.device)[None, :] == tc[:, None]  # (c, V)
    g = torch.exp(z - lse[:, None]) - hot.float()  # ∂/∂z of the summed loss
    if th is not None:
        g = g * (1.0 - th * th)
    return loss, (g.to(w.dtype) @ w).to(hc.dtype)


def compiled_chunk(backend: str = "inductor"):
    """chunk_loss_grad through torch.compile (the rows become dynamic at the first other chunk size: two graphs)."""
    return torch.compile(chunk_loss_grad, backend=backend)


class _ChunkedCE(torch.autograd.Function):
    """Σ_i [logsumexp(z_i) − z_i[t_i]], z = softcap(h Wᵀ + b), in row chunks; gradients formed in
    the forward pass chunk by chunk (the logits of one chunk at a time, never all of them)."""

    @staticmethod
    def forward(ctx, h, w, b, t, softcap: float | None, chunk: int, fused=None):  # h (n, d), w (V, d), b (V,) | None, t (n,)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if fused is not None and need_h and not (need_w or need_b):  # the usual case: a frozen head
            gh, gw, gb = torch.empty_like(h), None, None  # (n, d)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, h.shape[0], chunk):
                loss, gh[i : i + chunk] = fused(h[i : i + chunk], w, b, t[i : i + chunk], softcap)
                total += loss
        else:
            total, gh, gw, gb = _chunks(h, w, b, t, softcap, chunk, need_h, need_w, need_b)
        ctx.save_for_backward(*(x for x in (gh, gw, gb) if x is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        return total

    @staticmethod
    def backward(ctx, go):
        saved = iter(ctx.saved_tensors)
        out = [next(saved) * go if have else None for have in ctx.have]
        out = [None if g is None else g.to(dt) for g, dt in zip(out, ctx.dtypes)]
        return (*out, None, None, None, None)


def _chunks(h, w, b, t, softcap, chunk, need_h, need_w, need_b):
    """The eager loop: Σ CE and the gradients asked for, in place on each chunk's logits."""
    gh = torch.empty_like(h) if need_h else None  # (n, d)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # (V, d)
    gb = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None  # (V,)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(0, h.shape[0], chunk):
        hc, tc = h[i : i + chunk], t[i : i + chunk]  # (c, d), (c,)
        z = F.linear(hc, w).float()  # (c, V)
        if b is not None:
            z += b.float()
        th = None
        if softcap:
            th = torch.tanh(z / softcap)  # (c, V)
            z = th * softcap
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        total += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
        if not (need_h or need_w or need_b):
            continue
        g = z.sub_(lse[:, None]).exp_()  # (c, V) softmax, in place of z
        g[torch.arange(len(tc), device=g.device), tc] -= 1.0  # ∂/∂z of the summed loss
        if th is not None:
            g *= 1.0 - th.square()
        if need_h:
            gh[i : i + chunk] = (g.to(w.dtype) @ w).to(h.dtype)  # (c, d)
        if need_w:
            gw += g.T @ hc.float()  # (V, d)
        if need_b:
            gb += g.sum(0)
    return total, gh, gw, gb


def chunked_ce_sum(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor, softcap: float | None = None,
                   chunk: int | None = None, fused=None) -> torch.Tensor:
    """Σ cross-entropy of rows h (n, d) against targets t (n,) under the head (w (V, d), b (V,));
    fused: compiled_chunk()'s function, used when only h needs a gradient."""
    chunk = chunk or max(1, CHUNK_BYTES // (4 * w.shape[0]))
    return _ChunkedCE.apply(h, w, b, t, softcap, chunk, fused)


def _liger(h, w, b, t, softcap):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", softcap=softcap)(w, h, t, b)


def _cce(h, w, b, t, softcap):
    from cut_cross_entropy import linear_cross_entropy

    if b is not None:
        raise UsageError("cut-cross-entropy has no output-head bias; use --loss liger or --loss chunked for this model.")
    return linear_cross_entropy(h, w.to(h.dtype), t, ignore_index=IGNORE, softcap=softcap, reduction="sum")


_IMPL = {"chunked": chunked_ce_sum, "liger": _liger, "cce": _cce}
_MODULE = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def available(name: str) -> bool:
    return name not in _MODULE or importlib.util.find_spec(_MODULE[name]) is not None


def resolve(name: str, device: torch.device) -> str:
    """The loss implementation for --loss NAME on DEVICE ("auto": the fastest one installed)."""
    if name not in LOSSES:
        raise UsageError(f"--loss {name!r}: choose one of {', '.join(LOSSES)}.")
    if name == "auto":  # measured fastest on an H100 against liger's fused loss (bench/RESULTS.md)
        return "chunked"
    if name in _MODULE and device.type != "cuda":
        raise UsageError(f"--loss {name} runs Triton kernels on CUDA only; on {device.type} use --loss chunked (the default there).")
    if not available(name):
        raise UsageError(f"--loss {name} needs the {_MODULE[name]} package: pip install 'surgeon-train[fast]'.")
    return name


@dataclass
class Head:
    """The output head as a function of the final hidden states: z = softcap(scale · h Wᵀ + b)."""

    name: str  # dotted module name of the head inside the model
    weight: torch.Tensor  # (V, d), the embedding matrix when tied
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> Head:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if get is not None else None
        if not isinstance(head, nn.Linear):
            raise UsageError(f"{type(model).__name__} has no linear output head (get_output_embeddings() is "
                             f"{type(head).__name__}); surgeon train's fused loss needs one: pass --loss full.")
        name = next(n for n, m in model.named_modules() if m is head)
        conf = getattr(model, "config", None)
        conf = getattr(conf, "get_text_config", lambda: conf)() if conf is not None else None
        scale = float(getattr(conf, "logit_scale", None) or 1.0)  # Cohere: logits · logit_scale
        scale /= float(getattr(conf, "logits_scaling", None) or 1.0)  # Granite: logits / logits_scaling
        softcap = getattr(conf, "final_logit_softcapping", None) or None  # Gemma 2/3
        return cls(name, head.weight, head.bias, scale, softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(h * self.scale if self.scale != 1.0 else h, self.weight, self.bias)
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z


class _Keep(nn.Module):
    """Stands in for the output head: keeps its input, returns an empty (…, 0) tensor."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.hidden = h
        return h[..., :0]


class HeadCapture:
    """Within `with`, the model's output head is replaced by _Keep; `ce_sum` computes the loss."""

    def __init__(self, model: nn.Module, head: Head | None = None):
        self.model, self.head = model, head or Head.of(model)
        parent, _, self.child = self.head.name.rpartition(".")
        self.parent = model.get_submodule(parent) if parent else model
        self.original = getattr(self.parent, self.child)
        self.keep = _Keep()
        self.fused = None  # compiled_chunk()'s function for the chunked loss (speed: --compile)

    def __enter__(self) -> HeadCapture:
        setattr(self.parent, self.child, self.keep)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.parent, self.child, self.original)
        self.keep.hidden = None

    def ce_sum(self, labels: torch.Tensor, impl: str) -> torch.Tensor:
        """Σ cross-entropy of the last forward's positions whose next token has a label."""
        h, self.keep.hidden = self.keep.hidden, None  # (b, L, d)
        if h is None:
            raise RuntimeError("the model never called its output head")
        tgt = shifted_labels(labels)  # (b, L)
        mask = tgt != IGNORE
        hs, ts = h[mask], tgt[mask]  # (n, d), (n,): the labelled positions only
        if hs.shape[0] == 0:  # nothing labelled in these rows: a zero that still reaches the graph
            return h.sum().float() * 0.0
        if self.head.scale != 1.0:
            hs = hs * self.head.scale
        kw = {"fused": self.fused} if impl == "chunked" and self.fused is not None else {}
        return _IMPL[impl](hs, self.head.weight, self.head.bias, ts, self.head.softcap, **kw).float()

    @torch.no_grad()
    def verify(self, ids: torch.Tensor, autocast) -> None:
        """The head as understood here reproduces the model's own logits on `ids` (1, k)."""
        was = self.model.training
        self.model.eval()
        try:
            with autocast:
                ref = self.model(input_ids=ids, use_cache=False).logits.float()  # (1, k, V)
                with self:
                    self.model(input_ids=ids, use_cache=False)
                    ours = self.head.logits(self.keep.hidden).float()
        finally:
            self.model.train(was)
        exact = self.head.weight.dtype == torch.float32 and ids.device.type == "cpu"  # no bf16 autocast
        tol = 1e-4 if exact else 3e-2
        if ref.shape != ours.shape or not torch.allclose(ours, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol):
            raise UsageError(f"{type(self.model).__name__} post-processes its logits in a way surgeon train does not know, so "
                             "its loss cannot be computed without them: pass --loss full (it materialises the logits).")
