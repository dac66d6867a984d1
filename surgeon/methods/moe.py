"""moe: the MiLoRA mixture (Zhang, Zhao, Chen, Tian, Zheng, Zhu, "MiLoRA: Efficient Mixture of
Low-Rank Adaptation for Large Language Models Fine-tuning", EMNLP Findings 2024).

    surgeon split --method moe MODEL --rank 8 --out moe-split [--top-k 2] [--pooling attention]
    surgeon absorb moe-split --out merged --fixed-gates calib.jsonl     # or gates.json

Every targeted linear of a transformer block is one LoRA expert (Llama: q, k, v, o, gate, up, down);
one prompt-aware router per block gates them, computed once from the prompt and reused for every
generated token (the router, the gate cache and the balancing loss: moe_runtime.py).

Expert initialisation, the decision (METHODS.md leaves it open: "minor components like MiLoRA, or
plain LoRA"): the residual is W itself, unchanged to the bit, and each expert starts silent:
    A_e = Vh[-r:]        (r, in)   the r minor right singular vectors of W, orthonormal rows
    B_e = 0              (out, r)
so the expert's input side reads the minor subspace (the MiLoRA idea: adapt the directions that hold
the least pretrained knowledge) while its output is exactly zero until trained (PEFT's LoRA rule,
B = 0). Why not the full MiLoRA split (W_res = W − s·B₀A₀, both factors √σ-scaled)? Because gating
multiplies the expert: the untrained model would be W_res + g_e·s·B₀A₀ ≠ W for any gate g_e < 1, and
with top-k < E an inactive expert would delete its minor components from the layer. Rescaling the
gates so that the untrained router gives 1 works only for dense routing (k = E), where the Switch
balancing loss is constant. With B = 0 the untrained forward equals the original for every k and
every router state, and fixed-gate folding is plainly W' = W + Σ_e g_e·s·(B_eA_e − B₀A₀) with B₀ = 0.
A is unscaled (norm-1 rows, as PEFT's MiCA and NuSA take singular vectors), close to LoRA's
Kaiming-uniform A (row norm ≈ 0.58); √σ scaling would make A tiny (σ_min ~ 1e-3) and B learn slowly.
This is not MiCA (PEFT): MiCA freezes the minor LEFT singular vectors as B and trains A from 0.

Top-k default k = 2 (`--top-k`, 0 = all experts): the paper's text gives no consistent k. k < E is
what makes "inactive experts are skipped" (the latency claim) and the balancing loss meaningful
(f_e ≡ 1 with k = E); 2 is the usual LoRA-MoE choice (MixLoRA, Mixtral's top-2), and keeps two of a
Llama block's seven modules adapted per prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from surgeon.errors import UsageError
from surgeon.linalg import Triplets
from surgeon.methods.base import Method, MethodConfig, SplitResult
from surgeon.methods.moe_runtime import (
    POOLINGS,
    ExpertLinear,
    Router,
    Routing,
    init_router,
    load_balancing_loss,
)

REFUSAL = (
    "a moe split routes every prompt to its own mixture of experts (the gates are computed from the prompt at run "
    "time), so it cannot be folded into one set of static weights. To fold it with fixed gates anyway, pass "
    "--fixed-gates FILE: a .jsonl of calibration prompts (one {{\"prompt\": ...}} or {{\"text\": ...}} per line; the "
    "gates are averaged over them) or a .json of per-block gates {{\"{block}\": [g_1, ..., g_E]}} in the order of "
    "surgeon.json's \"blocks\"."
)


class MoE(Method):
    name = "moe"
    which = "minor"
    lora_shaped = False  # gated experts are not a PEFT LoRA; factors and routers go to surgeon.factors.safetensors
    per_block = True
    prompt_dependent = True
    options = ("moe_top_k", "moe_pooling")
    summary = "every targeted linear of a block is a LoRA expert (A from the minor singular vectors, B = 0), gated per prompt by one router per block"
    notes = {
        "experts": "residual = W unchanged; A = minor right singular vectors Vh[-r:] (orthonormal), B = 0: "
        "untrained forward == original for any gates; delta = gate * s * B A",
        "router": "pooled block-input hidden states of the prompt -> RMS-normalise -> rational activation "
        "P3/(1+|Q2|) (Boulle et al. ReLU init) -> linear -> softmax -> top-k (gates not renormalised)",
        "gates": "computed once from the prompt (first forward of a generate call, or any forward without KV "
        "cache) and reused for every generated token",
        "load_balancing": "lambda=1e-2 * mean over blocks of E * sum_e f_e P_e (Switch)",
    }

    def check(self, cfg: MethodConfig) -> None:
        if cfg.moe_top_k < 0:
            raise UsageError(f"--top-k must be 0 (all experts) or positive, got {cfg.moe_top_k}.")
        if cfg.moe_pooling not in POOLINGS:
            raise UsageError(f"--pooling {cfg.moe_pooling!r}: choose {', '.join(POOLINGS)}.")

    def factor_shapes(self, out_features, in_features, cfg):
        return {"lora_A": (cfg.rank, in_features), "lora_B": (out_features, cfg.rank)}

    def split(self, w: torch.Tensor, t: Triplets, cfg: MethodConfig) -> SplitResult:
        a = t.Vh.to(torch.float32)  # (r, in) minor right singular vectors
        b = torch.zeros(w.shape[0], t.Vh.shape[0], dtype=torch.float32, device=w.device)  # (out, r)
        total = t.energy
        stats = {
            "factor_energy": 0.0,  # the experts start silent: they hold none of W
            "expert_subspace_energy": float(t.S.square().sum()) / total if total > 0 else 0.0,
        }
        return SplitResult(w, {"lora_A": a, "lora_B": b}, stats)  # residual: W itself

    def delta(self, factors, cfg):
        """The UNGATED update s·B A (out, in); absorb multiplies it by the expert's fixed gate."""
        return cfg.scale * (factors["lora_B"].double() @ factors["lora_A"].double())  # (out, in)

    def runtime(self, base, factors, cfg, transposed):
        return ExpertLinear(base, factors["lora_A"], factors["lora_B"], cfg.scale, transposed)

    def block_shapes(self, hidden, n_experts, cfg):
        return {k: tuple(v.shape) for k, v in init_router(0, hidden, n_experts).items()}

    def init_block(self, index, hidden, n_experts, cfg):
        return init_router(index, hidden, n_experts)

    def attach(self, model, modules, blocks, cfg, manifest):
        routers: dict[str, Router] = {}
        for name, info in manifest["blocks"].items():
            router = Router(blocks[name], cfg.moe_top_k, cfg.moe_pooling)
            model.get_submodule(name).add_module("surgeon_router", router)
            for j, module in enumerate(info["experts"]):
                modules[module].bind(router, j)
            routers[name] = router
        model.surgeon_routing = Routing(model, routers)
        return routers

    def regularizer(self, modules):
        routers = {id(m._router): m._router for m in modules if getattr(m, "_router", None) is not None}
        return load_balancing_loss(routers.values())

    # --- absorb with fixed gates ------------------------------------------------------------------
    def fixed_gates(self, split, path, calibrate=None) -> tuple[dict[str, float], dict]:
        blocks = split.manifest["blocks"]
        if path is None:
            raise UsageError(REFUSAL.format(block=next(iter(blocks))))
        path = Path(path)
        if not path.exists():
            raise UsageError(f"--fixed-gates {path}: no such file.")
        if path.suffix == ".jsonl":
            gates, n = calibrate(split.path, path)
            record = {"from": str(path), "kind": "calibration prompts (gates averaged)", "prompts": n}
        else:
            try:
                raw = json.loads(path.read_text())
            except (ValueError, RecursionError) as e:
                raise UsageError(f"--fixed-gates {path} is not JSON ({e}); give a .json of per-block gates or a .jsonl of prompts.") from e
            gates = _parse_gate_json(raw, blocks, path)
            record = {"from": str(path), "kind": "per-block gates"}
        record["gates"] = gates
        mult = {m: gates[b][j] for b, info in blocks.items() for j, m in enumerate(info["experts"])}
        return mult, record


