"""What the PEFT adapter of a split names, on the loaded model: target_modules, target_parameters,
the rank/alpha patterns, and where PEFT keeps each fused expert parameter's LoRA.

    plan = plan_adapter(names, targets, model_type, rank, alpha, rank_pattern, alpha_pattern)

`plan.fused[param]["module"]` is the module path PEFT gives the parameter's wrapper (nested
ParamWrappers put the first one under `.base_layer`), read off a PeftModel built on the meta-device
skeleton from this very config, so the written keys are the ones PEFT saves and loads.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import ParamWrapper

from surgeon.errors import UsageError
from surgeon.model.moe import colliding_leaves
from surgeon.model.targets import peft_target_modules


@dataclass
class AdapterPlan:
    r: int  # adapter_config's r and lora_alpha (P·r and P·α when a fused parameter fuses P expert matrices)
    alpha: float
    target_modules: list[str]
    target_parameters: list[str]
    rank_pattern: dict
    alpha_pattern: dict
    fused: dict[str, dict] = field(default_factory=dict)  # param -> {"module", "parts", "experts"}


def plan_adapter(names, targets, model_type, rank: int, alpha: float, rank_pattern: dict, alpha_pattern: dict, rslora: bool = False) -> AdapterPlan:
    dense = {t.module for t in targets.values() if not (t.place is not None and t.place.fused)}
    fused: dict[str, dict] = {}
    for t in targets.values():
        if t.place is not None and t.place.fused:
            fused[t.place.param] = {"parts": t.place.parts, "experts": t.place.shape[0]}
    clash = colliding_leaves(model_type)
    moved = {m for m in dense if m.rsplit(".", 1)[-1] in clash}  # PEFT's MoE conversion would move these
    params = sorted(fused) + sorted(f"{m}.weight" for m in moved)
    modules = peft_target_modules(names, dense - moved) if dense - moved else []
    plan = _ranks(modules, params, fused, rank, alpha, rank_pattern, alpha_pattern, rslora)
    if fused:
        for param, module in wrapper_modules(names.model, plan).items():
            if param in fused:
                fused[param]["module"] = module
    return plan


def plain_targets(model_type: str | None, modules: list[str], target_modules: list[str]) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of an adapter on these plain linear modules (an export of a
    method that is not LoRA-shaped; target_modules: the split's record of them): a module whose leaf PEFT's
    MoE conversion would move onto the fused experts (DeepSeek-V3's dense and shared-expert down_proj) is
    named as its parameter instead, as plan_adapter names it."""
    clash = colliding_leaves(model_type)
    kept = [t for t in target_modules if t.rsplit(".", 1)[-1] not in clash]
    return kept, sorted(f"{m}.weight" for m in modules if m.rsplit(".", 1)[-1] in clash)


def _ranks(modules, params, fused, rank, alpha, rank_pattern, alpha_pattern, rslora) -> AdapterPlan:
    """A fused gate_up parameter needs rank P·r (and alpha P·α, √P·α with rsLoRA) to hold r per expert
    matrix. PEFT 0.21 warns about any rank_pattern key that matches no targeted *module* (its check
    skips target_parameters), so the fused rank is the adapter's global r and one key naming every
    other target (modules, and parameters that fuse one matrix) gives them r and α, after the user's."""
    parts = max((f["parts"] for f in fused.values()), default=1)
    if parts == 1:
        return AdapterPlan(rank, alpha, modules, params, dict(rank_pattern), dict(alpha_pattern), fused)
    if any(f["parts"] != parts for f in fused.values() if f["parts"] > 1):
        raise UsageError("this model fuses different numbers of expert matrices per parameter; split its experts with "
                         "--target naming one kind (e.g. --target down_proj) or exclude them.")
    others = sorted(set(modules) | {p for p in params if p not in fused or fused[p]["parts"] == 1})
    plan = AdapterPlan(rank * parts, alpha * (parts**0.5 if rslora else parts), modules, params, dict(rank_pattern), dict(alpha_pattern), fused)
    if others:
        key = "|".join(re.escape(o) for o in others)
        plan.rank_pattern[key], plan.alpha_pattern[key] = rank, alpha
    return plan


def lora_config(plan: AdapterPlan) -> LoraConfig:
    return LoraConfig(r=plan.r, lora_alpha=plan.alpha, target_modules=plan.target_modules or None,
                      target_parameters=plan.target_parameters or None, rank_pattern=plan.rank_pattern,
                      alpha_pattern=plan.alpha_pattern, lora_dropout=0.0)


def wrapper_modules(model, plan: AdapterPlan) -> dict[str, str]:
    """parameter name -> the module path of the ParamWrapper PEFT puts on it (its factors' key prefix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel(copy.deepcopy(model), lora_config(plan), low_cpu_mem_usage=True)
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, ParamWrapper):
            owner = name
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            out[f"{owner}.{mod.parameter_name}"] = name
    return out
