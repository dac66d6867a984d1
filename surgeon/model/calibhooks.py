"""The hooks of a calibration run: XᵀX of every watched input, shared inputs collected once.

Collector: forward pre-hooks on the targeted linears of a block (and `add` for fused experts); inputs
that are the very same tensor object within one batch (q/k/v read one normed hidden state, gate/up
another) go to the first watcher's accumulator, and the others are recorded as sharing it.

ExpertInputs: fused MoE experts (transformers 5 stores an MoE layer's experts as one 3-D parameter,
(E, out, in)) have no module per expert to hook; their eager forward calls F.linear(x, param[e]) per
routed expert. This TorchFunctionMode sees those calls and hands x to the collector under
"<param>.<e>", the expert read from the weight's offset in the parameter's storage. The model runs
with transformers' "eager" experts implementation for that (grouped_mm batches all experts in one call).

    python -m pytest -q tests/test_calibration_collect.py
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from surgeon.errors import SurgeonError


class Collector:
    """Forward pre-hooks adding XᵀX of each watched module's input; modules whose hooks see the very
    same input tensor within one batch share the first one's accumulator."""

    def __init__(self, device: torch.device, peft: bool = False):
        self.device, self.peft = device, peft
        self.acc: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.forwards: dict[str, int] = {}
        self.leader: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._mask: torch.Tensor | None = None

    def begin(self, mask: torch.Tensor) -> None:
        self._mask, self._seen = mask.bool(), []

    def end(self) -> None:
        self._seen = []

    def hook(self, name: str):
        """A forward pre-hook (with_kwargs) watching the module's input under `name`."""
        def pre(module, args, kwargs):
            self.add(name, args[0] if args else next(iter(kwargs.values())))
        return pre

    def add(self, name: str, x: torch.Tensor) -> None:
        """x (…, in) seen by `name`: accumulated, unless the same tensor went to another name this batch."""
        for t, lead in self._seen:
            if t is x:
                self.leader.setdefault(name, lead)
                return
        self._seen.append((x, name))
        self.leader.setdefault(name, name)
        if self.leader[name] == name:
            self._accumulate(name, x)

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        rows = self._rows(x)  # (n, in)
        rows = rows.to(self.device, torch.float64)
        if self.peft:  # PEFT's CorDA (tuners/lora/corda.py): each forward's input divided by |max(input)|
            rows = rows / rows.max().abs()
        if name not in self.acc:
            self.acc[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=self.device)
            self.count[name], self.forwards[name] = 0, 0
        upper_gram_(self.acc[name], rows)
        self.count[name] += rows.shape[0]
        self.forwards[name] += 1

    def finish(self) -> None:
        """The sums made whole (mirror_: upper_gram_ fills only the upper block triangle); PEFT's
        CorDA: divided by the number of forwards (one record each)."""
        for name, acc in self.acc.items():
            mirror_(acc)
            if self.peft:
                acc /= self.forwards[name]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        flat = x.reshape(-1, x.shape[-1])  # (B·T, in)
        if flat.shape[0] == mask.numel():
            return flat[mask.reshape(-1).to(flat.device)]
        if bool(mask.all()):
            return flat
        raise SurgeonError(f"calibration: a watched input of shape {tuple(x.shape)} does not line up with the batch's tokens {tuple(mask.shape)}.")



def _block(n: int) -> int:
    """Columns per block of upper_gram_: 8 blocks from n = 2048 (the work is (b+1)/2b of a GEMM's,
    56 %), 4 below (62 %); each product stays a large GEMM."""
    b = 8 if n >= 2048 else 4
    return max(1, -(-n // b))


def gram_share(n: int) -> float:
    """upper_gram_'s arithmetic as a share of the whole XᵀX product's, for width n."""
    b = -(-n // _block(n))  # blocks
    return (b + 1) / (2 * b)


def upper_gram_(acc: torch.Tensor, rows: torch.Tensor) -> None:
    """acc += rowsᵀ rows on the block rows' upper part only: for each block of B columns I,
    acc[I, I₀:] += rows[:, I]ᵀ rows[:, I₀:] (one GEMM per block, I₀ the block's first column). The
    float64 XᵀX of a calibration run is the bulk of its arithmetic (a 7B block: 3.4e8 flops a token
    against the forward's 1.3e9 in bf16); the lower part is redundant. `mirror_` completes it."""
    n = rows.shape[1]
    b = _block(n)
    for i in range(0, n, b):
        acc[i : i + b, i:].addmm_(rows[:, i : i + b].mT, rows[:, i:])  # (B, N) @ (N, n − i)


def mirror_(acc: torch.Tensor) -> None:
    """Copy the upper block triangle written by upper_gram_ onto the lower one, block by block
    (no n × n temporary: a 7B down_proj's is 0.97 GB); the result is exactly symmetric."""
    n = acc.shape[0]
    b = _block(n)
    for i in range(0, n, b):
        d = acc[i : i + b, i : i + b]  # (B, B) diagonal block: computed whole, keep its upper half
        d.copy_(d.triu() + d.triu(1).mT)
        acc[i + b :, i : i + b] = acc[i : i + b, i + b :].mT


class ExpertInputs(TorchFunctionMode):
    """F.linear calls whose weight is expert e's slice of one of `params` ({name: 3-D parameter}):
    `sink(f"{name}.{e}", x)` before the call."""

    def __init__(self, params: dict[str, torch.Tensor], sink):
        super().__init__()
        self.sink = sink
        self.params = [(n, p.untyped_storage().data_ptr(), p.storage_offset(), p.stride(0)) for n, p in params.items()]
        self.seen: set[str] = set()  # parameters whose experts were seen at least once

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            x = args[0] if args else kwargs.get("input")
            if isinstance(w, torch.Tensor) and w.ndim == 2:
                ptr = w.untyped_storage().data_ptr()
                for name, base, offset, stride in self.params:
                    if ptr == base:
                        self.seen.add(name)
                        self.sink(f"{name}.{(w.storage_offset() - offset) // stride}", x)
                        break
        return func(*args, **kwargs)
