"""The MiLoRA-mixture latency claim, multi-tenant: a batch of many prompts, each with its own gates.

Arms, each a greedy `generate` of `latency_new_tokens` tokens (forced: min = max) for the same
left-padded batch of task prompts (the three tasks interleaved, so neighbouring rows are different
"tenants"), KV cache on, bf16 base on CUDA as in training:
  moe_cached          the design: each block routes the prompt once, per row; decoding reuses the gates;
                      an expert inactive for EVERY row of the batch is skipped
  moe_per_step        the routers rerun at every decoding step (same gates, so the same tokens)
  moe_per_step_dense  the same without skipping (no host sync per block and step)
  lora                a plain LoRA of the same rank on the same targets (one adapter for every row)
  base                the model without adapters (a merged LoRA: the floor)
  moe_per_token       (protocol v2, settings "latency_per_token") a TRUE per-token router (bench/eval/per_token.py):
                      every token routes itself, every expert computed, gates per token
The trained folders of the evaluation are used when they are there (moe and lora at the best lr,
all-linear, seed 0); otherwise untrained splits with small random B (recorded in `weights`).
Rounds are interleaved (one warm-up round), `latency_repeat` timed rounds, best and median.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch

from bench.eval.measure import autocast, load_plain_model
from bench.eval.per_token import PerToken


def _prompts(ctx, n: int) -> list[str]:
    rows = [ctx.ev.data[t]["test"] for t in ctx.settings["tasks"]]
    mixed = [r["prompt"] for group in zip(*rows) for r in group]
    return (mixed * (n // max(1, len(mixed)) + 1))[:n]


def _load(ctx, path: Path, random_b: bool):
    from surgeon.runtime import load_split

    sm = load_split(path, dtype=torch.bfloat16 if ctx.device.startswith("cuda") else torch.float32, device=ctx.device, trainable=False)
    if random_b:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in sm.modules.values():
                m.lora_B.copy_((torch.randn(m.lora_B.shape, generator=g) * 0.02).to(m.lora_B.device))
    return sm.model.eval()


def _folders(ctx, job) -> tuple[Path, Path, str]:
    from bench.eval.jobs import make_split

    moe, lora = (ctx.work / "runs" / job[k] if job.get(k) else None for k in ("moe_run", "lora_run"))
    if moe and lora and (moe / "surgeon.json").exists() and (lora / "surgeon.json").exists():
        return moe, lora, "trained (best lr, all-linear, seed 0)"
    where = ctx.work / "splits"
    return make_split(ctx, ctx.model, "moe", "all", 0, where), make_split(ctx, ctx.model, "lora", "all", 0, where), "untrained splits, B ~ N(0, 0.02²)"


def latency_job(ctx, job: dict) -> dict:
    s, dev = ctx.settings, ctx.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    moe_dir, lora_dir, weights = _folders(ctx, job)
    random_b = weights.startswith("untrained")
    moe, lora, base = _load(ctx, moe_dir, random_b), _load(ctx, lora_dir, random_b), load_plain_model(ctx.model, dev)
    routing = moe.surgeon_routing
    new, tok = s["latency_new_tokens"], ctx.ev.tok

    def arm(name):
        if name.startswith("moe"):
            if per_step:
                routing.mode = "per_step" if "per_step" in name else "cached"
                for r in routing.routers.values():
                    r.skip_inactive = not name.endswith("dense")
            return moe
        return lora if name == "lora" else base

    per_step = hasattr(routing, "mode") and all(hasattr(r, "skip_inactive") for r in routing.routers.values())  # runtime internals
    names = ("moe_cached", "moe_per_step", "moe_per_step_dense", "lora", "base") if per_step else ("moe_cached", "lora", "base")
    names += ("moe_per_token",) if s.get("latency_per_token") else ()  # protocol v2: a true per-token router
    out = {"weights": weights, "new_tokens": new, "repeat": s["latency_repeat"], "device": _device_name(dev), "batches": {}}
    for b in s["latency_batches"]:
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) if tok.chat_template else p
                 for p in _prompts(ctx, b)]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template).to(dev)
        times, toks, active = {n: [] for n in names}, {}, None
        for i in range(s["latency_repeat"] + 1):
            for n in names:
                model = arm("moe_cached" if n == "moe_per_token" else n)
                sync()
                t0 = time.perf_counter()
                with torch.no_grad(), autocast(dev), (PerToken(moe) if n == "moe_per_token" else contextlib.nullcontext()):
                    toks[n] = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
                sync()
                if i:
                    times[n].append(time.perf_counter() - t0)
                if n == "moe_cached" and active is None:
                    active = statistics.mean(sum(r.active) / r.n_experts for r in routing.routers.values())
        out["batches"][str(b)] = {
            "prompt_len": int(enc["input_ids"].shape[1]), "active_expert_share": active,
            "same_tokens_cached_vs_per_step": bool(torch.equal(toks["moe_cached"], toks["moe_per_step"])) if per_step else None,
            **{n: {"best_s": min(t), "median_s": statistics.median(t), "ms_per_step": 1e3 * min(t) / new,
                   "tokens_per_s": b * new / min(t)} for n, t in times.items()},
        }
    if per_step:
        routing.mode = "cached"
    return out


def _device_name(dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    import platform

    return platform.processor() or "cpu"
