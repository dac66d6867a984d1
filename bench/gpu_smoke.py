"""GPU smoke test of the split pipeline on a SmolLM2-shaped checkpoint with random weights.

    python bench/gpu_smoke.py [--dir /tmp/smoke]

Builds the checkpoint from a config (no downloads), splits it on CUDA with the torch and the CuPy
backends and on the CPU, and checks that PEFT reproduces the logits and that the backends agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(d: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (d / "config.json").exists():
        return d
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    m.save_pretrained(d)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/smoke")
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgeon.commands.split import SplitOptions, split

    src = build(Path(args.dir) / "model")
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits.detach()
    results = {}
    for name, dev, backend in [("cuda-torch", "cuda", "torch"), ("cuda-cupy", "cuda", "cupy"), ("cpu", "cpu", "torch")]:
        out = Path(args.dir) / name
        t0 = time.perf_counter()
        try:
            m = split(str(src), out, SplitOptions(rank=64, device=dev, backend=backend, overwrite=True))
        except Exception as e:  # noqa: BLE001
            results[name] = f"FAILED: {type(e).__name__}: {e}"
            continue
        dt = time.perf_counter() - t0
        base = AutoModelForCausalLM.from_pretrained(out)
        got = PeftModel.from_pretrained(base, out).eval()(ids).logits.detach()
        results[name] = {"seconds": round(dt, 2), "solvers": m["summary"]["solvers"],
                         "worst_recon": m["summary"]["worst_reconstruction_error"],
                         "logit_err": float((got - ref).abs().max() / ref.abs().max())}
    # the backends must agree on the factors (up to sign of each singular pair)
    from safetensors.torch import load_file

    a = load_file(Path(args.dir) / "cuda-torch" / "adapter_model.safetensors")
    for other in ("cuda-cupy", "cpu"):
        p = Path(args.dir) / other / "adapter_model.safetensors"
        if p.exists():
            b = load_file(p)
            worst = 0.0
            for k in a:
                if k.endswith("lora_A.weight"):
                    kb = k.replace("lora_A", "lora_B")
                    da = a[kb].double() @ a[k].double()
                    db = b[kb].double() @ b[k].double()
                    worst = max(worst, float((da - db).norm() / da.norm()))
            results[f"BA diff cuda-torch vs {other}"] = worst
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
