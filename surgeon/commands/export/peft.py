"""PEFT LoRA adapter files, written without importing PEFT.

Key layout of a saved PEFT LoRA (peft/utils/save_and_load.py): `base_model.model.<module>.lora_A.weight`
(r, in) and `...lora_B.weight` (out, r), no adapter name; the scaling is lora_alpha / r.

    surgeon export SPLIT_DIR --to lora --out DIR
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.format.splitdir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key  # noqa: F401 - the split-folder format
from surgeon.format.writer import write_json
from surgeon.model.adapter import plain_targets


def adapter_config(
    *,
    r: int,
    alpha: float,
    target_modules: list[str],
    fan_in_fan_out: bool = False,
    use_rslora: bool = False,
    base_model: str | None = None,
    revision: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    target_parameters: list[str] | None = None,
) -> dict:
    conf = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        **({"target_parameters": list(target_parameters)} if target_parameters else {}),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if rank_pattern or alpha_pattern:  # per-module ranks (surgeon/patterns.py); PEFT's default is {}
        conf["rank_pattern"], conf["alpha_pattern"] = dict(rank_pattern or {}), dict(alpha_pattern or {})
    return conf


def split_config(folder: Path) -> dict:
    """A split folder's config.json ({} when it has none)."""
    f = Path(folder) / "config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def split_task_type(folder: Path) -> str | None:
    """The PEFT task type of the model in a split folder (CAUSAL_LM when it has no config.json)."""
    conf = split_config(folder)
    return task_type_for(conf) if conf else "CAUSAL_LM"


def split_plain_targets(sd) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of an adapter on a split's layers when they are plain linears
    (a method that is not LoRA-shaped): surgeon.model.adapter.plain_targets for the split's model type."""
    return plain_targets(split_config(sd.path).get("model_type"), list(sd.manifest["layers"]), sd.manifest["target_modules"])


def task_type_for(config: dict) -> str | None:
    """PEFT task_type for a model config: CAUSAL_LM for causal-LM architectures (transformers'
    causal-LM auto mapping, or a *ForCausalLM / *LMHeadModel name), else None: PEFT then wraps the
    model in the plain PeftModel, which e.g. CLIPModel needs. No architectures: CAUSAL_LM."""
    archs = config.get("architectures") or []
    if not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "CAUSAL_LM"  # decided by the name: no transformers import (seconds) on the hot path
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:
        causal = set()
    is_causal = any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return "CAUSAL_LM" if is_causal else None


def load_class(model_cfg: dict) -> str:
    """The transformers class of the documented load line: AutoModelForCausalLM for causal LMs, else the model's own."""
    archs = model_cfg.get("architectures") or []
    return "AutoModelForCausalLM" if task_type_for(model_cfg) == "CAUSAL_LM" or not archs else str(archs[0])


def publish_adapter(out: Path, plan: dict, overwrite: bool, inputs: list[Path], config: dict, tensors: dict[str, torch.Tensor], check=None) -> dict:
    """Write an exported adapter as an output transaction (surgeon/outdir.py), with a small
    surgeon.json naming what it came from, so a later --overwrite recognises it. Returns `config`."""
    from surgeon.engine.outdir import WorkDir
    from surgeon.format.splitdir import MANIFEST
    from surgeon.version import __version__

    with WorkDir(out, plan, overwrite, inputs=inputs) as work:
        if not work.complete:
            write_adapter(work.path, config, tensors)
            if check is not None:  # the load check, before the output is renamed into place
                check(work.path)
            write_json(work.path / MANIFEST, {"surgeon_version": __version__, "operation": "export", **plan, "r": config["r"],
                                              "base_model": config.get("base_model_name_or_path")})
        work.finish()
    return config


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    os.chmod(folder / ADAPTER_WEIGHTS, 0o644)  # safetensors writes 0600
    write_json(folder / ADAPTER_CONFIG, config)
