"""GPU benchmark (issue 24): a calibrated split of the Llama-2-7B-shaped checkpoint beside the uncalibrated
one: wall time, peak host RSS and peak GPU memory of each, in child processes.

    python bench/bench_gpu_7b_calibrate.py --dir /tmp/b7               # needs CUDA, ~30 GB of disk
    python bench/bench_gpu_7b_calibrate.py --dir /tmp/b7t --tiny       # CPU: same steps, tiny shapes
    python bench/bench_gpu_7b_calibrate.py --dir /tmp/b7c --cpu --layers 1 --tokens 2048
        # CPU, 7B shapes, one block: host memory only (hidden states and the block sit in host memory
        # here, so calibrated minus plain bounds what a GPU run adds to host memory from above)

1. The checkpoint of bench/bench_gpu_7b.py (its `build`: Llama-2-7B's names and shapes, bf16,
   random weights with a trained-like spectrum); --tiny: 2 blocks of hidden 256, built on the CPU.
   A random model has no tokenizer: a small BPE (vocab 4000) is trained on surgeon's built-in
   calibration sample with the `tokenizers` library and saved beside the weights, so
   `--calibrate default` runs without any download.
2. `surgeon split --method kasa --rank 8 --target all-linear` (KaSA: the method calibration is for;
   --method to change), once plain and once with `--calibrate default --calibrate-tokens N`, each
   in a fresh process; peak RSS of each child by wait4's rusage (ru_maxrss), peak GPU memory from
   the run log. Issue 24's bound: the calibrated RSS within 2 GiB of the plain one, and the GPU
   peak within the calibration batch plus one block.
Prints one JSON object; also writes it to $OUT/bench_gpu_7b_calibrate.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_gpu_7b as b7  # noqa: E402


def tiny_shapes() -> None:
    """Shrink bench_gpu_7b's module constants: 2 blocks, hidden 256 (its `build` reads them)."""
    b7.H, b7.I, b7.L, b7.V = 256, 688, 2, 4096
    b7.MLP = {"gate_proj": (b7.I, b7.H), "up_proj": (b7.I, b7.H), "down_proj": (b7.H, b7.I)}


def add_tokenizer(model_dir: Path, vocab: int) -> None:
    """A BPE tokenizer trained on surgeon's built-in calibration sample (no download), saved for AutoTokenizer."""
    if (model_dir / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = ROOT / "surgeon" / "model" / "calibration_default.jsonl"
    texts = [json.dumps(json.loads(line)) for line in sample.read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(vocab, 4000), special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(model_dir)


def timed(src: Path, out: Path, device: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "surgeon", "split", str(src), "--method", "kasa", "--rank", "8", "--target", "all-linear",
           "--device", device, "--out", str(out), "--overwrite", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "plugins" / "surgeon-train"), os.environ.get("PYTHONPATH", "")])})  # keeps carried wheels
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"split failed: {' '.join(cmd)}")
    run = json.loads((out / "surgeon.run.json").read_text())
    man = json.loads((out / "surgeon.json").read_text())
    row = {"wall_s": round(wall, 2), "pipeline_s": run["seconds"], "setup_s": run.get("setup_seconds"),
           "peak_rss_GiB": round(usage.ru_maxrss / 2**20, 3), "peak_gpu_GiB": round((run["peak_gpu_bytes"] or 0) / 2**30, 3),
           "solvers": man["summary"]["solvers"], "stage_seconds": run.get("stage_seconds")}
    if "calibration" in man:
        c = man["calibration"]
        row["calibration"] = {k: c[k] for k in ("tokens", "samples", "mode", "output_share_max")} | {"regularised": len(c["regularised"]), "skipped": len(c["skipped"])}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/b7")
    ap.add_argument("--tiny", action="store_true", help="2 small blocks on the CPU: checks the script, measures nothing")
    ap.add_argument("--cpu", action="store_true", help="7B shapes on the CPU (with --layers): measures host memory")
    ap.add_argument("--layers", type=int, default=0, help="blocks of the built checkpoint (default: all 32; --tiny: 2)")
    ap.add_argument("--tokens", type=int, default=65536, help="--calibrate-tokens")
    ap.add_argument("--split-args", default="", help="extra arguments for both splits, e.g. '--workers 2'")
    a = ap.parse_args()
    device = "cpu" if a.tiny or a.cpu else "cuda"
    if a.tiny:
        tiny_shapes()
    b7.L = a.layers or b7.L
    d = Path(a.dir)
    t0 = time.perf_counter()
    src = b7.build(d / "model", b7.L, device=device)
    add_tokenizer(src, b7.V)
    res = {"device": device, "shapes": {"hidden": b7.H, "intermediate": b7.I, "layers": b7.L}, "build_s": round(time.perf_counter() - t0, 1)}
    if device == "cuda":
        import torch

        res["gpu"] = torch.cuda.get_device_name()
    extra = a.split_args.split()
    res["dropped_caches_plain"] = b7.drop_caches()
    res["plain"] = timed(src, d / "plain", device, extra)
    res["dropped_caches_calibrated"] = b7.drop_caches()
    res["calibrated"] = timed(src, d / "calibrated", device, ["--calibrate", "default", "--calibrate-tokens", str(a.tokens), *extra])
    res["rss_over_plain_GiB"] = round(res["calibrated"]["peak_rss_GiB"] - res["plain"]["peak_rss_GiB"], 3)
    res["gpu_over_plain_GiB"] = round(res["calibrated"]["peak_gpu_GiB"] - res["plain"]["peak_gpu_GiB"], 3)
    text = json.dumps(res, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu_7b_calibrate.json").write_text(text)


if __name__ == "__main__":
    main()
