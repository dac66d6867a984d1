"""Where KaSA's truncation breaks the untrained model: perplexity after removing the r minor
singular components of the targeted weights, for several ranks × target sets.

KaSA's frozen base is W_world = W − U[:, −r:] diag(σ[−r:]) Vh[−r:] (METHODS.md, "KaSA" step 1; what
`surgeon split --method kasa` writes and what PEFT's KaSA does on attach). Before any training the
model is the original one with every targeted weight so truncated (the adapter starts at B = 0).
This job computes that in memory from one float64 SVD per weight (on the job's device) (the same numbers as the split, up
to the split's own float64 solver; the train jobs' `split_ppl` of kasa at the run's rank is the
cross-check) and records, per configuration, the perplexity on the general text and the removed
spectral energy Σ_{i>k−r} σ_i² / Σ σ_i² (largest layer, mean) — the quantity a split-time warning
would report, and the share of the layer's OUTPUT on real text that the truncation removes,
‖X ΔWᵀ‖_F / ‖X Wᵀ‖_F (X: the layer's inputs on one window of the general text), the activation-aware
alternative.
"""

from __future__ import annotations

import time

import torch

from bench.eval.folders import ALL_LINEAR

SETS = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",), "gate": ("gate_proj",), "up": ("up_proj",),
    "down": ("down_proj",), "qv": ("q_proj", "v_proj"), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"), "all": ALL_LINEAR,
}


def minor_parts(model, rmax: int, device: str) -> dict[str, tuple]:
    """module -> (U_minor (out, rmax), S_minor (rmax,), Vh_minor (rmax, in), total energy) in float64."""
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ALL_LINEAR and ".layers." in name:
            w = mod.weight.detach().to(device, torch.float64)  # (out, in)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = min(rmax, s.numel())
            out[name] = (u[:, -r:], s[-r:], vh[-r:], float(s.square().sum()))
    return out


def layer_inputs(model, names, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input (T, in) of each named linear on one window of the general text (float64)."""
    mods, seen, hooks = dict(model.named_modules()), {}, []
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()[0].double())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def _truncate(mods, orig, parts, names, r) -> list[tuple[float, str]]:
    removed = []
    with torch.no_grad():
        for n in names:
            u, sv, vh, total = parts[n]
            k = min(r, sv.numel())
            low = (u[:, -k:] * sv[-k:]) @ vh[-k:]  # (out, in) the r minor components
            mods[n].weight.copy_((orig[n].double() - low.to(orig[n].device)).to(orig[n].dtype))
            removed.append((float(sv[-k:].square().sum()) / total, n))
    return removed


def output_share(parts, x: dict, names, r) -> list[float]:
    """Per weight ‖X (U_r S_r V_rᵀ)ᵀ‖_F / ‖X Wᵀ‖_F on real inputs X: how much of the layer's OUTPUT the truncation removes."""
    out = []
    for n in names:
        _, sv, vh, _ = parts[n]
        k = min(r, sv.numel())
        out.append(float(((x[n] @ vh[-k:].T) * sv[-k:]).norm() / x[n + ".out_norm"]))
    return out


def kasa_job(ctx, job: dict) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    s = ctx.settings
    ranks, sets = s["kasa_ranks"], s["kasa_sets"]
    model = AutoModelForCausalLM.from_pretrained(ctx.model, dtype=torch.float32).to(ctx.device).eval()
    parts = minor_parts(model, max(ranks), ctx.device)  # float64 SVD (cuSOLVER on CUDA: a worker has one CPU thread)
    mods = dict(model.named_modules())
    orig = {n: mods[n].weight.detach().clone() for n in parts}
    x = layer_inputs(model, list(parts), ctx.ev.ppl_data.input_ids[:1].to(ctx.device))
    for n in parts:
        x[n + ".out_norm"] = float((x[n] @ orig[n].double().T).norm())
    base_ppl = ctx.ev.ppl(model)
    rows = []
    for set_name in sets:
        names = [n for n in parts if n.rsplit(".", 1)[-1] in SETS[set_name]]
        for r in ranks:
            removed = _truncate(mods, orig, parts, names, r)
            ppl = ctx.ev.ppl(model)
            worst, share = max(removed), output_share(parts, x, names, r)
            rows.append({"set": set_name, "rank": r, "ppl": ppl, "ppl_ratio": ppl / base_ppl, "removed_energy_max": worst[0],
                         "removed_energy_max_layer": worst[1], "removed_energy_mean": sum(e for e, _ in removed) / len(removed),
                         "output_share_max": max(share), "output_share_max_layer": names[share.index(max(share))],
                         "output_share_mean": sum(share) / len(share)})
            with torch.no_grad():
                for n in names:
                    mods[n].weight.copy_(orig[n])
    return {"base_ppl": base_ppl, "rows": rows, "job_s": round(time.perf_counter() - t0, 2)}
