"""MoE experts that transformers 5 fuses into one 3-D parameter, in the form vanilla PEFT loads.

transformers 5 stacks Mixtral's `experts.N.w1/w3` into `experts.gate_up_proj` (E, 2I, H) and
`experts.N.w2` into `experts.down_proj` (E, H, I) (Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 alike). surgeon
splits each expert matrix W_e,p (expert e, part p of P fused ones; (out, in)) on its own, at rank r,
and writes the factors as PEFT's `target_parameters` LoRA of the fused parameter
(peft/tuners/lora/layer.py, ParamWrapper; R = P·r, its rank, with alpha P·α so the scale is α/r):

    lora_A (E·R, in)    row e·R + p·r + k       = A_e,p[k]           (expert-major)
    lora_B (P·out, R·E) [p·out + o, (p·r + k)·E + e] = B_e,p[o, k]   (rank-major, block-diagonal in p)

which is what ParamWrapper.get_delta_weight reads back (A.reshape(E, R, in), B.reshape(out, R, E))
and what PEFT's own PeftConcatenate builds from per-expert LoRAs (A concatenated along the rank,
B block-diagonal). The untrained per-expert factors stay under per-expert keys in surgeon.init;
`assemble` builds the fused pair from them, `piece` cuts one expert's pair out of a fused pair.

PEFT's transformers-5 conversion also rewrites target_modules whose leaf is a pre-fusion expert name
(`gate_proj`, `up_proj`, `down_proj`, `gate`; Mixtral: `w1..w3`, `gate`) into the fused parameters,
full names included: a dense MLP of such a model (DeepSeek-V3's first layers, Qwen2-MoE's shared
expert) is therefore targeted through `target_parameters` as `<module>.weight`, which PEFT wraps
the same way and leaves alone.
"""

from __future__ import annotations

import torch
from peft.utils.transformers_weight_conversion import (
    _MODEL_TO_CONVERSION_PATTERN,
    _MOE_TARGET_MODULE_MAPPING,
)


def expert_name(place) -> str:
    """The per-expert name of a fused piece ("model.layers.0.mlp.experts.gate_up_proj.3.1"): its manifest layer."""
    return f"{place.param}.{place.expert}.{place.part}"


def colliding_leaves(model_type: str | None) -> set[str]:
    """Leaf names PEFT would move onto fused expert parameters for this model type."""
    base = _MODEL_TO_CONVERSION_PATTERN.get(model_type or "")
    return set(_MOE_TARGET_MODULE_MAPPING.get(base or "", {}))


def fused_shapes(place, r: int, out_f: int, in_f: int) -> dict[str, tuple[int, int]]:
    """Shapes of the fused lora_A / lora_B of `place`'s parameter, each expert matrix (out_f, in_f) at rank r."""
    experts, parts = place.shape[0], place.parts
    return {"lora_A": (experts * parts * r, in_f), "lora_B": (parts * out_f, parts * r * experts)}


def assemble(pieces: dict[tuple[int, int], dict[str, torch.Tensor]], experts: int, parts: int) -> dict[str, torch.Tensor]:
    """The fused (lora_A, lora_B) from every (expert, part) -> {"lora_A": (r, in), "lora_B": (out, r)}."""
    a0 = next(iter(pieces.values()))
    r, in_f, out_f = a0["lora_A"].shape[0], a0["lora_A"].shape[1], a0["lora_B"].shape[0]
    big_r = parts * r
    a = torch.zeros(experts, big_r, in_f, dtype=a0["lora_A"].dtype)  # (E, R, in)
    b = torch.zeros(parts * out_f, big_r, experts, dtype=a0["lora_B"].dtype)  # (P·out, R, E)
    for (e, p), f in pieces.items():
        a[e, p * r:(p + 1) * r] = f["lora_A"]
        b[p * out_f:(p + 1) * out_f, p * r:(p + 1) * r, e] = f["lora_B"]
    return {"lora_A": a.reshape(experts * big_r, in_f), "lora_B": b.reshape(parts * out_f, big_r * experts)}


def piece(fused: dict[str, torch.Tensor], expert: int, part: int, parts: int, experts: int) -> dict[str, torch.Tensor]:
    """One expert matrix's (lora_A (r, in), lora_B (out, r)) cut out of a fused pair."""
    a, b = fused["lora_A"], fused["lora_B"]
    big_r = a.shape[0] // experts
    r, out_f = big_r // parts, b.shape[0] // parts
    a3 = a.reshape(experts, big_r, a.shape[1])  # (E, R, in)
    b3 = b.reshape(b.shape[0], big_r, experts)  # (P·out, R, E)
    return {"lora_A": a3[expert, part * r:(part + 1) * r].contiguous(),
            "lora_B": b3[part * out_f:(part + 1) * out_f, part * r:(part + 1) * r, expert].contiguous()}


def fused_factors(handle, layers: dict[str, dict], fused: dict[str, dict], key) -> dict[str, torch.Tensor]:
    """{adapter key: fused tensor} of every fused parameter, assembled from the per-expert factors in
    `handle` (surgeon.init: keys key(layer, "lora_A"/"lora_B")); layers: the manifest's, with "fused"."""
    pieces: dict[str, dict] = {p: {} for p in fused}
    for name, lay in layers.items():
        fu = lay.get("fused")
        if fu is not None:
            pieces[fu["param"]][fu["expert"], fu["part"]] = {f: handle.get_tensor(key(name, f)) for f in ("lora_A", "lora_B")}
    out = {}
    for param, info in fused.items():
        for f, t in assemble(pieces[param], info["experts"], info["parts"]).items():
            out[key(info["module"], f)] = t
    return out
