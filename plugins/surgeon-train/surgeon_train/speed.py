"""Speed on CUDA: liger-kernel's fused RMSNorm / SwiGLU / RoPE kernels, and torch.compile of the blocks.

    surgeon train SPLIT --data d.jsonl --kernels liger --compile        # both (CUDA)

--kernels auto (the default) patches the model instance with liger-kernel's Triton kernels
(`_apply_liger_kernel_to_instance`: RMSNorm, SwiGLU MLP, RoPE; never its losses, surgeon_train.loss
chooses those) when it runs on CUDA and liger-kernel is installed (`pip install 'surgeon-train[fast]'`)
and knows the architecture; else nothing. The patch rebinds forward methods of this model's modules
(the runtime modules that replaced its linears are called through them unchanged) and, for RoPE,
swaps a function in the architecture's transformers module: `scoped_kernels` puts that module's
globals back when training ends, so other models in the process are not affected.

--compile compiles every transformer block (transformers' `_no_split_modules` classes) in place with
torch.compile, the "regional" compilation PyTorch recommends for repeated blocks: one compiled graph
serves every layer. Off by default (bench/bench_gpu_train.py measures whether it pays).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch
from torch import nn

from surgeon.errors import UsageError

KERNELS = ("auto", "liger", "none")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: instances of the model's _no_split_modules classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def liger_supported(model: nn.Module) -> bool:
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def resolve(name: str, model: nn.Module, device: torch.device) -> str:
    if name not in KERNELS:
        raise UsageError(f"--kernels {name!r}: choose auto, liger or none.")
    if name == "auto":
        return "liger" if device.type == "cuda" and liger_supported(model) else "none"
    if name == "liger":
        if device.type != "cuda":
            raise UsageError("--kernels liger runs Triton kernels on CUDA only; drop it on the CPU.")
        if not liger_supported(model):
            raise UsageError(f"liger-kernel is not installed or has no kernels for model type "
                             f"{getattr(model.config, 'model_type', '?')!r}: pip install 'surgeon-train[fast]', or --kernels none.")
    return name


@contextlib.contextmanager
def scoped_kernels(model: nn.Module, name: str):
    """Apply the kernels for the duration of the block; the patched transformers module's globals
    are restored afterwards (the model instance keeps its patched methods)."""
    if name != "liger":
        yield
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    mod = sys.modules.get(type(model).__module__)
    saved = dict(vars(mod)) if mod is not None else None
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    try:
        yield
    finally:
        if saved is not None:
            for k in set(vars(mod)) - set(saved):
                delattr(mod, k)
            for k, v in saved.items():
                if vars(mod).get(k) is not v:
                    setattr(mod, k, v)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every block in place; returns how many."""
    found = blocks(model)
    if not found:
        raise UsageError(f"--compile: {type(model).__name__} names no transformer block class (_no_split_modules); drop --compile.")
    for b in found:
        b.compile()
    return len(found)
