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

Not collected (listed in `skipped`, the caller falls back to uncalibrated): targets outside the decoder
blocks (lm_head, vision tower, projectors: text calibration runs the language model's blocks only) and
fused MoE expert parameters (3-D, transformers 5), whose per-expert inputs no module hook sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from surgeon.errors import SurgeonError, UsageError
from surgeon.model.blockrun import BlockRunner, call_block
from surgeon.model.calibdata import CalibrationData, load_calibration_data  # noqa: F401  (one import place for callers)

OUTSIDE = "outside the decoder blocks (calibration runs the text through the language model's blocks only)"
FUSED = "fused MoE expert parameter: its per-expert inputs are not collected (no module hook sees them); uncalibrated"
NOT_LINEAR = "not a module with a 2-D weight that a forward hook can watch"


def make_batches(data: CalibrationData, batch_tokens: int, pad: bool = True) -> list[dict]:
    """The samples, in order, as right-padded batches of at most `batch_tokens` (padded) tokens each
    (a longer sample alone); {"input_ids", "attention_mask"} (B, T) int64. Without `pad`, only samples
    of one length share a batch."""
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

    for s in data.input_ids:
        longest = max([len(s), *(len(c) for c in cur)])
        if cur and ((len(cur) + 1) * longest > batch_tokens or (not pad and len(s) != len(cur[0]))):
            close()
        cur.append(s)
    close()
    return batches


class _Collector:
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
        def pre(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            for t, lead in self._seen:
                if t is x:
                    self.leader.setdefault(name, lead)
                    return
            self._seen.append((x, name))
            self.leader.setdefault(name, name)
            if self.leader[name] == name:
                self._add(name, x)
        return pre

    def _add(self, name: str, x: torch.Tensor) -> None:
        rows = self._rows(x)  # (n, in)
        rows = rows.to(self.device, torch.float64)
        if self.peft:  # PEFT's CorDA (tuners/lora/corda.py): each forward's input divided by |max(input)|
            rows = rows / rows.max().abs()
        if name not in self.acc:
            self.acc[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=self.device)
            self.count[name], self.forwards[name] = 0, 0
        self.acc[name].addmm_(rows.T, rows)  # (in, n) @ (n, in)
        self.count[name] += rows.shape[0]
        self.forwards[name] += 1

    def finish(self) -> None:
        """PEFT's CorDA: the sum divided by the number of forwards (one record each)."""
        if self.peft:
            for name, acc in self.acc.items():
                acc /= self.forwards[name]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        flat = x.reshape(-1, x.shape[-1])  # (B·T, in)
        if flat.shape[0] == mask.numel():
            return flat[mask.reshape(-1).to(flat.device)]
        if bool(mask.all()):
            return flat
        raise SurgeonError(f"calibration: a watched input of shape {tuple(x.shape)} does not line up with the batch's tokens {tuple(mask.shape)}.")


class BlockCovariances:
    """Input covariance (sum of x xᵀ over the calibration tokens, float64 on `device`) of every targeted
    linear, computed block by block in order as they are asked for. `peft`: PEFT's CorDA covariance
    instead (preprocess_corda's hook: one record per forward, its input divided by |max(input)|, the
    sum divided by the number of records); `tokens` stays the token count."""

    def __init__(self, model_dir: Path | dict, ckpt, targets: dict[str, str], data: CalibrationData,
                 device: torch.device, batch_tokens: int = 4096, peft: bool = False):
        config = model_dir if isinstance(model_dir, dict) else json.loads((Path(model_dir) / "config.json").read_text())
        self.device = torch.device(device)
        self.run = BlockRunner(config, ckpt, self.device)
        self.skipped: dict[str, str] = {}
        self._by_block: dict[int, list[str]] = {}
        for module in targets:
            i, why = self._place(module)
            if why:
                self.skipped[module] = why
            else:
                self._by_block.setdefault(i, []).append(module)
        self._block_of = {m: i for i, ms in self._by_block.items() for m in ms}
        self.data = data
        self.peft = peft  # PEFT's CorDA covariance: one record per forward, scaled by 1/|max|, averaged over records
        self._batches = make_batches(data, 1 if peft else batch_tokens)
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
            return -1, FUSED if self._fused(module) else NOT_LINEAR
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            return -1, NOT_LINEAR
        return i, ""

    def _fused(self, module: str) -> bool:
        param = module.rsplit(".", 2)[0]
        return any(p.fused for p in self.run.places.get(param, []))

    def blocks(self) -> list[list[str]]:
        """The targets with a covariance, grouped by block, in block order."""
        return [self._by_block[i] for i in sorted(self._by_block)]

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
        if module in self.skipped:
            raise UsageError(f"{module} has no calibration covariance: {self.skipped[module]}.")
        if module not in self._block_of:
            raise UsageError(f"{module} is not a calibration target.")
        i = self._block_of[module]
        while self._next <= i:
            self._step()
        if module not in self._cov:
            raise SurgeonError(f"calibration: the covariance of {module} was released (or never reached); ask in blocks() order.")

    def _step(self) -> None:
        """Run block `_next` over every batch, collecting its targets' covariances."""
        i = self._next
        if self._hidden is None:
            self._hidden, self._kwargs = self.run.capture(self._batches)
        last = max(self._by_block)
        coll = _Collector(self.device, self.peft)
        with self.run.block(i) as block:
            handles = [block.get_submodule(m[len(self.run.block_name(i)) + 1:]).register_forward_pre_hook(coll.hook(m), with_kwargs=True)
                       for m in self._by_block.get(i, [])]
            try:
                outs = []
                with torch.no_grad():
                    for x, kw, mask in zip(self._hidden, self._kwargs[i], self._masks):
                        coll.begin(mask)
                        outs.append(call_block(block, x, kw))
                        coll.end()
            finally:
                for h in handles:
                    h.remove()
        coll.finish()
        self._kwargs[i] = []
        self._hidden = outs if i < last else []
        for m in self._by_block.get(i, []):
            lead = coll.leader.get(m)
            if lead is None:
                raise SurgeonError(f"calibration: {m} was never called in the forward of block {i}; split without --calibrate.")
            self._cov[m], self._tokens[m] = coll.acc[lead], coll.count[lead]
        self._next = i + 1
