"""One optimizer step's forward and backward passes: micro-batches, the loss, out-of-memory recovery.

    runner = Runner(model, sm.extra_loss, data, d, loss="auto", document_mask=True)
    runner.fit(rows_per_step, checkpointing=None)     # memory.plan: micro-batch, checkpointing
    acc = runner.step(my_rows, n_tok)                  # gradients accumulated into the parameters

The loss of a micro-batch is Σ cross-entropy / n_tok, n_tok the loss-carrying tokens of the whole
step (all micro-batches, all ranks), so splitting a step differently changes only rounding. The
method's extra loss is added once per micro-batch with weight 1/(micro-batches · ranks): its mean.
An out-of-memory error inside a step (CUDA; on the CPU only an allocation that fails outright)
discards the step's gradients, halves the micro-batch (at 1: turns checkpointing on) and runs it again.
"""

from __future__ import annotations

import gc
import sys

import torch

from surgeon.errors import UsageError
from surgeon_train import dist, memory
from surgeon_train.data import Packed
from surgeon_train import speed
from surgeon_train.loss import CHUNK_BYTES, HeadCapture, compiled_chunk, resolve, token_ce_sum
from surgeon_train.speed import blocks


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def packing_supported(model: torch.nn.Module) -> bool:
    """transformers turns restarting position ids into a block-diagonal mask for this model: its
    modeling module builds masks with masking_utils.create_causal_mask, which detects packing."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return False
    if not hasattr(mu, "find_packed_sequence_indices"):
        return False
    names = {type(m).__module__ for m in model.modules()}
    return any(getattr(sys.modules.get(n), "create_causal_mask", None) is mu.create_causal_mask for n in names)


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    if not on:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{type(model).__name__} does not support gradient checkpointing; drop --grad-checkpointing.")
    kw = {"use_reentrant": False}  # the frozen embeddings give the first block no input grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


class Runner:
    def __init__(self, model, extra_loss, data: Packed, d: dist.Dist, loss: str = "auto", document_mask: bool = True):
        self.model, self.extra_loss, self.data, self.d = model, extra_loss, data, d
        self.loss = resolve(loss, d.device)
        self.capture = None if self.loss == "full" else HeadCapture(model)
        if self.capture is not None:
            self.capture.verify(data.input_ids[:1, : min(16, data.seq_len)].to(d.device), autocast(d.device))
        self.document_mask = bool(document_mask and data.position_ids is not None and packing_supported(model))
        self.micro, self.checkpointing, self.plan, self.events = 1, False, None, []
        self.compiled = False

    def ce_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Σ cross-entropy of `rows` (indices into the data), with the graph for backward."""
        return forward_ce(self.model, self.capture, self.loss, self.data, rows, self.d.device, self.document_mask)

    # --- the plan -------------------------------------------------------------------------------
    def fit(self, rows: int, checkpointing: bool | None, micro: int | None = None) -> memory.Plan:
        """Choose the micro-batch (and checkpointing) for `rows` rows per step on this rank."""
        if micro is not None:
            self.plan = memory.Plan(min(micro, rows), bool(checkpointing), 0, 0, "--micro-batch")
        else:
            row = memory.saved_bytes(self.model, lambda: self.ce_sum(torch.tensor([0])))
            self._free()
            self.plan = memory.plan(rows, row, self._ckpt_row(row), self._workspace(), memory.available_bytes(self.d.device),
                                    self.d.device, checkpointing, self.data.seq_len)
        self.plan.micro_batch = dist.min_int(self.plan.micro_batch, self.d)  # every rank runs the same split
        self.micro, self.checkpointing = self.plan.micro_batch, self.plan.checkpointing
        set_checkpointing(self.model, self.checkpointing)
        return self.plan

    def _ckpt_row(self, row: int) -> int:
        """Per row under checkpointing: every block's input kept, one block's activations recomputed."""
        n = max(1, len(blocks(self.model)))
        width = self.capture.head.weight.shape[1] if self.capture else getattr(self.model.config, "hidden_size", 0)
        elem = 2 if self.d.device.type == "cuda" else next(self.model.parameters()).element_size()
        return int(2 * row / n + n * self.data.seq_len * width * elem)

    def _workspace(self) -> int:
        return 3 * CHUNK_BYTES if self.loss in ("chunked", "full") else 512 * 2**20

    # --- the step -------------------------------------------------------------------------------
    def compile(self, backend: str, loss_too: bool) -> None:
        """torch.compile the blocks (and the chunked loss's chunk when loss_too); a compile error in a
        step turns it off again and redoes the step eagerly (step)."""
        speed.compile_blocks(self.model, backend)
        if loss_too and self.capture is not None and self.loss == "chunked":
            self.capture.fused = compiled_chunk(backend)
        self.compiled = True

    def step(self, rows: torch.Tensor, n_tok: int, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Forward + backward over this rank's rows of one step; returns [Σ ce, Σ extra-loss share]."""
        while True:
            try:
                return self._step(rows, n_tok)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
                fix = self._eager if self.compiled and speed.is_compile_error(e) else self._shrink if memory.is_oom(e) else None
                if fix is None:
                    raise
                what = " ".join(lines[: 2 if fix == self._eager else 1])[:300]  # a backend's error: "backend='x' raised:" + its line
            for p in params:
                p.grad = None
            self._free()
            fix(what)

    def _eager(self, what: str) -> None:
        """torch.compile failed on this model: the run goes on without it (the step is redone)."""
        speed.uncompile_blocks(self.model)
        if self.capture is not None:
            self.capture.fused = None
        self.compiled = False
        self.events.append({"event": "compile_failed", "error": what, "compile": False})

    def _step(self, rows: torch.Tensor, n_tok: int) -> torch.Tensor:
        parts = memory.micro_batches(rows, self.micro)
        acc = torch.zeros(2, device=self.d.device)
        for part in parts:
            ce = self.ce_sum(part)
            loss = ce / n_tok
            extra = self.extra_loss()
            if extra is not None:
                share = extra / (len(parts) * self.d.world)
                loss = loss + share
                acc[1] += share.detach().float()
            loss.backward()
            acc[0] += ce.detach()
            del loss, ce
        return acc

    def _shrink(self, what: str) -> None:
        if self.micro > 1:
            self.micro = (self.micro + 1) // 2
        elif not self.checkpointing and getattr(self.model, "supports_gradient_checkpointing", False):
            self.checkpointing = True
            set_checkpointing(self.model, True)
        else:
            raise memory.TrainMemoryError(f"out of memory with one row per micro-batch and checkpointing on ({what}); "
                                          "lower --seq-len or free memory on the device.")
        self.events.append({"event": "out_of_memory", "error": what, "micro_batch": self.micro, "grad_checkpointing": self.checkpointing})

    def _free(self) -> None:
        gc.collect()
        if self.d.device.type == "cuda":
            torch.cuda.empty_cache()


def forward_ce(model, capture: HeadCapture | None, loss: str, data: Packed, rows: torch.Tensor, device: torch.device,
               document_mask: bool) -> torch.Tensor:
    x = data.input_ids[rows].to(device, non_blocking=True)  # (b, L)
    y = data.labels[rows].to(device, non_blocking=True)  # (b, L)
    kw = {"input_ids": x, "use_cache": False}
    if document_mask:
        kw["position_ids"] = data.position_ids[rows].to(device, non_blocking=True)  # (b, L), restarting per example
    with autocast(device):
        if capture is None:
            return token_ce_sum(model(**kw).logits, y)
        with capture:
            model(**kw)
            return capture.ce_sum(y, loss)
