"""The parts bench/bench_gpu_train.py runs, one at a time, in its worker process (everything that imports torch).

A part is {"id": "MODEL:IMPL", "model", "impl", "steps", ["limit"]}; IMPL is one of
  peft              PEFT LoRA r=rank all-linear, default init (B = 0), on the bf16 base: what a PEFT user runs
  peft-split        PEFT on surgeon's residual with surgeon's split factors loaded as its LoRA adapter
                    (PeftModel.from_pretrained(load_residual_model(split), split)): the same model as surgeon's,
                    so the two loss curves are comparable step by step
  surgeon           surgeon_train.train with its defaults
  surgeon-VARIANT   the same with VARIANTS[VARIANT]'s options
  profile-peft / profile-surgeon      torch.profiler over one steady step (after compile), top kernels
  wall300-peft / wall300-surgeon      300 real steps, wall clock from load to the last step
Every part records per-step losses and time stamps (the callback's wall clock, so tokens/s counts
everything between steps: logging, the optimizer, host syncs), the set-up (load, memory probe) and
the warm-up (first --skip steps: compile) separately, peak memory, and for surgeon torch._dynamo's
counters (graphs compiled, recompiles, graph breaks).
"""

from __future__ import annotations

import gc
import os
import time
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


def variants(liger: bool) -> dict[str, dict]:
    """TrainOptions overrides of each surgeon variant; "v0" is the default before issue 28 (liger loss and
    kernels when installed, no compile), pinned so that it stays measurable after the default changed."""
    return {
        "surgeon": {},
        "surgeon-v0": {"compile": False, "loss": "liger" if liger else "chunked", "kernels": "liger" if liger else "none"},
        "surgeon-eager-chunked": {"compile": False, "kernels": "none", "loss": "chunked"},
        "surgeon-eager-liger": {"compile": False, "kernels": "none", "loss": "liger"},
        "surgeon-compile-chunked": {"compile": True, "kernels": "none", "loss": "chunked", "compile_loss": False},
        "surgeon-compile-closs": {"compile": True, "kernels": "none", "loss": "chunked", "compile_loss": True},
        "surgeon-compile-liger": {"compile": True, "kernels": "none", "loss": "liger"},
        "surgeon-compile-cce": {"compile": True, "kernels": "none", "loss": "cce"},
        "surgeon-compile-ligerkernels": {"compile": True, "kernels": "liger", "loss": "chunked"},
    }


class Stop(Exception):
    """A part ran past its time limit: it ends at that step, its numbers so far are kept."""


def build(name: str, work: Path, rank: int, device: str) -> tuple[Path, Path]:
    """A random-weight bf16 model of the shape, saved, and its milora split (both cached in work)."""
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


