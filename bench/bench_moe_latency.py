"""Latency of moe generation: gates routed once per prompt and cached vs recomputed at every step.

    python bench/bench_moe_latency.py --model smollm2 --device cuda [--dtype bfloat16] [--batch 1]
    python bench/bench_moe_latency.py --model tiny --device cpu

One moe split (all-linear, --rank, --top-k) is loaded once; greedy `generate` of --new-tokens tokens
after a random --prompt-len prompt (KV cache on) is timed in three routing modes on the same model:
  * cached:   each block's router runs once, on the prompt; every decoding step reuses the gates
              (the MiLoRA-mixture design);
  * per_step: every decoding step reruns each block's router on the prompt's hidden states (kept),
              the cost that caching saves (same gates, so the tokens must be identical); skipping
              the inactive experts needs the gates on the host: one device sync per block and step;
  * per_step_dense: the same without skipping (every expert computed, gate 0 or not): no sync,
              more expert work; the fairer per-step baseline on a GPU;
  * fixed:    gates pinned, no router at all: the floor.
Expert B factors are set to small random values so that the gates matter to the tokens. The modes
run interleaved (round robin, one warm-up round), --repeat rounds, best and median per mode, with
device synchronisation. Separately, one router call on the kept prompt states is timed alone
(router_ms_per_call): per_step costs blocks x new_tokens such calls more than cached. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def model_dir(name: str) -> Path:
    if name == "tiny":
        return ROOT / "fixtures" / "tiny-llama"
    if name == "smollm2":
        from conftest import convert_smollm2, smollm2_cache

        d = smollm2_cache()
        d.parent.mkdir(parents=True, exist_ok=True)
        return convert_smollm2(d)
    return Path(name)


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="tiny, smollm2 or a local checkpoint folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    return ap.parse_args()


def build(args, dev: torch.device):
    """The moe split of the model, loaded, with random B (so experts change the output) and prompts."""
    from surgeon.commands.split import SplitOptions, split
    from surgeon.runtime import load_split

    with tempfile.TemporaryDirectory() as tmp:
        split(str(model_dir(args.model)), Path(tmp) / "moe", SplitOptions(method="moe", rank=args.rank, top_k=args.top_k, spectra=False, device=args.device))
        sm = load_split(Path(tmp) / "moe", dtype=getattr(torch, args.dtype), device=dev, trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in sm.modules.values():
            m.lora_B.copy_((torch.randn(m.lora_B.shape, generator=g) * 0.02).to(dev))
    ids = torch.randint(3, sm.model.config.vocab_size, (args.batch, args.prompt_len), generator=g).to(dev)
    return sm.model.eval(), sm.model.surgeon_routing, ids


def time_modes(args, model, routing, ids, sync) -> tuple[dict, bool]:
    """Generation time per routing mode (best and median of --repeat after a warm-up round), and
    whether every mode produced the same tokens."""
    calls = []
    for r in routing.routers.values():
        r.register_forward_hook(lambda *a: calls.append(1))

    def run(mode: str):
        routing.mode = mode
        calls.clear()
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0, out, len(calls)

    modes = ("cached", "per_step", "per_step_dense", "fixed")
    times: dict[str, list[float]] = {m: [] for m in modes}
    tokens, n_calls = {}, {}
    run("per_step")  # warms up
    pinned = {b: r.gates.clone() for b, r in routing.routers.items()}  # this prompt's gates (B, E)
    for i in range(args.repeat + 1):  # round 0 is the warm-up
        for mode in modes:
            for r in routing.routers.values():
                r.skip_inactive = mode != "per_step_dense"
            if mode == "fixed":
                routing.fix(pinned)
            dt, tokens[mode], n_calls[mode] = run({"fixed": "cached", "per_step_dense": "per_step"}.get(mode, mode))
            routing.unfix() if mode == "fixed" else None
            if i:
                times[mode].append(dt)
    run("per_step")  # leaves the prompt states for time_router
    for r in routing.routers.values():
        r.skip_inactive = True
    results = {m: {"best_s": round(min(t), 4), "median_s": round(statistics.median(t), 4),
                   "ms_per_token": round(1e3 * min(t) / args.new_tokens, 3), "router_calls": n_calls[m]} for m, t in times.items()}
    return results, all(torch.equal(tokens["cached"], t) for t in tokens.values())


def time_router(routing, dev, sync) -> float:
    """ms of one block's routing on the last prompt's states (host read of the active set included)."""
    r0 = next(iter(routing.routers.values()))
    states, pmask = r0.prompt_states, torch.ones(r0.prompt_states.shape[:2], dtype=torch.bool, device=dev)
    with torch.no_grad():
        for _ in range(5):
            r0.route(states, pmask)
        sync()
        t0 = time.perf_counter()
        for _ in range(200):
            r0.route(states, pmask)
        sync()
    return 1e3 * (time.perf_counter() - t0) / 200


def main() -> None:
    args = parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model, routing, ids = build(args, dev)
    results, same = time_modes(args, model, routing, ids, sync)
    router_ms = time_router(routing, dev, sync)
    c, p, pd = results["cached"]["best_s"], results["per_step"]["best_s"], results["per_step_dense"]["best_s"]
    print(json.dumps({
        "bench": "moe_latency", "model": str(args.model), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype, "rank": args.rank, "top_k": args.top_k, "blocks": len(routing.routers),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeat": args.repeat,
        "torch": torch.__version__, "threads": torch.get_num_threads(), **results,
        "saving_vs_per_step": round(1 - c / p, 4),
        "saving_vs_per_step_dense": round(1 - c / pd, 4),
        "router_ms_per_call": round(router_ms, 4),
        "router_ms_saved_per_token": round(router_ms * len(routing.routers), 4),
        "same_tokens": same,
    }))


if __name__ == "__main__":
    main()
