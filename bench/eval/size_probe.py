"""How long one training step of the evaluation takes when the GPU does no work: the host side.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/eval/size_probe.py [--layers 30] [--steps 8]

A SmolLM2-135M-shaped Llama (30 blocks, 9/3 heads, the same modules) with tiny widths, split with
each method on all-linear and q/v, trained by surgeon_train.train on the CPU for a few steps of the
batch of 1 × 16 tokens by default. With tiny widths and sizes the arithmetic is negligible, so the step time
is the dispatch cost of the op graph, and the op count (aten calls per step, counted with a
TorchDispatchMode) bounds a CUDA step from below at a few µs per kernel launch. That is the number
that sizes the worker pool: the GPU step of one process cannot be faster than its host side, and
N processes can overlap their host sides.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def tiny_smollm(path: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=72, intermediate_size=192, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=8, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["lora", "pissa", "kasa", "nusa", "moe"])
    ap.add_argument("--batch", type=int, default=1, help="rows per step (1 × 16 tokens: the arithmetic vanishes, the dispatch stays)")
    ap.add_argument("--seq", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from surgeon_train import TrainOptions, train
    from surgeon_train.data import Packed

    from surgeon.commands.split import SplitOptions, split
    from surgeon.runtime import load_split

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_smollm(Path(tmp) / "m", a.layers)
        ids = torch.randint(3, 512, (64, a.seq), generator=torch.Generator().manual_seed(0))
        data = Packed(ids, ids.clone())
        for method in a.methods:
            for targets in (["all-linear"], ["q_proj", "v_proj"]):
                sd = Path(tmp) / f"{method}-{len(targets)}"
                m = "milora" if method == "lora" else method
                split(str(model), sd, SplitOptions(method=m, rank=8 if m != "nusa" else 16, target=targets, device="cpu", spectra=False, overwrite=True))
                t0 = time.perf_counter()
                summ = train(sd, data, Path(tmp) / "t", TrainOptions(steps=a.steps, batch_size=a.batch, seq_len=a.seq, device="cpu", overwrite=True))
                steps = [json.loads(x) for x in (Path(tmp) / "t" / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in x]
                sm = load_split(sd, device="cpu")
                with Count() as c:
                    loss = sm.model(input_ids=ids[: a.batch], labels=ids[: a.batch]).loss
                    loss.backward()
                key = f"{method}/{'all' if len(targets) == 1 else 'qv'}"
                out[key] = {"step_ms_median": 1e3 * sorted(s["step_time_s"] for s in steps[1:])[len(steps[1:]) // 2],
                            "aten_ops_fwd_bwd": c.n, "job_s": round(time.perf_counter() - t0, 2), "trainable": summ["plan"]["trainable"]}
                print(key, json.dumps(out[key]), flush=True)


if __name__ == "__main__":
    main()
