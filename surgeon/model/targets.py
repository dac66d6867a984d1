"""--target resolved on the loaded model (the skeleton of surgeon/model/skeleton.py).

    all-linear   exactly what PEFT's all-linear wraps on the loaded model
                 (peft.tuners.tuners_utils._maybe_include_all_linear_layers: every nn.Linear/Conv1D
                 but the output head), when the checkpoint stores its weight, and every expert
                 matrix of the fused MoE expert parameters (PEFT's all-linear takes those too on
                 transformers 5, through its MoE conversion); the routers stay dense
    fused experts  named by their parameter (`gate_up_proj`, `experts.down_proj`) or module
                 (`experts`): each expert matrix is split (surgeon/model/moe.py)
    NAME ...     loaded module names, matched as PEFT matches target_modules (the name, or a
                 `.NAME` suffix); a match that is not a linear layer (an embedding, a norm, a MoE
                 router or experts block) is refused in one line: PEFT could not wrap it either
    REGEX        full-matched against module names (loaded or checkpoint); only linear layers taken
"""

from __future__ import annotations

import re

from peft import LoraConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgeon.errors import UsageError
from surgeon.model.moe import expert_name
from surgeon.model.patterns import UserRegex

LINEAR = (nn.Linear, Conv1D)


def peft_all_linear(model: nn.Module) -> set[str]:
    """The module names PEFT's `target_modules="all-linear"` wraps on `model`."""
    return set(_maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules)


def linear_weights(tensors: dict, names) -> dict[str, tuple[str, str]]:
    """loaded linear module -> (checkpoint key, module) for every nn.Linear/Conv1D whose weight the checkpoint stores (2-D)."""
    out = {}
    for key, place in names.places.items():
        if place.fused or place.converted or not place.param.endswith(".weight") or len(tensors[key].shape) != 2:
            continue
        module = place.param[: -len(".weight")]
        if isinstance(names.module(module), LINEAR) and not read_directly(names, module):
            out[module] = (key, module)
    return out


def read_directly(names, module: str) -> bool:
    """A linear layer whose weight its parent reads itself, never calling it: nn.MultiheadAttention's
    out_proj (F.multi_head_attention_forward takes out_proj.weight; SigLIP's pooling head). A wrapper's
    forward would never run there, so the split's factors would be silently left out: it stays dense."""
    return isinstance(names.module(module.rpartition(".")[0]), nn.MultiheadAttention)


def other_matrices(tensors: dict, names) -> dict[str, str]:
    """2-D weights of modules PEFT does not wrap as linear layers (MoE routers: Mixtral's TopKRouter), module -> why:
    all-linear leaves them dense, and the summary lists them."""
    out = {}
    for key, place in names.places.items():
        if place.fused or not place.param.endswith(".weight") or len(tensors[key].shape) != 2:
            continue
        module = place.param[: -len(".weight")]
        mod = names.module(module)
        if isinstance(mod, LINEAR) and read_directly(names, module):
            out[module] = "inside nn.MultiheadAttention, which reads its weight without calling it"
        elif mod is not None and not isinstance(mod, (*LINEAR, nn.Embedding)) and not type(mod).__name__.endswith(("Norm", "Embedding", "Embeddings")):
            out[module] = f"a {type(mod).__name__}, not a linear layer PEFT wraps"
    return out


def fused_params(names) -> dict[str, list[str]]:
    """fused expert parameter -> its checkpoint keys (one per expert matrix), in checkpoint order."""
    out: dict[str, list[str]] = {}
    for key, place in names.places.items():
        if place.fused:
            out.setdefault(place.param, []).append(key)
    return out


def _hit(name: str, spec: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in spec)


def _refuse_misshapen(tensors: dict, names) -> None:
    """A linear layer's weight stored as anything but a matrix (1-D, 3-D) is named, never skipped: the
    checkpoint does not match the model its config.json builds."""
    for key, place in names.places.items():
        module = place.param[: -len(".weight")]
        if (not place.fused and not place.converted and place.param.endswith(".weight") and len(tensors[key].shape) != 2
                and isinstance(names.module(module), LINEAR)):
            raise UsageError(f"{key} is stored as a {len(tensors[key].shape)}-D tensor of shape {list(tensors[key].shape)}, but {module} is a "
                             f"{type(names.module(module)).__name__} in the model config.json builds: the checkpoint does not match its "
                             "config; fix the checkpoint (surgeon splits 2-D linear weights).")


