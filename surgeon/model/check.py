"""The load check after every write: the adapter just written, attached to the meta-device skeleton
exactly as `PeftModel.from_pretrained` attaches it (PEFT reads adapter_config.json, converts the
config and the keys for transformers 5 — its MoE rules included — injects, then loads the state dict),
with meta tensors of the written shapes, so no weight is read and nothing is allocated.

Every factor must bind to exactly one LoRA parameter with its shape, every LoRA parameter PEFT
creates must get a factor (else PEFT would leave it at its random/zero init), and every split layer
must be wrapped. A mismatch is one LoadCheckError naming the first unbound layer; the caller raises
it before the output is renamed into place, so nothing is left looking finished.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict

from surgeon.errors import LoadCheckError
from surgeon.format.reader import read_header

ADAPTER = "default"


def _meta_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """The adapter file's tensors as meta tensors of their shapes (the header only)."""
    return {i.name: torch.empty(i.shape, device="meta") for i in read_header(weights)[0].values()}


def _attach(model, config: dict, state: dict):
    conf = LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "auto_mapping", "peft_version")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel(copy.deepcopy(model), conf, low_cpu_mem_usage=True)
        result = set_peft_model_state_dict(pm, state, low_cpu_mem_usage=True)
    return pm, result


def _wrapped(pm) -> dict[str, BaseTunerLayer]:
    """module name in the base model -> its LoRA layer (the innermost wrapper of a nested ParamWrapper too)."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            out[name] = mod
    return out


def check_adapter(model, folder: Path, config_name: str, weights_name: str, modules: list[str]) -> None:
    """Raise LoadCheckError unless the adapter in `folder` binds to `model` (the skeleton) factor for
    factor, and every module of `modules` (the split layers, loaded names) holds factors."""
    config = json.loads((Path(folder) / config_name).read_text())
    state = _meta_state_dict(Path(folder) / weights_name)
    where = f"{Path(folder).name}/{weights_name}"
    try:
        pm, result = _attach(model, config, state)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0])[:240]
        raise LoadCheckError(f"the adapter in {where} does not load onto the model transformers builds from config.json "
                             f"(PEFT: {first}); this is a surgeon bug, please report it with the model's config.json.") from None
    missing = sorted(k for k in result.missing_keys if ".lora_" in k)
    unexpected = sorted(result.unexpected_keys)
    if missing:
        raise LoadCheckError(f"{where}: PEFT wraps {_module_of(missing[0])} but the adapter has no factor for it ({len(missing)} such); "
                             "its LoRA would start from PEFT's init. This is a surgeon bug, please report it with the model's config.json.")
    if unexpected:
        raise LoadCheckError(f"{where}: the factor {unexpected[0]} binds to no module of the loaded model ({len(unexpected)} such); "
                             "PEFT would drop it. This is a surgeon bug, please report it with the model's config.json.")
    wrapped = _wrapped(pm)
    for m in modules:
        if m not in wrapped and not any(w.startswith(m + ".") or m.startswith(w + ".") for w in wrapped):
            raise LoadCheckError(f"{where}: the split layer {m} is not bound to any factor of the adapter when PEFT loads it; "
                                 "the loaded model would lack its split components. This is a surgeon bug, please report it.")


def _module_of(key: str) -> str:
    return key.split(".lora_", 1)[0].removeprefix("base_model.model.")


def check_modules(model, layers: dict[str, dict]) -> None:
    """For factors surgeon's runtime attaches itself (methods that are not LoRA-shaped): every split
    layer must be a linear module of the loaded model with the recorded shape."""
    for name, lay in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LoadCheckError(f"the split layer {name} is not a module of the model transformers builds from config.json; "
                                 "this is a surgeon bug, please report it with the model's config.json.") from None
        w = getattr(mod, "weight", None)
        shape = tuple(w.shape[::-1] if lay.get("transposed") else w.shape) if w is not None else None
        if shape != tuple(lay["shape"]):
            raise LoadCheckError(f"the split layer {name} is {shape} in the loaded model, not {tuple(lay['shape'])}; "
                                 "this is a surgeon bug, please report it with the model's config.json.")


def check_output(folder: Path, manifest: dict, config_dir: Path | None = None, weights: str = "adapter_model.safetensors") -> None:
    """The load check of an adapter written by train or export into `folder` (adapter_config.json +
    `weights`), on the skeleton of config_dir/config.json (default: folder's). No-op when transformers
    cannot build the model (then nothing loads it through transformers either)."""
    from surgeon.model.skeleton import build_skeleton

    conf_file = Path(config_dir or folder) / "config.json"
    if not conf_file.is_file():
        return
    model, _ = build_skeleton(json.loads(conf_file.read_text()))
    if model is None:
        return
    layers = manifest.get("layers") or {}
    modules = [lay["fused"]["param"].rpartition(".")[0] if "fused" in lay else m for m, lay in layers.items()]
    check_adapter(model, folder, "adapter_config.json", weights, list(dict.fromkeys(modules)))
