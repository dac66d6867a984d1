"""surgeon train benchmarks (needs `pip install -e plugins/surgeon-train`).

    python bench/bench_train.py                      # CPU: SmolLM2-135M milora, loss curve + answers
    python bench/bench_train.py --device cuda        # GPU: surgeon train vs PEFT LoRA, tokens/s + peak memory
    python bench/bench_train.py --compare --device cpu --layers 2 --steps 4   # smoke test of the GPU mode

CPU mode (a): splits the cached SmolLM2-135M-Instruct (tests/conftest.py smollm2_cache()) with milora
r=--rank, trains it on fixtures/data/tiny_instruct.jsonl through `surgeon_train.train_files` (what
`surgeon train` runs), records the loss of every step, and asks every prompt of the set before and
after (greedy, chat template): how many answers contain the expected completion.

Compare mode (b, the default with --device cuda): no files and no Hub; a SmolLM2-135M-shaped Llama
(hidden 576, 30 layers, 9/3 heads, vocab 49152, tied embeddings) with random weights is saved in
bf16 and split with milora r=--rank on the device. The same random token rows (seq_len × batch per
step) then train (1) `surgeon_train.train` and (2) PEFT LoRA r=--rank, all-linear, on the bf16 base
loaded by transformers, in a plain torch loop with the same settings: bf16 autocast, fused AdamW,
warm-up + cosine, clipping, one host sync per step, the same loss function. tokens/s is taken over
the steps after --skip warm-up steps; peak memory is torch.cuda.max_memory_allocated over each run
(model load included). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _answers(model, tok, records, max_new_tokens=24) -> list[str]:
    model.eval()
    outs = []
    with torch.no_grad():
        for _, r in records:
            enc = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, return_dict=True, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return outs


def cpu_curve(args) -> dict:
    from conftest import convert_smollm2, smollm2_cache
    from surgeon_train import TrainOptions, load_jsonl, train_files
    from transformers import AutoTokenizer

    from surgeon.commands.split import SplitOptions, split
    from surgeon.runtime import load_split

    model_dir = smollm2_cache()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    convert_smollm2(model_dir)
    records = load_jsonl(DATA)
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        t0 = time.perf_counter()
        split(str(model_dir), Path(tmp) / "split", SplitOptions(method="milora", rank=args.rank, spectra=False))
        split_s = time.perf_counter() - t0
        _log(f"split in {split_s:.1f} s; asking {len(records)} questions before training")
        tok = AutoTokenizer.from_pretrained(Path(tmp) / "split")
        before = _answers(load_split(Path(tmp) / "split").model, tok, records)
        curve = []
        opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup, device="cpu")

        def cb(event, info):
            if event == "step":
                curve.append(info)
                _log(f"step {info['step']}/{info['total']} loss {info['loss']:.4f} ({info['step_time_s']:.1f} s)")

        s = train_files(Path(tmp) / "split", DATA, Path(tmp) / "trained", opts, callback=cb)
        _log("asking again after training")
        after = _answers(load_split(Path(tmp) / "trained").model, tok, records)
    hit = lambda outs: sum(r["completion"].rstrip(".").lower() in o.lower() for (_, r), o in zip(records, outs))  # noqa: E731
    return {
        "mode": "cpu-curve", "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct fp32", "method": "milora", "rank": args.rank, "split_s": round(split_s, 2),
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seq_len": args.seq_len, "rows": s["plan"]["rows"],
        "trainable": s["plan"]["trainable"], "loss_curve": [c["loss"] for c in curve],
        "tokens_per_s": s["tokens_per_s_this_run"], "train_s": s["seconds_this_run"],
        "answers_correct_before": hit(before), "answers_correct_after": hit(after), "questions": len(records),
        "examples_after": [{"prompt": r["prompt"], "answer": o} for (_, r), o in list(zip(records, after))[:4]],
    }


def _smollm2_shaped(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _peft_run(base_dir: Path, data, args, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model
    from surgeon_train.loop import _autocast, _base_dtype, schedule, token_ce_sum
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_base_dtype("auto", device)).to(device)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", lora_dropout=0.0))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(args.steps, 1, 0.0))
    counts, times, losses = data.loss_tokens(), [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        rows = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(data)
        n_tok = max(1, int(counts[rows].sum()))
        x, y = data.input_ids[rows].to(device, non_blocking=True), data.labels[rows].to(device, non_blocking=True)
        with _autocast(device):
            logits = model(input_ids=x, use_cache=False).logits
        loss = token_ce_sum(logits, y) / n_tok
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the one host sync per step, as in surgeon train
        times.append(time.perf_counter() - t0)
    return {"times": times, "losses": losses, "trainable": sum(p.numel() for p in params)}


def compare(args) -> dict:
    from surgeon_train import Packed, TrainOptions, train
    from surgeon_train.data import IGNORE
    from transformers import AutoModelForCausalLM

    from surgeon.commands.split import SplitOptions, split

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(_smollm2_shaped(args.layers), dtype=torch.float32)
        m.to(torch.bfloat16).save_pretrained(Path(tmp) / "base")
        del m
        split(str(Path(tmp) / "base"), Path(tmp) / "split", SplitOptions(method="milora", rank=args.rank, device=args.device, spectra=False))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 49152, (args.steps * args.batch_size, args.seq_len), generator=g)
        labels = ids.clone()
        labels[:, 0] = IGNORE
        data = Packed(ids, labels)
        runs = {}
        for rep in range(args.repeat):
            for name in ("surgeon", "peft"):
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                if name == "surgeon":
                    info = []
                    opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=1,
                                        grad_checkpointing=args.grad_checkpointing, device=args.device, overwrite=True)
                    s = train(Path(tmp) / "split", data, Path(tmp) / "trained", opts, callback=lambda e, i: e == "step" and info.append(i))
                    r = {"times": [i["step_time_s"] for i in info], "losses": [i["loss"] for i in info], "trainable": s["plan"]["trainable"]}
                else:
                    r = _peft_run(Path(tmp) / "base", data, args, device)
                timed = r["times"][args.skip :]
                tps = args.batch_size * args.seq_len * len(timed) / sum(timed)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
                best = runs.get(name)
                if best is None or tps > best["tokens_per_s"]:
                    runs[name] = {"tokens_per_s": round(tps, 1), "peak_mem_gib": peak and round(peak, 3), "trainable": r["trainable"],
                                  "first_loss": round(r["losses"][0], 4), "last_loss": round(r["losses"][-1], 4)}
                gc.collect()
    dev_name = torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} {torch.get_num_threads()} threads"
    return {
        "mode": "compare", "device": dev_name, "torch": torch.__version__, "model": f"SmolLM2-135M-shaped, {args.layers} layers, random bf16",
        "rank": args.rank, "steps": args.steps, "skip": args.skip, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "grad_checkpointing": args.grad_checkpointing, "surgeon_milora": runs["surgeon"], "peft_lora": runs["peft"],
        "throughput_ratio": round(runs["surgeon"]["tokens_per_s"] / runs["peft"]["tokens_per_s"], 3),
        "memory_ratio": cuda and round(runs["surgeon"]["peak_mem_gib"] / runs["peft"]["peak_mem_gib"], 3) or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare", action="store_true", help="surgeon vs PEFT (the default on CUDA)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="default: 40 (cpu curve), 30 (compare)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (cpu curve), 2e-4 (compare)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 (cpu curve), 8 (compare)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 128 (cpu curve), 1024 (compare)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="compare mode: decoder layers of the random model")
    ap.add_argument("--skip", type=int, default=5, help="compare mode: warm-up steps left out of tokens/s")
    ap.add_argument("--repeat", type=int, default=2, help="compare mode: runs of each, alternating; the fastest is kept")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    curve = not (args.compare or args.device.startswith("cuda"))
    for k, (a, b) in {"steps": (40, 30), "lr": (1e-3, 2e-4), "batch_size": (4, 8), "seq_len": (128, 1024)}.items():
        if getattr(args, k) is None:
            setattr(args, k, a if curve else b)
    args.skip = min(args.skip, args.steps - 1)
    result = cpu_curve(args) if curve else compare(args)
    line = json.dumps(result)
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")


if __name__ == "__main__":
    main()
