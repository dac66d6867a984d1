"""Scaling of the 7B-shaped MiLoRA split over GPUs of one host: torchrun, one rank per GPU.

    for n in 1 2 4; do
        NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node $n bench/bench_dist_split.py --dir /tmp/b7
    done
    torchrun --standalone --nproc-per-node 2 bench/bench_dist_split.py --dir /tmp/bs --smoke   # CPU, gloo, seconds

Rank 0 builds the Llama-2-7B-shaped checkpoint once with bench_gpu_7b.build() (bf16, 13.5 GB;
reused when present) and, as root, drops the page cache; then every rank runs
`surgeon.commands.split.split` (milora, rank 64, all-linear, each rank on cuda:LOCAL_RANK) into the same
output folder. Prints per-rank lines (tensors, share of the cost model, seconds of its own work,
its largest waits) and one JSON object: total wall time of the call, the pipeline's seconds, GB/s,
speedup against the 1-GPU result saved in --dir, and a digest of every output file but surgeon.json
(the same for every world size: the output is byte-identical). The JSON is also written to
--dir/bench_dist_split_w{N}.json and, when $OUT is set, to $OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_gpu_7b as b7  # noqa: E402
import torch  # noqa: E402

from surgeon.commands.split import SplitOptions, split  # noqa: E402
from surgeon.engine import distributed  # noqa: E402


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name == "surgeon.json":
            continue
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()


def rank_lines(manifest: dict) -> list[dict]:
    summary = manifest["summary"]
    one = {"rank": 0, "device": manifest["device"], "tensors": None, "cost": None, "seconds": summary["seconds"], "stage_seconds": summary.get("stage_seconds", {}),
           "peak_gpu_bytes": summary.get("peak_gpu_bytes")}
    ranks = summary.get("ranks") or [one]
    total_cost = sum(r["cost"] or 0 for r in ranks) or 1
    out = []
    for r in ranks:
        waits = {k: v for k, v in (r.get("stage_seconds") or {}).items() if k.startswith("wait_")}
        out.append({
            "rank": r["rank"], "device": r.get("device"), "tensors": r["tensors"], "seconds": r["seconds"],
            "cost_share": round((r["cost"] or 0) / total_cost, 4) if r["cost"] is not None else 1.0,
            "solver_busy_s": (r.get("stage_seconds") or {}).get("solver_busy"),
            "top_waits": dict(sorted(waits.items(), key=lambda kv: -kv[1])[:2]),
            "peak_gpu_GiB": round((r.get("peak_gpu_bytes") or 0) / 2**30, 2),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/b7")
    ap.add_argument("--layers", type=int, default=b7.L)
    ap.add_argument("--device", default="cuda", help="cuda (each rank on cuda:LOCAL_RANK) or cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-spectra", action="store_true")
    ap.add_argument("--no-hash", action="store_true", help="skip the output digest (~30 s for 7B)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not the speed")
    args = ap.parse_args()
    if args.smoke:
        b7.H, b7.I, b7.V, b7.MLP = 64, 160, 320, {"gate_proj": (160, 64), "up_proj": (160, 64), "down_proj": (64, 160)}
        args.device, args.layers = "cpu", min(args.layers, 2)
    g = distributed.init()  # before build: rank 0's GPU is cuda:LOCAL_RANK
    d = Path(args.dir)
    src = d / ("model-smoke" if args.smoke else "model")
    res: dict = {"world_size": g.world, "torch": torch.__version__}
    if g.is_main:
        t0 = time.perf_counter()
        b7.build(src, args.layers, args.device)
        res["build_s"] = round(time.perf_counter() - t0, 1)
        res["checkpoint_GB"] = round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9, 2)
        res["dropped_caches"] = b7.drop_caches()
        res["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    g.sync()  # the checkpoint exists for everyone
    out = d / f"out_w{g.world}"
    opts = SplitOptions(method="milora", rank=64 if not args.smoke else 4, target=["all-linear"], device=args.device,
                        workers=args.workers, spectra=not args.no_spectra, overwrite=True)
    t0 = time.perf_counter()
    manifest = split(str(src), out, opts)  # every rank; returns rank 0's manifest on all
    wall = time.perf_counter() - t0
    s = manifest["summary"]
    for line in rank_lines(manifest):
        if line["rank"] == g.rank or (g.is_main and g.world == 1):
            print(f"rank {g.rank}: " + json.dumps(line), flush=True)
    walls = g.sync(round(wall, 2))
    if not g.is_main:
        return
    res.update({
        "wall_s": max(walls), "wall_s_per_rank": walls, "pipeline_s": s["seconds"], "solvers": s["solvers"],
        "read_GBps": round(s["bytes_read"] / max(s["seconds"], 1e-9) / 1e9, 2),
        "worst_reconstruction_error": s["worst_reconstruction_error"], "ranks": rank_lines(manifest),
    })
    base = d / "bench_dist_split_w1.json"
    if g.world > 1 and base.exists():
        one = json.loads(base.read_text())
        res["speedup_vs_1"] = round(one["wall_s"] / res["wall_s"], 2)
        res["same_bytes_as_1"] = None
    if not args.no_hash:
        res["output_sha256"] = digest(out)
        if g.world > 1 and base.exists() and json.loads(base.read_text()).get("output_sha256"):
            res["same_bytes_as_1"] = res["output_sha256"] == json.loads(base.read_text())["output_sha256"]
    text = json.dumps(res, indent=1)
    print(text, flush=True)
    (d / f"bench_dist_split_w{g.world}.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"bench_dist_split_w{g.world}.json").write_text(text)


if __name__ == "__main__":
    main()
