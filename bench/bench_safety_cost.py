"""What the safety features cost: content hashing of every source tensor and the commit interval.

    python bench/bench_safety_cost.py                                   # SmolLM2-135M on the CPU (the tests' cache)
    python bench/bench_safety_cost.py --model /tmp/b7/model --device cuda --repeat 1 --variants default,nohash-commit30

Variants, each a whole split through the library call the CLI uses (read, solve, write, fsync,
rename), best of --repeat, page cache dropped first when running as root:
  default          xxh3-128 of every tensor (reader thread), resume points every 2 s (writer thread)
  nohash           hashing replaced by a no-op (what the split cost before issue 13)
  commit30         resume points every 30 s (the interval before issue 13)
  commit0.5        every 0.5 s
  nohash-commit30  both, i.e. the pipeline before issue 13
Also reports the run log's own clocks: hash_busy (seconds the reader thread spent hashing) and
commit_busy (seconds the writer thread spent in fsync + journal). Prints one JSON object (and writes
it to $OUT/bench_safety_cost.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def one_run(model: Path, variant: str, args) -> dict:
    import surgeon.format.reader as reader
    from surgeon.commands.split import SplitOptions, split

    real = reader.content_hash
    if "nohash" in variant:
        reader.content_hash = lambda data: "xxh3_128:off"
    commit = 2.0
    for part in variant.split("-"):
        if part.startswith("commit"):
            commit = float(part[len("commit"):])
    try:
        with tempfile.TemporaryDirectory(dir=args.tmp or model.parent) as tmp:
            cold = drop_caches()
            t0 = time.perf_counter()
            m = split(str(model), Path(tmp) / "out", SplitOptions(method=args.method, rank=args.rank, device=args.device, commit_seconds=commit))
            wall = time.perf_counter() - t0
    finally:
        reader.content_hash = real
    st = m["run"]["stage_seconds"]
    return {"wall_s": round(wall, 3), "pipeline_s": m["run"]["seconds"], "cold": cold,
            "hash_busy_s": st.get("hash_busy"), "commit_busy_s": st.get("commit_busy"), "read_GB": round(m["run"]["bytes_read"] / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the tests' SmolLM2-135M fp32 cache)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="milora")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="default,nohash,commit30,commit0.5")
    ap.add_argument("--tmp", default=None, help="where the outputs go (default: beside the model)")
    args = ap.parse_args()
    if args.model is None:
        from conftest import convert_smollm2, smollm2_cache

        model = smollm2_cache()
        model.parent.mkdir(parents=True, exist_ok=True)
        convert_smollm2(model)
    else:
        model = Path(args.model)
    import torch

    res = {"model": str(model), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores",
           "method": args.method, "rank": args.rank, "variants": {}}
    for v in args.variants.split(","):
        runs = [one_run(model, v, args) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["wall_s"])
        res["variants"][v] = {**best, "all_wall_s": [r["wall_s"] for r in runs]}
    text = json.dumps(res, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_safety_cost.json").write_text(text)


if __name__ == "__main__":
    main()
