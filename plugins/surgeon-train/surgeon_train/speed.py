"""Speed on CUDA: torch.compile of the transformer blocks, and liger-kernel's RMSNorm / SwiGLU / RoPE kernels.

    surgeon train SPLIT --data d.jsonl --steps 200           # CUDA: compiled blocks (≥ COMPILE_MIN_TOKENS tokens)
    surgeon train SPLIT --data d.jsonl --no-compile          # eager
    surgeon train SPLIT --data d.jsonl --kernels liger       # liger's Triton kernels instead (eager)

--compile (the default on CUDA for runs that train at least COMPILE_MIN_TOKENS tokens per process,
steps × batch × grad-accum × seq-len, where the one-time compile is paid back: it costs a fixed
time, and saves a time per token; never on the CPU, where inductor's C++ build costs more than it
saves) compiles every transformer block (transformers' `_no_split_modules` classes) in place with
torch.compile, the "regional" compilation PyTorch recommends for repeated blocks: one compiled graph
serves every layer. The graph is compiled with dynamic=False: rows are packed to --seq-len and the
micro-batch is fixed before the first step, so every step after the first reuses it (a last
micro-batch of another size, or a halved one after an out-of-memory error, compiles one more).
Inductor fuses what liger's kernels fuse (RMSNorm, SwiGLU, RoPE) and also the factor path's
scale-and-add, so compiled blocks run without liger's kernels.

--kernels liger patches the model instance with liger-kernel's Triton kernels
(`_apply_liger_kernel_to_instance`: RMSNorm, SwiGLU MLP, RoPE; never its losses, surgeon_train.loss
chooses those) when it runs on CUDA and liger-kernel is installed (`pip install 'surgeon-train[fast]'`)
and knows the architecture. --kernels auto (the default) is none: measured on an H100 and an H200
(bench/RESULTS.md), liger's kernels were no faster than none on the SmolLM2 shape in eager mode, and
compile supersedes them. The patch rebinds forward methods of this model's modules (the runtime
modules that replaced its linears are called through them unchanged) and, for RoPE, swaps a
function in the architecture's transformers module: `scoped_kernels` puts that module's globals
back when training ends, so other models in the process are not affected.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch
from torch import nn

from surgeon.errors import UsageError

KERNELS = ("auto", "liger", "none")
COMPILE_MIN_TOKENS = 800_000  # --compile's default on CUDA: on from this many tokens a process (100 steps of 8 × 1024)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager/eager: the same code path without code generation (tests)


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
        return "none"
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


def uncompile_blocks(model: nn.Module) -> None:
    """Undo compile_blocks: every block runs its eager code again (nn.Module.compile's own slot)."""
    for b in blocks(model):
        b._compiled_call_impl = None


def is_compile_error(e: BaseException) -> bool:
    """An error of torch.compile itself (tracing, a backend that failed), not of the model's code."""
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(e, exc.TorchDynamoException)


def eager():
    """Within `with`, compiled blocks run their eager code (evaluation: another batch size and no grad
    would compile new graphs, seconds each, for one pass); a no-op on a torch without set_stance (< 2.6)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def use_compile(asked: bool | None, device: torch.device, tokens: int) -> bool:
    """--compile / --no-compile as given; by default on CUDA for runs of ≥ COMPILE_MIN_TOKENS tokens a process."""
    if asked is not None:
        return asked
    return device.type == "cuda" and tokens >= COMPILE_MIN_TOKENS


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every block in place (static shapes); returns how many."""
    if backend not in COMPILE_BACKENDS:
        raise UsageError(f"compile backend {backend!r}: choose {', '.join(COMPILE_BACKENDS)}.")
    found = blocks(model)
    if not found:
        raise UsageError(f"--compile: {type(model).__name__} names no transformer block class (_no_split_modules); drop --compile.")
    # the frozen embeddings hand block 0 an input without grad, every later block one with: two graphs
    # to compile. An input that requires grad in every block makes it one (one cheap extra input
    # gradient at block 0, against a second fwd+bwd compile of the block).
    enable = getattr(model, "enable_input_require_grads", None)
    if enable is not None:
        enable()
    for b in found:
        b.compile(backend=backend, dynamic=False)
    return len(found)
