"""CPU micro-benchmark: per-layer decompose() cost on SmolLM2-135M's shapes, gram-eigh vs subspace.

    flock /tmp/surgeon-cpu-bench.lock python bench/bench_cpu_solvers.py [--rank 64] [--repeat 5] [--threads 1]

Uses the real SmolLM2-135M weights of block --layer (the checkpoint the tests cache; random weights
with a 1-decade spectrum when it is absent): q/o 576×576, k/v 192×576, gate/up 1536×576,
down 576×1536. For each shape and side (principal: pissa, minor: milora/kasa/moe) it times
decompose() by gram-eigh with and without the spectrum and by the subspace route (spectrum off),
min of --repeat after one warm-up, and prints one JSON line per case plus a per-model projection
(30 blocks × 7 weights, thread time). --threads 1 matches the pipeline's CPU solve threads (2
threads of 1 BLAS thread each). The machine is shared: take the min, and run under the lock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from surgeon.linalg import decompose, get_backend  # noqa: E402

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def weights(layer: int) -> tuple[dict[str, torch.Tensor], str]:
    try:
        from conftest import smollm2_cache
        from safetensors import safe_open

        path = next(smollm2_cache().glob("*.safetensors"))
        with safe_open(str(path), "pt") as f:
            return {m: f.get_tensor(f"model.layers.{layer}.{p}.{m}.weight") for m, p in MODULES.items()}, str(path)
    except Exception as e:  # noqa: BLE001 - fall back to random weights of the same shapes
        g = torch.Generator().manual_seed(layer)
        out = {}
        for m, (a, b) in SHAPES.items():
            k = min(a, b)
            u, _ = torch.linalg.qr(torch.randn(a, k, generator=g))
            v, _ = torch.linalg.qr(torch.randn(b, k, generator=g))
            out[m] = (u * torch.logspace(1.3, 0, k)) @ v.T
        return out, f"random ({type(e).__name__})"


def best_ms(fn, repeat: int) -> tuple[float, object]:
    out = fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layer", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = get_backend("cpu")
    ws, source = weights(args.layer)
    print(json.dumps({"source": source, "threads": args.threads, "rank": args.rank, "torch": torch.__version__}))
    per_block: dict[str, float] = {}
    for mod, w in ws.items():
        for which in ("principal", "minor"):
            row = {"module": mod, "shape": list(w.shape), "which": which}
            for label, solver, spec in (("gram_eigh_spectrum", "gram-eigh", True), ("gram_eigh", "gram-eigh", False), ("subspace", "subspace", False)):
                ms, t = best_ms(lambda: decompose(w, args.rank, which, cpu, solver=solver, spectrum=spec), args.repeat)
                row[label + "_ms"] = round(ms, 2)
                row[label + "_route"] = t.solver
                row[label + "_bound"] = float(f"{t.subspace_bound:.2e}")
                key = f"{which}:{label}"
                per_block[key] = per_block.get(key, 0.0) + ms
            print(json.dumps(row), flush=True)
    print(json.dumps({"per_block_ms": {k: round(v, 1) for k, v in per_block.items()},
                      "per_model_thread_s (30 blocks)": {k: round(30 * v / 1e3, 2) for k, v in per_block.items()}}))


if __name__ == "__main__":
    main()
