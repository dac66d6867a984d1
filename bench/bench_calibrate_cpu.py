"""KaSA's truncation with and without --calibrate on SmolLM2 (CPU): the untrained split's perplexity
on held-out English text, and the split times (issue 24).

    python bench/bench_calibrate_cpu.py [--model DIR] [--rank 8] [--target all-linear] [--calibrate default]
                                        [--modes kpm asvd whiten] [--peft] [--skip-plain] [--json out.json]

Perplexity is measured as bench/eval_methods.py measures it (bench.eval.measure.Evaluator: the first
--ppl-tokens tokens of bench/eval/general_text.txt in windows of 2·--seq-len, float32 on the CPU).
The calibration text is surgeon's built-in sample (`--calibrate default`, which shares no sentence
with general_text.txt) unless given. An untrained KaSA split is its truncated base (B = 0), so the
split folder loads as a plain model. Numbers go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.eval.measure import Evaluator, load_plain_model  # noqa: E402
from surgeon.commands.split import SplitOptions, split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the test cache's SmolLM2-135M-Instruct (float32)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--target", default="all-linear")
    ap.add_argument("--calibrate", default="default")
    ap.add_argument("--tokens", type=int, default=65536, help="--calibrate-tokens")
    ap.add_argument("--modes", nargs="+", default=["kpm", "asvd"])
    ap.add_argument("--peft", action="store_true", help="--calibrate-peft: PEFT's covariance and damping settings")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-calibrate"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.model is None:
        from conftest import smollm2_cache

        a.model = smollm2_cache()
    torch.manual_seed(0)
    ev = Evaluator(a.model, "cpu", {}, a.seq_len, a.ppl_tokens)
    rows = [{"split": "original", "ppl": ev.ppl(load_plain_model(a.model, "cpu"))}]
    print(json.dumps(rows[-1]), flush=True)
    tag = " peft" if a.peft else ""
    runs = ([] if a.skip_plain else [("plain", {})]) + [
        (f"calibrated {m}{tag}", {"calibrate": a.calibrate, "calibrate_mode": m, "calibrate_tokens": a.tokens, "calibrate_peft": a.peft}) for m in a.modes]
    for name, extra in runs:
        out = a.work / name.replace(" ", "-")
        t0 = time.perf_counter()
        m = split(str(a.model), out, SplitOptions(method="kasa", rank=a.rank, target=[a.target], overwrite=True, **extra))
        seconds = time.perf_counter() - t0
        row = {"split": name, "ppl": ev.ppl(load_plain_model(out, "cpu")), "seconds": round(seconds, 1), "layers": len(m["layers"])}
        if "calibration" in m:
            c = m["calibration"]
            row |= {"calib_tokens": c["tokens"], "output_share_max": c["output_share_max"], "regularised": len(c["regularised"])}
        else:
            row["output_share_max"] = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
