"""Logits of a model one decoder block at a time (surgeon check): host memory near one block and the
modules outside the blocks, whatever the model's size.

    ref = original_logits(config, ckpt, windows)    # the source, from its checkpoint
    got = split_logits(split, windows)              # the split: its factors attached as load_split attaches them

Both run through surgeon.model.blockrun.BlockRunner on the CPU in float32: capture what block 0
receives for every window, run each block on every window while only that block is materialised,
then the model's own forward after the blocks (BlockRunner.finish: final norm, head, softcapping).

For the split, the residual's checkpoint is read. load_split's runtime modules are attached to the
meta-device skeleton before anything runs (their factors are real; the bases they wrap are filled
block by block), and each fused expert's parametrization is registered while its block is
materialised. Model-level forward pre-hooks (the mixture's routing marks a new prompt there) are
replayed before each window enters a block, so state kept per prompt follows the window.
"""

from __future__ import annotations

import contextlib
import json

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from surgeon.errors import SurgeonError
from surgeon.model.blockrun import BlockRunner, failing, run_block
from surgeon.runtime import attach_blocks, attach_layers, fused_runtimes

CHECK = ("surgeon check", "this is a surgeon bug")  # BlockRunner's errors: what ran, the way around (check falls back itself)
CPU = torch.device("cpu")


def original_runner(config: dict, ckpt) -> BlockRunner:
    return BlockRunner(config, ckpt, CPU, CHECK)


def split_runner(split) -> tuple[BlockRunner, dict]:
    """The split's residual with its runtime modules attached on the meta device; and its fused
    experts' parametrizations (PEFT module path -> (module, parameter name, FusedLoRA)), not registered."""
    run = BlockRunner(json.loads((split.path / "config.json").read_text()), split.residual(), CPU, CHECK)
    with safe_open(split.factors_file, "pt") as f:
        fused = fused_runtimes(run.model, split, f, trainable=False)
        modules = attach_layers(run.model, split, f, trainable=False)
        attach_blocks(run.model, split, f, modules, trainable=False)
    return run, fused


def original_logits(run: BlockRunner, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    return logits(run, windows)


def split_logits(run: BlockRunner, fused: dict, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    names = {id(m): n for n, m in run.model.named_modules()}
    done: set[str] = set()
    out = logits(run, windows, lambda i: _parametrized(run.block_name(i) + ".", fused, names, done))
    if len(done) != len(fused):  # a fused parameter outside every block would have run without its factors
        raise SurgeonError(f"{sorted(set(fused) - done)[0]} lies outside the blocks run one at a time")
    return out


@torch.no_grad()
def logits(run: BlockRunner, windows: list[torch.Tensor], during=None) -> list[torch.Tensor]:
    """(L, vocab) float32 logits of every (1, L) window; during(i): a context entered while block i is materialised."""
    batches = [{"input_ids": w} for w in windows]
    run.model.eval()
    hidden, kwargs = run.capture(batches)
    if run.changes_between_blocks:
        raise SurgeonError(f"{type(run.model).__name__} changes the hidden states between its blocks")
    tuples = False
    for i in range(len(run.layers)):
        with run.block(i) as block, (during(i) if during else contextlib.nullcontext()):
            for b, batch in enumerate(batches):
                with failing(run.model, f"in block {i}", CHECK):
                    replay_model_hooks(run.model, batch)
                    hidden[b], tuples = run_block(block, hidden[b], kwargs[i][b])
    return [x[0].float() for x in run.finish(batches, hidden, tuples)]


def replay_model_hooks(model: nn.Module, batch: dict) -> None:
    """Call the model's forward pre-hooks as its forward would for `batch` (state kept per prompt)."""
    kwargs = {**batch, "use_cache": False}
    for key, hook in list(model._forward_pre_hooks.items()):
        if key in model._forward_pre_hooks_with_kwargs:
            hook(model, (), kwargs)
        else:
            hook(model, ())


@contextlib.contextmanager
def _parametrized(head: str, fused: dict, names: dict, done: set):
    """The fused experts' parametrizations inside the block named by `head`, registered for the duration
    (their keys added to `done`)."""
    mine = [(key, owner, pname, rt) for key, (owner, pname, rt) in fused.items() if names.get(id(owner), "").startswith(head)]
    try:
        for key, owner, pname, rt in mine:
            parametrize.register_parametrization(owner, pname, rt)
            done.add(key)
        yield
    finally:
        for _, owner, pname, _ in mine:
            if parametrize.is_parametrized(owner, pname):
                parametrize.remove_parametrizations(owner, pname, leave_parametrized=False)