def _parse_gate_json(raw, blocks: dict, path: Path) -> dict[str, list[float]]:
    if not isinstance(raw, dict):
        raise UsageError(f"--fixed-gates {path}: expected an object {{block: [gates]}}.")
    unknown = sorted(set(raw) - set(blocks))
    if unknown:
        raise UsageError(f"--fixed-gates {path}: unknown block(s) {', '.join(unknown[:3])}; blocks are like {next(iter(blocks))}.")
    out = {}
    for b, info in blocks.items():
        if b not in raw:
            raise UsageError(f"--fixed-gates {path}: no gates for block {b}; give every block of surgeon.json's \"blocks\".")
        g = raw[b]
        experts = info["experts"]
        if isinstance(g, dict):  # {expert module (full, or relative to the block, or its last name): gate}
            by = {}
            for k, v in g.items():
                hit = [m for m in experts if m == k or m == f"{b}.{k}" or m.rsplit(".", 1)[-1] == k]
                if len(hit) != 1:
                    raise UsageError(f"--fixed-gates {path}: {b}: {k!r} names {len(hit)} experts; experts are {experts}.")
                by[hit[0]] = v
            g = [by.get(m, 0.0) for m in experts]
        if not isinstance(g, list) or len(g) != len(experts):
            raise UsageError(f"--fixed-gates {path}: {b} has {len(experts)} experts ({', '.join(experts)}); give that many gates.")
        try:
            g = [float(v) for v in g]
        except (TypeError, ValueError) as e:
            raise UsageError(f"--fixed-gates {path}: {b}: gates must be numbers.") from e
        if not all(torch.isfinite(torch.tensor(g))):
            raise UsageError(f"--fixed-gates {path}: {b}: gates must be finite.")
        out[b] = g
    return out


