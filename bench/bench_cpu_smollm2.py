"""CPU benchmark: surgeon split of SmolLM2-135M (all-linear, r=64, milora) vs PEFT's pissa init.

    python bench/bench_cpu_smollm2.py [--rank 64] [--repeat 3]

Both run in this process on the same machine, one after the other, best of --repeat:
  * surgeon: the whole split (read the checkpoint, solve, write every output file, fsync),
    through the library call the CLI uses;
  * PEFT: get_peft_model(..., init_lora_weights="pissa") on the already loaded fp32 model, in
    memory, writing nothing (model loading is not timed).
Prints one JSON line with both times and the ratio. The SmolLM2 folder is the one the tests cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="auto, torch or cupy")
    ap.add_argument("--no-spectra", action="store_true", help="skip the full spectrum (subset eigensolver only)")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()

    from conftest import convert_smollm2, smollm2_cache

    model_dir = smollm2_cache()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    convert_smollm2(model_dir)

    from surgeon.commands.split import SplitOptions, split

    surgeon_times = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
            t0 = time.perf_counter()
            m = split(str(model_dir), Path(tmp) / "out", SplitOptions(method="milora", rank=args.rank, backend=args.backend, spectra=not args.no_spectra))
            surgeon_times.append(time.perf_counter() - t0)
    rss_surgeon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_times = []
    for _ in range(args.repeat):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        t0 = time.perf_counter()
        get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", init_lora_weights="pissa"))
        peft_times.append(time.perf_counter() - t0)
        del model

    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "layers": m["summary"]["layers"],
        "solvers": m["summary"]["solvers"],
        "surgeon_split_s": round(min(surgeon_times), 3),
        "surgeon_all_s": [round(t, 3) for t in surgeon_times],
        "peft_pissa_init_s": round(min(peft_times), 3),
        "peft_all_s": [round(t, 3) for t in peft_times],
        "speedup": round(min(peft_times) / min(surgeon_times), 2),
        "peak_rss_mib_after_surgeon": round(rss_surgeon),
        "worst_reconstruction_error": m["summary"]["worst_reconstruction_error"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
