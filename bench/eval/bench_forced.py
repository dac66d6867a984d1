"""The teacher-forced pass of protocol v2's measuring (bench/eval/measure2.py, answers) against generating
every answer: time, how many items it settled, and that the bits are equal.

    python bench/eval/bench_forced.py --model ~/.cache/surgeon-tests/smollm2-135m-instruct-f32 --n 96 --device cpu
    # task lookup: forced 12.2 s (settled 28 of 48) vs generated 7.5 s; accuracy 0.583; bits equal: True; ...

--train N first fine-tunes a PEFT LoRA for N steps on the tasks (a model that answers some items right,
as the trained arms do) so that the pass has something to settle.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "surgeon-train")]

from bench.eval import tasks as T  # noqa: E402
from bench.eval.measure import autocast  # noqa: E402
from bench.eval.measure2 import Evaluator2  # noqa: E402


def lora_trained(model, ev, names, steps: int, lr: float = 2e-3):
    """A quick PEFT LoRA (r 16, all linears) on the tasks' train rows: a model with some right answers."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    data = ev.train_data(names)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    pm.train()
    for _ in range(steps):
        rows = torch.randint(0, len(data.input_ids), (8,), generator=g)
        x, y = data.input_ids[rows].to(pm.device), data.labels[rows].to(pm.device)
        with autocast(ev.device):
            loss = pm(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", type=int, default=96, help="test items per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train", type=int, default=0, help="PEFT LoRA steps first (0: the model as it is)")
    p.add_argument("--tasks", default="add,reverse,lookup")
    a = p.parse_args()
    names = a.tasks.split(",")
    torch.manual_seed(0)
    data = T.make_tasks(400, 4, a.n, 0, names, "v2")
    ev = Evaluator2(a.model, a.device, data, 128, gen_batch=32, n_probes=2, gen_tokens=512)
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32  # as the evaluation loads models
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    if a.train:
        model = lora_trained(model, ev, names, a.train)
    for n in names:
        rows, max_new = data[n]["test"], ev.max_new[n]
        ev.force = True  # the pass is on by default on CUDA only
        sync(a.device)
        t0 = time.perf_counter()
        forced_ans, settled = ev.answers(model, rows, max_new)
        sync(a.device)
        t1 = time.perf_counter()
        ev.force = False
        gen_ans, _ = ev.answers(model, rows, max_new)
        sync(a.device)
        t2 = time.perf_counter()
        bits = ["".join("1" if T.exact(x, r["completion"]) else "0" for x, r in zip(ans, rows)) for ans in (forced_ans, gen_ans)]
        print(f"task {n}: forced {t1 - t0:.1f} s (settled {settled} of {len(rows)}) vs generated {t2 - t1:.1f} s; "
              f"accuracy {bits[1].count('1') / len(rows):.3f}; bits equal: {bits[0] == bits[1]}; answers equal: {forced_ans == gen_ans}", flush=True)


if __name__ == "__main__":
    main()
