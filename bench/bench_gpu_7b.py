"""GPU benchmark: MiLoRA split of a Llama-2-7B-shaped checkpoint on one GPU, from a cold page cache.

    python bench/bench_gpu_7b.py --dir /tmp/b7          # needs CUDA, ~30 GB of disk, run as root to drop caches

1. Builds a checkpoint with exactly Llama-2-7B's tensor names and shapes (bf16, two shards,
   13.5 GB) from random weights whose singular values span ~3 decades with a steep tail (like a
   trained LLM's), on local disk, without any download.
2. Drops the page cache, then times `python -m surgeon split --method milora --rank 64
   --target all-linear --device cuda` end to end in a child process (output written and fsynced),
   with its peak host RSS; peak GPU memory comes from the manifest.
3. Per-matrix solve times (4096², 11008×4096) for the torch and CuPy backends, minor-subspace
   error against a float64 SVD on a sample of layers, and PEFT's pissa init on a 2-block model of
   the same shapes in memory, extrapolated to 32 blocks, as the ratio.
Prints one JSON object; also writes it to $OUT/bench_gpu_7b.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, I, L, V = 4096, 11008, 32, 32000
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


def names_shapes(layers: int):
    yield "model.embed_tokens.weight", (V, H)
    for i in range(layers):
        p = f"model.layers.{i}."
        for a in ATTN:
            yield p + f"self_attn.{a}.weight", (H, H)
        for m, shp in MLP.items():
            yield p + f"mlp.{m}.weight", shp
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def spectrum(k: int, dev) -> torch.Tensor:
    x = torch.linspace(0, 1, k, device=dev, dtype=torch.float32)
    return 20 * 10 ** (-2 * x) * (1 - 0.95 * x**20)  # 20 … 0.01: ~3.3 decades, steep tail


def build(d: Path, layers: int, device: str = "cuda") -> Path:
    from surgeon.format import OutTensor, ShardSetWriter, plan_shards
    from surgeon.format.writer import write_json

    if (d / "model.safetensors.index.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    bases = {}
    for shp in {(H, H), (I, H), (H, I)}:
        m, n = shp
        k = min(shp)
        u, _ = torch.linalg.qr(torch.randn(m, k, device=dev, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, k, device=dev, generator=g))
        bases[shp] = (u, v)
    plan = [OutTensor(n, "BF16", s) for n, s in names_shapes(layers)]
    w = ShardSetWriter(d, plan_shards(plan, 10 * 10**9))
    for name, shp in names_shapes(layers):
        if len(shp) == 1:
            t = torch.ones(shp, device=dev)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = torch.randn(shp, device=dev, generator=g) * 0.02
        else:
            u, v = bases[shp]
            k = min(shp)
            pu = torch.randperm(k, device=dev, generator=g)
            pv = torch.randperm(k, device=dev, generator=g)
            t = (u[:, pu] * spectrum(k, dev)) @ v[:, pv].T  # a fresh pair of singular bases per matrix
        w.write(name, t.to(torch.bfloat16))
    w.sync()
    w.close()
    w.write_index()
    write_json(d / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": V,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16", "tie_word_embeddings": False,
    })
    return d


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_split(src: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "surgeon", "split", str(src), "--method", "milora", "--rank", "64", "--target", "all-linear",
           "--device", "cuda", "--out", str(out), "--overwrite", "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    s = json.loads((out / "surgeon.json").read_text())["summary"]
    run = json.loads((out / "surgeon.run.json").read_text())  # timings live in the run log
    written = sum(p.stat().st_size for p in out.iterdir())
    return {
        "wall_s": round(wall, 2), "pipeline_s": run["seconds"], "solvers": s["solvers"],
        "read_GBps": round(run["bytes_read"] / run["seconds"] / 1e9, 2), "written_GB": round(written / 1e9, 2),
        "write_GBps": round(written / run["seconds"] / 1e9, 2),
        "peak_gpu_GiB": round((run["peak_gpu_bytes"] or 0) / 2**30, 2),
        "peak_rss_GiB_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "worst_reconstruction_error": s["worst_reconstruction_error"], "worst_subspace_bound": s["worst_subspace_bound"],
        "stage_seconds": run.get("stage_seconds"),
        "setup_s": run.get("setup_seconds"), "finish_s": run.get("finish_seconds"),
    }


def solve_times() -> dict:
    from surgeon.linalg import decompose, get_backend

    dev = torch.device("cuda")
    out = {}
    for shp in [(H, H), (I, H)]:
        u, _ = torch.linalg.qr(torch.randn(shp[0], min(shp), device=dev))
        v, _ = torch.linalg.qr(torch.randn(shp[1], min(shp), device=dev))
        w = ((u * spectrum(min(shp), dev)) @ v.T).to(torch.bfloat16)
        for bk in ("torch", "cupy"):
            try:
                b = get_backend("cuda", bk)
            except Exception as e:  # noqa: BLE001
                out[f"{shp[0]}x{shp[1]} {bk}"] = f"unavailable: {e}"
                continue
            decompose(w, 64, "minor", b)
            ts = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                t = decompose(w, 64, "minor", b)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            out[f"{shp[0]}x{shp[1]} {bk}"] = {"median_s": round(statistics.median(ts), 4), "solver": t.solver, "bound": t.subspace_bound}
    return out


def subspace_check(src: Path, out: Path, names: list[str]) -> float:
    from safetensors import safe_open

    from surgeon.format import Checkpoint

    ck = Checkpoint.open(sorted(src.glob("model-*.safetensors")))
    worst = 0.0
    with safe_open(out / "adapter_model.safetensors", "pt", device="cuda") as f:
        for n in names:
            w = ck.read(n).cuda().double()
            u, _, _ = torch.linalg.svd(w, full_matrices=False)
            ur = u[:, -64:]  # minor left singular vectors, float64 reference
            b = f.get_tensor(f"base_model.model.{n[:-len('.weight')]}.lora_B.weight").double()  # (out, r) = U_r √σ'
            q, _ = torch.linalg.qr(b)
            worst = max(worst, float(torch.linalg.matrix_norm(q - ur @ (ur.T @ q), 2)))
    return worst


def peft_pissa(blocks: int = 2) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=blocks, num_attention_heads=32, vocab_size=V)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    get_peft_model(model, LoraConfig(r=64, lora_alpha=64, target_modules="all-linear", init_lora_weights="pissa"))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"blocks": blocks, "seconds": round(dt, 2), "extrapolated_32_blocks_s": round(dt * L / blocks, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/b7")
    ap.add_argument("--layers", type=int, default=L)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--only-split", action="store_true", help="just the cold split (for iterating on the pipeline)")
    ap.add_argument("--split-args", default="", help="extra arguments for surgeon split, e.g. '--workers 3'")
    args = ap.parse_args()
    d = Path(args.dir)
    t0 = time.perf_counter()
    src = build(d / "model", args.layers)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1),
           "checkpoint_GB": round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9, 2)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import surgeon.cli.commands, surgeon.commands.split, torch; torch.zeros(1, device='cuda')"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res["process_start_imports_cuda_init_s"] = round(time.perf_counter() - t0, 2)
    res["dropped_caches"] = drop_caches()
    res["cold"] = timed_split(src, d / "out", args.split_args.split())
    if args.only_split:
        print(json.dumps(res, indent=1))
        return
    res["warm_no_spectra"] = timed_split(src, d / "out", ["--no-spectra", *args.split_args.split()])
    res["solve"] = solve_times()
    res["minor_subspace_error_vs_f64_svd"] = subspace_check(src, d / "out", [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.up_proj.weight", "model.layers.31.mlp.down_proj.weight"][: 3])
    if not args.skip_peft:
        res["peft_pissa"] = peft_pissa()
        res["ratio_peft_over_surgeon_cold"] = round(res["peft_pissa"]["extrapolated_32_blocks_s"] / res["cold"]["wall_s"], 1)
    text = json.dumps(res, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu_7b.json").write_text(text)


if __name__ == "__main__":
    main()
