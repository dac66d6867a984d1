"""surgeon train vs PEFT LoRA on the CPU with the real SmolLM2-135M-Instruct: peak RSS, s/step, loss.

    flock /tmp/surgeon-mem.lock python bench/bench_train_cpu.py table --batch-size 4 --seq-len 1024 --steps 2
    flock /tmp/surgeon-mem.lock python bench/bench_train_cpu.py table --batch-size 4 --seq-len 128 --steps 100 --lr 1e-3
    python bench/bench_train_cpu.py one --impl surgeon --batch-size 4 --seq-len 1024 --steps 2   # one run, this process

`table` runs every implementation in its own process under /usr/bin/time -v (peak RSS = its
"Maximum resident set size", the whole process: Python, torch, the model, the data) and prints a
markdown table and one JSON line. Implementations:
  surgeon       `surgeon_train.train` with its defaults (micro-batch fitted to memory, chunked loss,
                document masking) on a milora r=--rank all-linear split
  surgeon-nodocmask   the same with --no-document-mask (packed examples see their neighbours, as before)
  surgeon-full  --loss full, the whole batch in one pass, no document mask: the trainer as it was
                before the loss without logits (the loss-curve reference)
  peft          PEFT LoRA r=--rank, all-linear, default init, on the original model, in a plain torch
                loop: model(input_ids, labels=labels) (transformers' own loss on full logits), AdamW,
                the same warm-up + cosine schedule and clipping
The data: fixtures/data/tiny_instruct.jsonl repeated to 64 examples (chat template, prompt masked),
packed to --seq-len; every implementation sees the same rows in the same order. s/step is the
median over the steps after the first. The split (milora, r=--rank) is made once into --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
IMPLS = ("surgeon", "surgeon-nodocmask", "surgeon-full", "peft")


def _data(work: Path) -> Path:
    out = work / "d64.jsonl"
    lines = [ln for ln in DATA.read_text().splitlines() if ln.strip()]
    out.write_text("".join(ln + "\n" for ln in (lines * 2)[:64]))
    return out


def _split(work: Path, rank: int) -> Path:
    from conftest import convert_smollm2, smollm2_cache

    from surgeon.commands.split import SplitOptions, split

    model = smollm2_cache()
    model.parent.mkdir(parents=True, exist_ok=True)
    convert_smollm2(model)
    out = work / f"smollm2-milora-r{rank}"
    if not (out / "surgeon.json").exists():
        split(str(model), out, SplitOptions(method="milora", rank=rank, spectra=False))
    return out


def _packed(split_dir: Path, data: Path, seq_len: int):
    from surgeon_train.data import load_packed
    from transformers import AutoTokenizer

    return load_packed(data, AutoTokenizer.from_pretrained(split_dir), seq_len)


def run_surgeon(args, split_dir: Path, data: Path, full: bool) -> dict:
    from surgeon_train import TrainOptions, train

    packed = _packed(split_dir, data, args.seq_len)
    extra = dict(loss="full", micro_batch=args.batch_size, document_mask=False, grad_checkpointing=False) if full else {}
    if args.impl == "surgeon-nodocmask":
        extra = {"document_mask": False}
    opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup,
                        device="cpu", overwrite=True, **extra)
    steps = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        s = train(split_dir, packed, Path(tmp) / "out", opts, callback=lambda e, i: e == "step" and steps.append(i))
    return {"times": [i["step_time_s"] for i in steps], "losses": [i["loss"] for i in steps], "trainable": s["plan"]["trainable"],
            "micro_batch": s["micro_batch"], "grad_checkpointing": s["grad_checkpointing"], "setup": s["setup"]}


def run_peft(args, split_dir: Path, data: Path) -> dict:
    from conftest import smollm2_cache
    from peft import LoraConfig, get_peft_model
    from surgeon_train.loop import _Order, schedule
    from transformers import AutoModelForCausalLM

    packed = _packed(split_dir, data, args.seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_cache(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(args.steps, args.warmup, 0.0))
    order, times, losses = _Order(len(packed), 0), [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        rows = order.rows(step * args.batch_size, args.batch_size)  # the rows surgeon train takes
        loss = model(input_ids=packed.input_ids[rows], labels=packed.labels[rows], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
        times.append(time.perf_counter() - t0)
    return {"times": times, "losses": losses, "trainable": sum(p.numel() for p in params)}


def one(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    split_dir, data = _split(args.work, args.rank), _data(args.work)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    r = run_peft(args, split_dir, data) if args.impl == "peft" else run_surgeon(args, split_dir, data, args.impl == "surgeon-full")
    timed = r["times"][1:] or r["times"]
    return r | {"impl": args.impl, "s_per_step": round(statistics.median(timed), 2), "wall_s": round(time.perf_counter() - t0, 1),
                "final_loss": r["losses"][-1]}


def table(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    _split(args.work, args.rank)  # once, before the timed children
    rows = {}
    for impl in args.impls.split(","):
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "one", "--impl", impl, "--work", str(args.work)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch_size", "seq_len", "steps", "lr", "rank", "warmup")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            res = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
        res["peak_rss_gib"] = rss and round(int(rss.group(1)) / 2**20, 2)
        res["returncode"] = p.returncode
        rows[impl] = res
        print(f"{impl}: {json.dumps({k: v for k, v in res.items() if k not in ('times', 'losses')})}", file=sys.stderr, flush=True)
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}", "model": "SmolLM2-135M-Instruct fp32",
           "rank": args.rank, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "lr": args.lr, "runs": rows}
    print(_markdown(out), file=sys.stderr)
    return out


def _markdown(out: dict) -> str:
    runs = out["runs"]
    lines = [f"B={out['batch_size']} × T={out['seq_len']}, {out['steps']} steps, r={out['rank']}, lr {out['lr']}", "",
             "| | peak RSS | s/step | micro-batch | loss at the last step |", "| --- | ---: | ---: | ---: | ---: |"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r.get('peak_rss_gib')} GiB | {r.get('s_per_step', r.get('error'))} | {r.get('micro_batch', out['batch_size'])} | {r.get('final_loss')} |")
    if "peft" in runs and "surgeon" in runs and runs["peft"].get("peak_rss_gib") and runs["surgeon"].get("peak_rss_gib"):
        lines.append(f"| surgeon / peft | {runs['surgeon']['peak_rss_gib'] / runs['peft']['peak_rss_gib']:.2f}× | "
                     f"{(runs['surgeon'].get('s_per_step') or 0) / (runs['peft'].get('s_per_step') or 1):.2f}× | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("table", "one"))
    ap.add_argument("--impl", choices=IMPLS, default="surgeon")
    ap.add_argument("--impls", default=",".join(IMPLS), help="table: which, comma-separated")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "surgeon-bench-train-cpu")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    res = table(args) if args.mode == "table" else one(args)
    line = json.dumps(res)
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")


if __name__ == "__main__":
    main()
