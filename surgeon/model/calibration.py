"""Input covariances of every targeted linear on calibration text, the model run one block at a time.

    data = load_calibration_data("default", model_dir)
    cov = BlockCovariances(model_dir, ckpt, {t.module: t.tensor for t in targets}, data, torch.device("cuda"))
    for block in cov.blocks():
        for m in block:
            C = cov.covariance(m)          # (in, in) float64: sum over calibration tokens of x x^T
            ...; cov.release(m)

The calibration tokens enter block 0 as transformers' own forward delivers them (surgeon.model.blockrun:
the catcher scheme of GPTQ / AWQ / llm-compressor); each block is then materialised from the checkpoint,
every batch runs through it with a forward pre-hook on each targeted linear that adds XᵀX (float64,
padding excluded) of its input, and the block's outputs become the next block's inputs. Linears that read
the same tensor object in a block (q/k/v; gate/up) share one accumulator: collected once, and
`covariance` hands every one of them the same tensor.

Memory: the device holds the calibration hidden states, one block and the covariances not yet released;
the host one block's tensors. Blocks are computed lazily, in order, up to the one the caller asks for.

Fused MoE experts (one 3-D parameter per MoE layer, transformers 5) have no module per expert: their
inputs are seen in transformers' eager experts forward, one F.linear per routed expert
(surgeon.model.calibhooks.ExpertInputs), so each expert's covariance sums over the tokens routed to it.
Models with fused experts are calibrated in padding-free batches (routed rows carry no token position).

Not collected (listed in `skipped`, the caller falls back to uncalibrated): targets outside the decoder
blocks (lm_head, vision tower, projectors: text calibration runs the language model's blocks only),
modules without a 2-D weight, and fused experts whose forward calls no per-expert F.linear.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError, UsageError
from surgeon.model.blockrun import BlockRunner, call_block, failing
from surgeon.model.calibdata import CalibrationData, load_calibration_data  # noqa: F401  (one import place for callers)
from surgeon.model.calibhooks import Collector, ExpertInputs

OUTSIDE = "outside the decoder blocks (calibration runs the text through the language model's blocks only)"
FUSED = "fused MoE expert parameter whose forward calls no per-expert F.linear: its inputs are not collected; uncalibrated"
NOT_LINEAR = "not a module with a 2-D weight that a forward hook can watch"


def make_batches(data: CalibrationData, batch_tokens: int, pad: bool = True) -> list[dict]:
    """The samples, longest first (a stable sort: little padding, a fixed order), as right-padded batches
    of at most `batch_tokens` (padded) tokens each (a longer sample alone); {"input_ids",
    "attention_mask"} (B, T) int64. Without `pad`, only samples of one length share a batch."""
    batches, cur = [], []

    def close() -> None:
        if cur:
            t = max(len(s) for s in cur)
            ids = torch.zeros(len(cur), t, dtype=torch.long)
            mask = torch.zeros(len(cur), t, dtype=torch.long)
            for j, s in enumerate(cur):
                ids[j, : len(s)], mask[j, : len(s)] = s, 1
            batches.append({"input_ids": ids, "attention_mask": mask})
            cur.clear()

    for s in sorted(data.input_ids, key=len, reverse=True):
        longest = len(cur[0]) if cur else len(s)
        if cur and ((len(cur) + 1) * longest > batch_tokens or (not pad and len(s) != longest)):
            close()
        cur.append(s)
    close()
    return batches


class BlockCovariances:
    """Input covariance (sum of x xᵀ over the calibration tokens, float64 on `device`) of every targeted
    linear, computed block by block in order as they are asked for. `peft`: PEFT's CorDA covariance
    instead (preprocess_corda's hook: one record per forward, its input divided by |max(input)|, the
    sum divided by the number of records); `tokens` stays the token count.

    Fused MoE experts (targets "<param>.<expert>.<part>") get the covariance of the tokens routed to
    that expert (gate and up parts share one tensor; an expert no token reached: zeros, 0 tokens);
    when the experts' forward cannot be watched (no per-expert F.linear), they join `skipped` as their
    block runs: `available(module)` tells."""

    def __init__(self, model_dir: Path | dict, ckpt, targets: dict[str, str], data: CalibrationData,
                 device: torch.device, batch_tokens: int = 4096, peft: bool = False):
        config = model_dir if isinstance(model_dir, dict) else json.loads((Path(model_dir) / "config.json").read_text())
        self.device = torch.device(device)
        self.run = BlockRunner(config, ckpt, self.device)
        self.skipped: dict[str, str] = {}
        self._by_block: dict[int, list[str]] = {}
        self._experts: dict[str, tuple[str, int]] = {}  # fused target -> (parameter, expert)
        for module in targets:
            i, why = self._place(module)
            if why:
                self.skipped[module] = why
            else:
                self._by_block.setdefault(i, []).append(module)
        if self._experts:  # per-expert F.linear calls, padding-free batches (routed rows cannot be told apart)
            self.run.eager_experts()
        self._block_of = {m: i for i, ms in self._by_block.items() for m in ms}
        self.data, self.peft = data, peft
        self._batches = make_batches(data, 1 if peft else batch_tokens, pad=not self._experts)
        self._masks = [b["attention_mask"].bool().to(self.device) for b in self._batches]
        self._next = 0  # the next block to run
        self._hidden: list[torch.Tensor] | None = None
        self._kwargs: list[list[dict]] | None = None
        self._cov: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}

    def _place(self, module: str) -> tuple[int, str]:
        """(block index, "") of a watchable target, else (-1, why it is skipped)."""
        head = self.run.prefix + "."
        if not module.startswith(head) or not module[len(head):].split(".", 1)[0].isdigit():
            return -1, OUTSIDE
        i = int(module[len(head):].split(".", 1)[0])
        try:
            mod = self.run.model.get_submodule(module)
        except AttributeError:
            param, expert, _ = (module.rsplit(".", 2) + ["", ""])[:3]
            if not any(p.fused for p in self.run.places.get(param, [])) or not expert.isdigit():
                return -1, NOT_LINEAR
            self._experts[module] = (param, int(expert))
            return i, ""
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            return -1, NOT_LINEAR
        return i, ""

    def blocks(self) -> list[list[str]]:
        """The targets meant to get a covariance, grouped by block, in block order."""
        return [self._by_block[i] for i in sorted(self._by_block)]

    def available(self, module: str) -> bool:
        """Whether `module` has a covariance (runs the blocks up to its own)."""
        if module in self._block_of and module not in self.skipped:
            self._run_upto(self._block_of[module])
        return module in self._cov

    def covariance(self, module: str) -> torch.Tensor:
        """(in, in) float64 on the device: the sum of x xᵀ over the tokens that reached `module`."""
        self._upto(module)
        return self._cov[module]

    def tokens(self, module: str) -> int:
        self._upto(module)
        return self._tokens[module]

    def release(self, module: str) -> None:
        """Drop `module`'s covariance (the tensor is freed once every linear sharing it is released)."""
        self._cov.pop(module, None)

    def _upto(self, module: str) -> None:
        if module in self._block_of:
            self._run_upto(self._block_of[module])
        if module in self.skipped:
            raise UsageError(f"{module} has no calibration covariance: {self.skipped[module]}.")
        if module not in self._block_of:
            raise UsageError(f"{module} is not a calibration target.")
        if module not in self._cov:
            raise SurgeonError(f"calibration: the covariance of {module} was released; ask in blocks() order.")

    def _run_upto(self, i: int) -> None:
        while self._next <= i:
            self._step()

    def _step(self) -> None:
        """Run block `_next` over every batch, collecting its targets' covariances."""
        i = self._next
        if self._hidden is None:
            self._hidden, self._kwargs = self.run.capture(self._batches)
            if self.run.changes_between_blocks:  # each block would be fed the states before that change: wrong covariances
                raise UsageError(f"--calibrate runs the blocks one at a time, and {type(self.run.model).__name__} changes the hidden "
                                 "states between its blocks; split without --calibrate.")
        mine = self._by_block.get(i, [])
        coll = Collector(self.device, self.peft)
        with self.run.block(i) as block:
            outs, watch = self._run_block(i, block, coll, mine)
        coll.finish()
        self._kwargs[i] = []
        self._hidden = outs if i < max(self._by_block) else []
        for m in mine:
            self._collect(m, coll, watch)
        if self.device.type == "cuda":  # the sums are queued on this stream; the solve threads read them on theirs
            torch.cuda.current_stream(self.device).synchronize()
        self._next = i + 1

    def _run_block(self, i: int, block: nn.Module, coll: Collector, mine: list[str]):
        """Every batch through the block with the hooks on: (outputs, the expert watcher or None)."""
        rel = len(self.run.block_name(i)) + 1
        handles = [block.get_submodule(m[rel:]).register_forward_pre_hook(coll.hook(m), with_kwargs=True)
                   for m in mine if m not in self._experts]
        fused = {self._experts[m][0] for m in mine if m in self._experts}
        watch = ExpertInputs({p: block.get_parameter(p[rel:]) for p in fused}, coll.add) if fused else None
        outs = []
        try:
            with torch.no_grad(), (watch or contextlib.nullcontext()), failing(self.run.model, f"in block {i}"):
                for x, kw, mask in zip(self._hidden, self._kwargs[i], self._masks):
                    coll.begin(mask)
                    outs.append(call_block(block, x, kw))
                    coll.end()
        finally:
            for h in handles:
                h.remove()
        return outs, watch

    def _collect(self, m: str, coll: Collector, watch) -> None:
        """m's covariance (the shared accumulator) and token count from the block's collector."""
        if m in self._experts:
            param, expert = self._experts[m]
            if param not in watch.seen:
                self.skipped[m] = FUSED
                return
            key = f"{param}.{expert}"
            if key not in coll.leader:  # no token was routed to this expert
                n = self.run.model.get_parameter(param).shape[-1]
                coll.acc[key], coll.count[key], coll.leader[key] = torch.zeros(n, n, dtype=torch.float64, device=self.device), 0, key
            lead = coll.leader[key]
        else:
            lead = coll.leader.get(m)
            if lead is None:
                raise SurgeonError(f"calibration: {m} was never called in the forward of its block; split without --calibrate.")
        self._cov[m], self._tokens[m] = coll.acc[lead], coll.count[lead]
