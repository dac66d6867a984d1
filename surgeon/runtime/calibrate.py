"""The mixture's gates averaged over calibration prompts, through the live split model (absorb's --fixed-gates .jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from surgeon.errors import UsageError
from surgeon.runtime import load_split


def _read_prompts(path: Path) -> list:
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UsageError(f"{path}:{i} is not JSON ({e}).") from e
        p = obj if isinstance(obj, str) else next((obj[k] for k in ("prompt", "text", "messages") if isinstance(obj, dict) and k in obj), None)
        if p is None:
            raise UsageError(f"{path}:{i}: expected a string or an object with \"prompt\", \"text\" or \"messages\".")
        prompts.append(p)
    if not prompts:
        raise UsageError(f"{path} holds no prompts.")
    return prompts


def calibration_gates(split_dir: Path, path: Path) -> tuple[dict[str, list[float]], int]:
    """Per-block gates averaged over the prompts of a JSONL file, one prompt per forward (no padding).

    The mean of the (top-k-masked) gates is the mean of the mixture's weight update over the prompts:
    for a linear layer, E_prompt[Σ_e g_e ΔW_e] = Σ_e E[g_e] ΔW_e, so the folded model is the runtime
    averaged over the calibration set, layer by layer.
    """
    from transformers import AutoTokenizer

    prompts = _read_prompts(path)
    sm = load_split(split_dir, trainable=False)
    tok = AutoTokenizer.from_pretrained(str(split_dir))
    routers = sm.model.surgeon_routing.routers
    sums = {b: torch.zeros(r.n_experts, dtype=torch.float64) for b, r in routers.items()}
    sm.model.eval()
    with torch.no_grad():
        for p in prompts:
            if isinstance(p, list):
                ids = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            else:
                ids = tok(p, return_tensors="pt")["input_ids"]
            sm.model(ids)
            for b, r in routers.items():
                sums[b] += r.gates[0].double()
    return {b: (s / len(prompts)).tolist() for b, s in sums.items()}, len(prompts)