def _refuse_non_linear(spec: list[str], names, linear: dict, fused: dict) -> None:
    """An explicit name matching something that is not a splittable linear layer: one line, naming it."""
    fused_modules = {p.rpartition(".")[0] for p in fused}
    for name, mod in names.model.named_modules():
        if name in linear or name in fused_modules or not name or not _hit(name, spec):
            continue
        kind = type(mod).__name__
        if isinstance(mod, nn.Embedding):
            raise UsageError(f"--target {name} is an embedding ({kind}); surgeon splits linear layers only: drop it from --target.")
        if isinstance(mod, LINEAR):
            raise UsageError(f"--target {name} is a linear layer the checkpoint does not store (a tied weight); drop it from --target.")
        raise UsageError(f"--target {name} is a {kind}, not a linear layer surgeon can split (norms, routers and fused experts "
                         "stay dense); drop it from --target or name its linear layers.")
    for pname, p in names.model.named_parameters():
        module = pname.rpartition(".")[0]
        if module not in linear and pname not in fused and _hit(pname, spec):
            raise UsageError(f"--target {pname} is a {p.dim()}-D parameter of a {type(names.module(module)).__name__}, not a "
                             "linear layer surgeon can split; drop it from --target.")


def loaded_targets(tensors: dict, spec: list[str], names) -> dict[str, tuple]:
    """checkpoint key -> (loaded module, out_features, in_features, transposed, place), in checkpoint order."""
    linear, fused = linear_weights(tensors, names), fused_params(names)
    _refuse_misshapen(tensors, names)
    if spec == ["all-linear"]:
        chosen = (set(peft_all_linear(names.model)) & set(linear)) | set(fused)
    elif len(spec) == 1 and not re.fullmatch(r"[A-Za-z0-9_.]+", spec[0]):
        rx = UserRegex(spec[0], "--target")  # matched under a time bound
        chosen = {m for m, (key, _) in linear.items() if rx.fullmatch(m) or rx.fullmatch(key[: -len(".weight")])}
        chosen |= {p for p in fused if rx.fullmatch(p)}
    else:
        by_ckpt = {key[: -len(".weight")]: m for m, (key, _) in linear.items()}
        chosen = {m for m in linear if _hit(m, spec)} | {by_ckpt[s] for s in spec if s in by_ckpt}
        chosen |= {p for p in fused if _hit(p, spec) or _hit(p.rpartition(".")[0], spec)}
        _refuse_non_linear(spec, names, linear, fused)
    if not chosen:
        sample = ", ".join(sorted(linear)[:5]) or "none"
        raise UsageError(f"no linear weight matches --target {' '.join(spec)}; module names of this model (as transformers "
                         f"loads it) look like: {sample}.")
    out = {}
    for key in tensors:  # checkpoint order
        place = names.places.get(key)
        if place is not None and place.fused and place.param in chosen:
            out_f, in_f = tensors[key].shape
            out[key] = (expert_name(place), out_f, in_f, False, place)
            continue
        module = place.param[: -len(".weight")] if place is not None and not place.fused else None
        if module in chosen and linear.get(module, (None,))[0] == key:
            transposed = isinstance(names.module(module), Conv1D)
            rows, cols = tensors[key].shape
            out_f, in_f = (cols, rows) if transposed else (rows, cols)
            out[key] = (module, out_f, in_f, transposed, place)
    return out


def peft_target_modules(names, modules: set[str]) -> list[str]:
    """The shortest PEFT target_modules that selects exactly `modules` on the loaded model: leaf names
    when every module of the model with that leaf is targeted (any kind of module: PEFT would try to
    wrap them all), else full module names."""
    by_leaf: dict[str, set[str]] = {}
    for name, _ in names.model.named_modules():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if all(by_leaf[leaf] <= modules for leaf in leaves):
        return leaves
    return sorted(modules)
