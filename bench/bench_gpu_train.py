"""surgeon train vs PEFT LoRA on one GPU: tokens/s, peak memory, loss after 100 steps, within a time budget.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python3 bench/bench_gpu_train.py --out $OUT            # H200, ≤ ~3 min
    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/bench_gpu_train.py --tiny --out /tmp/b   # CPU plumbing check

No files and no Hub: each model is built from a config with random weights (seeded) in bf16 on the
device, saved, and split with milora r=--rank (all-linear) on the device:
  smollm2  SmolLM2-135M-shaped Llama: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152, tied
  1b       Llama-3.2-1B-shaped: hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256, tied
Data: rows of --seq-len tokens from a fixed random Markov chain (8192 tokens, 4 successors each), so
the loss can fall; every run sees the same rows in the same order (surgeon_train's _Order).
Runs ("parts"), in priority order, each bounded in time:
  peft       PEFT LoRA r=--rank all-linear, default init, on the bf16 base: a plain loop of
             model(input_ids, labels=...).loss (transformers' loss on full logits), bf16 autocast,
             fused AdamW, warm-up + cosine, clipping: what a PEFT user runs
  surgeon    surgeon_train.train with its defaults on CUDA (liger loss and kernels when installed)
  surgeon-nokernels / -compile / -cce / -torchloss    variants on smollm2 (30 steps): --kernels none;
             --compile --kernels none; --loss cce; --loss chunked --kernels none (the torch fallback)
  profile    torch.profiler's top CUDA kernels over 3 steps of surgeon and of peft (smollm2)
Same lr, schedule, clipping, rows for all. tokens/s over the steps after the first --skip; peak
memory = torch.cuda.max_memory_allocated over the part (model load included). All parts run in one
worker process (one import); a part that raises is recorded and the next runs; a worker that dies
is restarted on the parts left. Results: OUT/results.jsonl (a line per part, as it finishes),
OUT/bench_gpu_train.json, OUT/profile_*.txt, OUT/log.txt; the last lines printed are the summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODELS = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=10000.0),
    "tiny1b": dict(vocab_size=768, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, rope_theta=10000.0),
}
VARIANTS = {"surgeon": {}, "surgeon-nokernels": {"kernels": "none"}, "surgeon-torchloss": {"loss": "chunked", "kernels": "none"},
            "surgeon-compile": {"compile": True, "kernels": "none"}, "surgeon-cce": {"loss": "cce"}}


def _plan(tiny: bool) -> list[dict]:
    big, small = ("tiny", "tiny1b") if tiny else ("smollm2", "1b")
    full, short = (8, 6) if tiny else (100, 30)
    parts = [dict(model=big, impl="peft", steps=full), dict(model=big, impl="surgeon", steps=full),
             dict(model=small, impl="peft", steps=full), dict(model=small, impl="surgeon", steps=full)]
    parts += [dict(model=big, impl="surgeon-nokernels", steps=short), dict(model=big, impl="surgeon-compile", steps=short, limit=75)]
    parts += [dict(model=big, impl=v, steps=short) for v in ("surgeon-cce", "surgeon-torchloss")]
    parts += [dict(model=big, impl="profile-surgeon", steps=3), dict(model=big, impl="profile-peft", steps=3)]
    return [p | {"id": f"{p['model']}:{p['impl']}"} for p in parts]


# --- worker: everything that imports torch ---------------------------------------------------------
class _Stop(Exception):
    pass


def _build(name: str, work: Path, rank: int, device: str) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from surgeon.commands.split import SplitOptions, split

    base, sp = work / f"{name}-base", work / f"{name}-milora-r{rank}"
    if (sp / "surgeon.json").exists():
        return base, sp
    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(base)
    del m
    split(str(base), sp, SplitOptions(method="milora", rank=rank, device=device, spectra=False))
    return base, sp


def _data(steps: int, batch: int, seq_len: int, vocab: int):
    import torch
    from surgeon_train.data import IGNORE, Packed

    g = torch.Generator().manual_seed(1)
    k = min(8192, vocab - 3)
    succ = torch.randint(3, 3 + k, (3 + k, 4), generator=g)  # (k, 4) successors of each token
    n = steps * batch
    ids = torch.empty(n, seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(3, 3 + k, (n,), generator=g)
    pick = torch.randint(0, 4, (n, seq_len), generator=g)
    for j in range(1, seq_len):
        ids[:, j] = succ[ids[:, j - 1], pick[:, j]]
    labels = ids.clone()
    labels[:, 0] = IGNORE
    return Packed(ids, labels)


def _peft(base: Path, data, a, device, steps: int, on_step) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from surgeon_train.loop import _Order, schedule
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, a.warmup, 0.0))
    order = _Order(len(data), 0)
    for step in range(steps):
        t0 = time.perf_counter()
        rows = order.rows(step * a.batch_size, a.batch_size)
        x, y = data.input_ids[rows].to(device, non_blocking=True), data.labels[rows].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        on_step({"step": step + 1, "loss": loss.item(), "step_time_s": time.perf_counter() - t0})
    return {"trainable": sum(p.numel() for p in params)}


def _surgeon(sp: Path, data, a, device, steps: int, impl: str, on_step, work: Path) -> dict:
    from surgeon_train import TrainOptions, train

    opts = TrainOptions(steps=steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, warmup_steps=a.warmup, device=str(device),
                        overwrite=True, **VARIANTS[impl.removeprefix("profile-") if impl.startswith("profile-") else impl])
    s = train(sp, data, work / "trained", opts, callback=lambda e, i: e == "step" and on_step(i))
    return {"trainable": s["plan"]["trainable"], "setup": s["setup"], "micro_batch": s["micro_batch"]}


def run_part(p: dict, a, work: Path) -> dict:
    import torch

    if os.environ.get("BENCH_GPU_TRAIN_CRASH") == p["id"]:  # to test that a dying worker loses only its part
        os._exit(9)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    base, sp = _build(p["model"], work, a.rank, a.device)
    data = _data(100, a.batch_size, a.seq_len, MODELS[p["model"]]["vocab_size"])  # the same rows for every part of a model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    steps, deadline = [], time.perf_counter() + p.get("limit", a.part_limit)

    def on_step(info):
        steps.append({"step": info["step"], "loss": round(float(info["loss"]), 5), "t": round(info["step_time_s"], 5)})
        if time.perf_counter() > deadline:
            raise _Stop

    prof = None
    if p["impl"].startswith("profile-"):
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
        prof.__enter__()
    extra, stopped = {}, False
    try:
        if p["impl"].endswith("peft"):
            extra = _peft(base, data, a, device, p["steps"], on_step)
        else:
            extra = _surgeon(sp, data, a, device, p["steps"], p["impl"], on_step, work)
    except _Stop:
        stopped = True
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            (a.out / f"profile_{p['model']}_{p['impl']}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    timed = [s["t"] for s in steps[a.skip :]] or [s["t"] for s in steps]
    tps = a.batch_size * a.seq_len * len(timed) / max(sum(timed), 1e-9)
    return {**p, **extra, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "steps_done": len(steps), "stopped_at_time_limit": stopped, "tokens_per_s": round(tps, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "loss_curve": [s["loss"] for s in steps][:: max(1, len(steps) // 20)]}


def worker(a) -> None:
    import torch

    todo = [p for p in _plan(a.tiny) if p["id"] in a.parts.split(",")]
    work = Path(a.work)
    for p in todo:
        t0 = time.perf_counter()
        if t0 > a.deadline_perf:
            res = {**p, "skipped": "time budget spent"}
        else:
            try:
                res = run_part(p, a, work)
            except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
                res = {**p, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400],
                       "traceback": traceback.format_exc()[-2000:]}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(a.results, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {p['id']}: " + json.dumps({k: v for k, v in res.items() if k not in ("loss_curve", "traceback")}), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- driver: no torch import, survives a dying worker -----------------------------------------------
def drive(a) -> dict:
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.jsonl"
    results.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-train-"))
    end = time.time() + a.budget
    todo = [p["id"] for p in _plan(a.tiny)]
    with open(a.out / "log.txt", "a") as log:
        while todo and time.time() < end:
            cmd = [sys.executable, __file__, "--worker", "--parts", ",".join(todo), "--work", str(work), "--results", str(results),
                   "--deadline", str(end)] + [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
                                              ("device", "rank", "batch_size", "seq_len", "lr", "warmup", "skip", "part_limit")]
            cmd += ["--out", str(a.out)] + (["--tiny"] if a.tiny else [])
            try:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=max(10, end - time.time() + 30), env=os.environ | {"PYTHONUNBUFFERED": "1"})
            except subprocess.TimeoutExpired:
                log.write("worker killed at the time budget\n")
            done = [json.loads(x)["id"] for x in results.read_text().splitlines()] if results.exists() else []
            todo = [t for t in todo if t not in done]
            if todo:  # the worker died (or was killed) inside todo[0]: record it, go on with the rest
                with open(results, "a") as f:
                    f.write(json.dumps({"id": todo[0], "error": "the worker process died or ran out of time (see log.txt)"}) + "\n")
                todo = todo[1:]
    rows = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())} if results.exists() else {}
    summary = {"budget_s": a.budget, "batch_size": a.batch_size, "seq_len": a.seq_len, "rank": a.rank, "lr": a.lr, "parts": rows,
               "not_run": [t for t in todo]}
    lines = []
    pairs = (("tiny", "tiny"), ("tiny1b", "tiny-1B")) if a.tiny else (("smollm2", "SmolLM2-shaped"), ("1b", "1B-shaped"))
    for model, label in pairs:
        s, p = rows.get(f"{model}:surgeon", {}), rows.get(f"{model}:peft", {})
        if s.get("tokens_per_s") and p.get("tokens_per_s"):
            mem = f"{s['peak_mem_gib'] / p['peak_mem_gib']:.2f}x" if s.get("peak_mem_gib") and p.get("peak_mem_gib") else "n/a"
            lines.append(f"train, {a.gpu_name}, {label}, surgeon vs PEFT LoRA: {s['tokens_per_s'] / p['tokens_per_s']:.2f}x tokens/s, {mem} memory")
            summary[f"{model}_ratio"] = {"tokens_per_s": s["tokens_per_s"] / p["tokens_per_s"], "memory": mem,
                                         "loss_after": {"surgeon": s.get("last_loss"), "peft": p.get("last_loss"), "steps": s.get("steps_done")}}
    summary["lines"] = lines
    (a.out / "bench_gpu_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in rows.values():
        print(json.dumps({k: v for k, v in r.items() if k not in ("loss_curve", "traceback")}))
    for ln in lines:
        print(ln)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-gpu-train")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models, few steps (a CPU check of the plumbing)")
    ap.add_argument("--budget", type=float, default=170, help="seconds for everything; later parts are skipped after it")
    ap.add_argument("--part-limit", type=float, default=45, help="seconds per part; a part stops at its first step past it")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s")
    ap.add_argument("--gpu-name", default="H200")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--parts", default="")
    ap.add_argument("--work", default="")
    ap.add_argument("--results", default="")
    ap.add_argument("--deadline", type=float, default=0.0)
    a = ap.parse_args()
    if a.worker:
        a.deadline_perf = time.perf_counter() + (a.deadline - time.time())
        worker(a)
    else:
        drive(a)


if __name__ == "__main__":
    main()
