"""Split methods, one module each, in an explicit registry (no import-time side effects), each with
the trainable module it runs as (methods/lora.py: the LoRA layer; kasa, nusa, moe_runtime: theirs), and
the split folder bound to its method (methods/folder.py: SplitDir).

May import surgeon.format, surgeon.linalg and surgeon.model; never the engine, runtime or commands.
"""

from __future__ import annotations

from surgeon.errors import UsageError
from surgeon.methods.base import Method, MethodConfig, SplitResult


def _registry() -> dict[str, type[Method]]:
    from surgeon.methods.kasa import KaSA
    from surgeon.methods.milora import MiLoRA
    from surgeon.methods.moe import MoE
    from surgeon.methods.nusa import NuSA
    from surgeon.methods.pissa import PiSSA

    return {m.name: m for m in (MiLoRA, PiSSA, KaSA, NuSA, MoE)}


def names() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> Method:
    reg = _registry()
    if name not in reg:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(reg))}.")
    return reg[name]()


__all__ = ["Method", "MethodConfig", "SplitResult", "get_method", "names"]
