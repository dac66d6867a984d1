"""What a split writes for the model as transformers loads it: which fused experts it splits, their
fused adapter pairs (assembled at the finish), and the load check before the output is renamed.

    surgeon split --method pissa MIXTRAL --rank 16 --out split-dir   # experts split, adapter checked
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from surgeon.format import ShardSetWriter
from surgeon.model.check import check_adapter, check_modules
from surgeon.model.moe import fused_factors

ADAPTER_CONFIG, ADAPTER_WEIGHTS, INIT_FACTORS = "adapter_config.json", "adapter_model.safetensors", "surgeon.init.safetensors"


def lora_key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.{factor}.weight"  # = surgeon.format.splitdir.lora_key (PEFT's saved key)


def fused_targets(targets: dict, split_experts: bool) -> tuple[dict, dict[str, str]]:
    """(targets, {module: why}): fused MoE experts are split for LoRA-shaped methods on a float residual
    (`split_experts`); otherwise they stay dense and are listed."""
    fused = {n for n, t in targets.items() if t.place is not None and t.place.fused}
    if not fused or split_experts:
        return targets, {}
    why = "fused MoE experts: split for milora/pissa on a float residual only"
    return {n: t for n, t in targets.items() if n not in fused}, {targets[n].module: why for n in fused}


def write_fused(folder: Path, factor_plan: list, targets: dict, fused: dict[str, dict]) -> None:
    """The adapter's fused expert pairs, assembled from the per-expert factors in surgeon.init; repeatable
    (a resumed finish writes the same bytes into the same planned places)."""
    layers = {t.module: {"fused": {"param": t.place.param, "expert": t.place.expert, "part": t.place.part, "parts": t.place.parts}}
              for t in targets.values() if t.place is not None and t.place.fused}
    with safe_open(Path(folder) / INIT_FACTORS, "pt") as f:
        tensors = fused_factors(f, layers, fused, lora_key)
    w = ShardSetWriter(folder, [factor_plan], prefix=ADAPTER_WEIGHTS[: -len(".safetensors")])
    try:
        for k, t in tensors.items():
            w.write(k, t.contiguous())
        w.sync()
    finally:
        w.close()


def load_check(names, lora: bool, folder: Path, layers: dict) -> None:
    """The written factors attached to the skeleton as PEFT (or surgeon's runtime) would attach them;
    no-op without a skeleton (transformers cannot build the model, so it cannot load it either)."""
    if names is None:
        return
    if lora:
        modules = [lay["fused"]["param"].rpartition(".")[0] if "fused" in lay else m for m, lay in layers.items()]
        check_adapter(names.model, folder, ADAPTER_CONFIG, ADAPTER_WEIGHTS, list(dict.fromkeys(modules)))
    else:
        check_modules(names.model, layers)
