"""QPiSSA NF4 on SmolLM2-135M-Instruct (CPU): logits against float32, and against plain NF4.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/quant_cpu_smollm2.py [--iters 0 1 3] [--out bench/results]

The model is the tests' converted fp32 folder (~/.cache/surgeon-tests/smollm2-135m-instruct-f32,
tests/conftest.py). Every linear layer of the 30 blocks is quantized: plain NF4 = the original with each
weight replaced by deq(Q(W)) (bitsandbytes.functional, blocksize 64); QPiSSA = `split --method pissa
--rank 16 --quantize nf4 [--quantize-iters N]` in surgeon's runtime (deq(Q(W_res)) + s·BA, float32).
Reports, over four sentences, the max and mean |logit error| and the top-1 agreement with float32, and
the manifest's mean per-layer ‖W − (deq(Q(W_res)) + s·BA)‖/‖W‖ per alternation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SENTENCES = ["The capital of France is Paris, and the capital of Italy is", "def fibonacci(n):\n    if n < 2:\n        return n",
             "Water boils at one hundred degrees Celsius at sea level.", "Once upon a time, a small robot learned to"]


def main():
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.commands.split import SplitOptions, split
    from surgeon.runtime import load_split

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/surgeon-tests/smollm2-135m-instruct-f32")
    ap.add_argument("--iters", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quant_cpu"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def run(m):
        with torch.no_grad():
            return [m(**tok(s, return_tensors="pt")).logits[0] for s in SENTENCES]

    ref = run(model)

    def errors(ls):
        n = sum(r.shape[0] for r in ref)
        return {"max": max(float((a - b).abs().max()) for a, b in zip(ls, ref)),
                "mean": sum(float((a - b).abs().sum()) for a, b in zip(ls, ref)) / sum(r.numel() for r in ref),
                "top1_agree": sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ls, ref)) / n}

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                q, st = bnbf.quantize_4bit(mod.weight.data, blocksize=64, quant_type="nf4")
                mod.weight.data = bnbf.dequantize_4bit(q, st)
    res = {"plain_nf4": errors(run(model))}
    print("plain nf4", res["plain_nf4"], flush=True)
    for it in args.iters:
        t0 = time.perf_counter()
        m = split(str(args.model), args.work / f"q{it}", SplitOptions(method="pissa", rank=args.rank, quantize="nf4", quantize_iters=it, overwrite=True, spectra=False))
        secs = time.perf_counter() - t0
        q = m["quantization"]
        res[f"qpissa_iters{it}"] = errors(run(load_split(args.work / f"q{it}", trainable=False).model)) | {
            "split_seconds": round(secs, 1), "mean_layer_error": q["mean_quant_error"], "mean_layer_error_plain": q["mean_quant_error_plain"],
            "mean_error_per_iter": q["mean_error_per_iter"], "layers_better_than_plain": q["layers_better_than_plain"]}
        print(f"qpissa iters={it}", res[f"qpissa_iters{it}"], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quant_cpu_smollm2.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