def data(rows: int, seq_len: int, vocab: int):
    """Rows from a fixed random Markov chain (8192 tokens, 4 successors each): the loss can fall."""
    import torch
    from surgeon_train.data import IGNORE, Packed

    g = torch.Generator().manual_seed(1)
    k = min(8192, vocab - 3)
    succ = torch.randint(3, 3 + k, (3 + k, 4), generator=g)  # (k, 4) successors of each token
    ids = torch.empty(rows, seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(3, 3 + k, (rows,), generator=g)
    pick = torch.randint(0, 4, (rows, seq_len), generator=g)
    for j in range(1, seq_len):
        ids[:, j] = succ[ids[:, j - 1], pick[:, j]]
    labels = ids.clone()
    labels[:, 0] = IGNORE
    return Packed(ids, labels)


def peft(base: Path, sp: Path, rows, a, device, steps: int, init: str, on_step, mark) -> dict:
    """A plain PEFT loop: model(input_ids, labels).loss (transformers' loss on full logits), bf16 autocast,
    fused AdamW, the same warm-up + cosine and clipping as surgeon's, loss.item() each step."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from surgeon_train.loop import _Order, schedule
    from transformers import AutoModelForCausalLM

    from surgeon.runtime import load_residual_model

    torch.manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    if init == "split":
        model = PeftModel.from_pretrained(load_residual_model(sp, dtype=dt).to(device), sp, is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dt).to(device)
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, a.warmup, 0.0))
    order = _Order(len(rows), 0)
    mark("start")
    for step in range(steps):
        r = order.rows(step * a.batch_size, a.batch_size)
        x, y = rows.input_ids[r].to(device, non_blocking=True), rows.labels[r].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        on_step({"step": step + 1, "loss": loss.item()})
    return {"trainable": sum(p.numel() for p in params), "params_dtype": str(params[0].dtype)}


def surgeon(sp: Path, rows, a, device, steps: int, overrides: dict, on_step, mark, work: Path) -> dict:
    from surgeon_train import TrainOptions, train

    extra = {"compile_backend": a.compile_backend} if a.compile_backend != "inductor" else {}
    opts = TrainOptions(steps=steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, warmup_steps=a.warmup, device=str(device),
                        overwrite=True, **extra, **overrides)

    def cb(event, info):
        if event == "start":
            mark("start")
        elif event == "step":
            on_step(info)

    s = train(sp, rows, work / "trained", opts, callback=cb)
    return {"trainable": s["plan"]["trainable"], "setup": s["setup"], "micro_batch": s["micro_batch"]}


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    keep = ("stats", "recompiles", "graph_break", "frames", "unimplemented")
    return {k: {str(n)[:160]: int(v) for n, v in list(counters[k].items())[:20]} for k in keep if k in counters and counters[k]}


def _reset_dynamo() -> None:
    try:
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    except (ImportError, AttributeError):
        pass


def timings(stamps: list[float], t_start: float | None, t0: float, skip: int, tokens_per_step: int) -> dict:
    """From the wall-clock stamps of each step's end: set-up, warm-up (first `skip` steps), the steady
    step (steps after `skip`, the last left out: it saves), tokens/s, and 300 steps extrapolated."""
    if not stamps:
        return {}
    start = t_start if t_start is not None else t0
    ends = [start, *stamps]
    durs = [b - e for e, b in zip(ends, ends[1:])]  # (n,) seconds of each step
    k = min(skip, max(0, len(durs) - 2))
    steady = durs[k:-1] if len(durs) - k >= 2 else durs[k:]
    step_s = sum(steady) / max(1, len(steady))
    warm_s = sum(durs[:k]) - k * step_s  # what the first steps cost above a steady step: compile, autotune, allocator
    setup_s = start - t0
    est300 = setup_s + sum(durs[:k]) + (300 - k - 1) * step_s + durs[-1]
    return {"setup_s": round(setup_s, 3), "first_steps_s": [round(x, 4) for x in durs[: max(k, 1)]], "warmup_extra_s": round(warm_s, 3),
            "step_s": round(step_s, 5), "tokens_per_s": round(tokens_per_step / max(step_s, 1e-9), 1),
            "steps_timed": len(steady), "last_step_s": round(durs[-1], 4), "wall_300_extrapolated_s": round(est300, 2)}


def _profiler(cuda: bool, steps: int):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=acts, schedule=torch.profiler.schedule(wait=max(0, steps - 3), warmup=1, active=1))  # the step before the last (which saves)


def _profile_out(prof, p: dict, a, cuda: bool) -> dict:
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    ev = prof.key_averages()
    (a.out / f"profile_{p['model']}_{p['impl']}.txt").write_text(ev.table(sort_by=key, row_limit=40))
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(ev, key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in ev)
    return {"profile_total_self_us": round(total, 1),
            "profile_top": [[e.key[:90], round(getattr(e, attr, 0), 1), e.count] for e in rows[:15]]}


def run_part(p: dict, a, work: Path) -> dict:
    import torch
    from surgeon_train.loss import available

    if os.environ.get("BENCH_GPU_TRAIN_CRASH") == p["id"]:  # to test that a dying worker loses only its part
        os._exit(9)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    tb = time.perf_counter()
    base, sp = build(p["model"], work, a.rank, a.device)
    build_s = time.perf_counter() - tb
    rows = data(100 * a.batch_size, a.seq_len, MODELS[p["model"]]["vocab_size"])  # the same rows for every part of a model
    gc.collect()
    _reset_dynamo()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    impl = p["impl"]
    kind = impl.split("-", 1)[1] if impl.startswith(("profile-", "wall300-")) else impl
    steps, stamps, marks = [], [], {}
    t0 = time.perf_counter()
    deadline = t0 + p.get("limit", a.part_limit)
    prof = _profiler(cuda, p["steps"]) if impl.startswith("profile-") else None

    def on_step(info):
        stamps.append(time.perf_counter())
        steps.append({"step": info["step"], "loss": round(float(info["loss"]), 5)})
        if prof is not None:
            prof.step()
        if time.perf_counter() > deadline:
            raise Stop

    def mark(name):
        marks[name] = time.perf_counter()

    extra, stopped = {}, False
    if prof is not None:
        prof.__enter__()
    try:
        if kind.startswith("peft"):
            extra = peft(base, sp, rows, a, device, p["steps"], "split" if kind == "peft-split" else "default", on_step, mark)
        else:
            over = variants(available("liger"))[kind] | ({"compile": True} if impl.startswith("profile-") else {})  # a long run's default
            extra = surgeon(sp, rows, a, device, p["steps"], over, on_step, mark, work)
    except Stop:
        stopped = True
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
            extra |= _profile_out(prof, p, a, cuda)
    wall = time.perf_counter() - t0
    res = {**p, **extra, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "build_s": round(build_s, 1),
           "steps_done": len(steps), "stopped_at_time_limit": stopped, "part_wall_s": round(wall, 2),
           **timings(stamps, marks.get("start"), t0, a.skip, a.batch_size * a.seq_len),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
           "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
           "losses": [s["loss"] for s in steps]}
    if not kind.startswith("peft"):
        res["dynamo"] = _dynamo_counters()
    return res
