"""surgeon train vs PEFT LoRA on one GPU: tokens/s, warm-up, peak memory, 300-step wall time, the loss
agreement, profiles, within a time budget; prints the RESULTS.md lines of issue 28.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python3 bench/bench_gpu_train.py --out $OUT --budget 480   # H100/H200
    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/bench_gpu_train.py --tiny --out /tmp/b     # CPU plumbing check

No files and no Hub: each model is built from a config with random weights (seeded) in bf16 on the
device, saved, and split with milora r=--rank (all-linear) on the device:
  smollm2  SmolLM2-135M-shaped Llama: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152, tied
  1b       Llama-3.2-1B-shaped: hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256, tied
Data: rows of --seq-len tokens from a fixed random Markov chain, the same rows in the same order for
every part (surgeon_train's _Order). Same lr, schedule, clipping for all.
Parts, in priority order (bench/gpu_train_parts.py says what each is), each bounded in time:
  both shapes, 100 steps: peft, surgeon (the default); smollm2: peft-split (PEFT on surgeon's split
  factors: the loss agreement at step 100); smollm2 variants, 40 steps: v0 (the default before issue
  28), eager/compile × chunked/liger loss; profiles of one steady step of surgeon and of peft; 300
  real steps of peft and of surgeon (smollm2); 1b variants; compile+cce, compile+liger kernels;
  1b peft-split. The 300-step wall line uses the real 300-step parts when both finished, else it is
  extrapolated from the 100-step parts' set-up + warm-up + steady steps, and says which.
The lines printed last: the issue's ratio lines, the 300-step wall line, the loss agreement, and
for each compiled part the steps after which compile paid for itself against the eager run.
tokens/s = rows·seq_len / the mean wall time of a step after the first --skip (the callback's clock,
so it counts everything between steps); warm-up = what the first --skip steps cost above steady
steps (compile); peak memory = torch.cuda.max_memory_allocated over the part (model load included).
Compiles start cold: the worker gets fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR folders,
so the first compiled part of a shape pays what a user's first run pays; later parts of the same
shape may hit that cache (each part records which, as "compile_cache").
All parts run in one worker process; a part that raises is recorded and the next runs; a worker
that dies is restarted on the parts left. Results: OUT/results.jsonl (a line per part, as it
finishes), OUT/bench_gpu_train.json, OUT/profile_*.txt, OUT/log.txt; the summary lines print last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _plan(tiny: bool) -> list[dict]:
    big, small = ("tiny", "tiny1b") if tiny else ("smollm2", "1b")
    full, short, prof, wall = (8, 6, 5, 12) if tiny else (100, 40, 9, 300)
    parts = [dict(model=big, impl="peft", steps=full), dict(model=big, impl="surgeon", steps=full, limit=120),
             dict(model=small, impl="peft", steps=full), dict(model=small, impl="surgeon", steps=full, limit=120),
             dict(model=big, impl="peft-split", steps=full)]
    parts += [dict(model=big, impl=f"surgeon-{v}", steps=short, limit=75) for v in ("v0", "eager-chunked", "compile-chunked", "compile-closs", "compile-liger", "eager-liger")]
    parts += [dict(model=big, impl="profile-surgeon", steps=prof, limit=90), dict(model=big, impl="profile-peft", steps=prof)]
    parts += [dict(model=big, impl="wall300-peft", steps=wall, limit=150), dict(model=big, impl="wall300-surgeon", steps=wall, limit=150)]
    parts += [dict(model=small, impl=f"surgeon-{v}", steps=short, limit=75) for v in ("v0", "eager-chunked", "compile-chunked", "compile-closs")]
    parts += [dict(model=big, impl=f"surgeon-{v}", steps=short, limit=75) for v in ("compile-cce", "compile-ligerkernels")]
    parts += [dict(model=small, impl="peft-split", steps=full)]
    return [p | {"id": f"{p['model']}:{p['impl']}"} for p in parts]


# --- worker: everything that imports torch ---------------------------------------------------------
def worker(a) -> None:
    import torch
    from gpu_train_parts import run_part

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.tiny and a.device == "cpu" and a.compile_backend == "inductor":
        a.compile_backend = "aot_eager"  # inductor on a 2-core CI machine takes minutes; the same code path
    todo = [p for p in _plan(a.tiny) if p["id"] in a.parts.split(",")]
    work = Path(a.work)
    compiled = set()
    for p in todo:
        t0 = time.perf_counter()
        if t0 > a.deadline_perf:
            res = {**p, "skipped": "time budget spent"}
        else:
            try:
                res = run_part(p, a, work)
                if res.get("dynamo", {}).get("stats", {}).get("unique_graphs"):
                    res["compile_cache"] = "warm" if p["model"] in compiled else "cold"
                    compiled.add(p["model"])
            except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
                res = {**p, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400],
                       "traceback": traceback.format_exc()[-2000:]}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(a.results, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {p['id']}: " + json.dumps(_brief(res)), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _brief(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("losses", "traceback", "profile_top", "dynamo")}


# --- driver: no torch import, survives a dying worker -----------------------------------------------
def drive(a) -> dict:
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.jsonl"
    results.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-train-"))
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),
                        "TRITON_CACHE_DIR": str(work / "triton-cache")}
    end = time.time() + a.budget
    todo = [p["id"] for p in _plan(a.tiny) if not a.only or p["id"] in a.only.split(",")]
    with open(a.out / "log.txt", "a") as log:
        while todo and time.time() < end:
            cmd = [sys.executable, __file__, "--worker", "--parts", ",".join(todo), "--work", str(work), "--results", str(results),
                   "--deadline", str(end)] + [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
                                              ("device", "rank", "batch_size", "seq_len", "lr", "warmup", "skip", "part_limit", "compile_backend")]
            cmd += ["--out", str(a.out)] + (["--tiny"] if a.tiny else [])
            try:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=max(10, end - time.time() + 30), env=env)
            except subprocess.TimeoutExpired:
                log.write("worker killed at the time budget\n")
            done = [json.loads(x)["id"] for x in results.read_text().splitlines()] if results.exists() else []
            todo = [t for t in todo if t not in done]
            if todo:  # the worker died (or was killed) inside todo[0]: record it, go on with the rest
                with open(results, "a") as f:
                    f.write(json.dumps({"id": todo[0], "error": "the worker process died or ran out of time (see log.txt)"}) + "\n")
                todo = todo[1:]
    rows = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())} if results.exists() else {}
    summary = {"budget_s": a.budget, "batch_size": a.batch_size, "seq_len": a.seq_len, "rank": a.rank, "lr": a.lr, "skip": a.skip,
               "parts": rows, "not_run": list(todo)}
    summary |= summarize(rows, a.tiny, a.gpu_name)
    (a.out / "bench_gpu_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in rows.values():
        print(json.dumps(_brief(r)))
    print()
    for ln in summary["table"] + [""] + summary["lines"]:
        print(ln)
    return summary


def _gpu(rows: dict) -> str:
    for r in rows.values():
        name = r.get("device") or ""
        for card in ("H100", "H200", "B200", "A100"):
            if card in name:
                return card
        if name and name != "cpu":
            return name
    return "cpu"


def _ratio(x, y) -> str:
    return f"{x / y:.2f}x" if x and y else "n/a"


def summarize(rows: dict, tiny: bool, gpu: str | None = None) -> dict:
    """The issue's lines, a table of every part, the loss agreement and the 300-step wall."""
    gpu, out, lines = gpu or _gpu(rows), {}, []
    pairs = (("tiny", "tiny"), ("tiny1b", "tiny-1B")) if tiny else (("smollm2", "SmolLM2-shaped"), ("1b", "1B-shaped"))
    for model, label in pairs:
        s, p = rows.get(f"{model}:surgeon", {}), rows.get(f"{model}:peft", {})
        if s.get("tokens_per_s") and p.get("tokens_per_s"):
            lines.append(f"train, {gpu}, {label}, surgeon vs PEFT LoRA: {_ratio(s['tokens_per_s'], p['tokens_per_s'])} tokens/s, "
                         f"{_ratio(s.get('peak_mem_gib'), p.get('peak_mem_gib'))} memory")
    big, label = pairs[0]
    ws, wp = rows.get(f"{big}:wall300-surgeon", {}), rows.get(f"{big}:wall300-peft", {})
    real = ws.get("steps_done") == ws.get("steps") and wp.get("steps_done") == wp.get("steps") and ws.get("steps")
    if real:
        n, (ts, tp), how = ws["steps"], (ws["part_wall_s"], wp["part_wall_s"]), "measured, load and compile included"
    else:
        s, p = rows.get(f"{big}:surgeon", {}), rows.get(f"{big}:peft", {})
        n, ts, tp = 300, s.get("wall_300_extrapolated_s"), p.get("wall_300_extrapolated_s")
        how = "extrapolated: set-up + warm-up/compile + 300 steps at the measured step time"
    if ts and tp:
        lines.append(f"train, {gpu}, {label}, {n} steps wall (compile included), surgeon vs PEFT LoRA: {ts:.1f} s vs {tp:.1f} s = "
                     f"{_ratio(ts, tp)} PEFT's wall time ({how})")
        out["wall"] = {"steps": n, "surgeon_s": ts, "peft_s": tp, "how": how}
    agree = {}
    for model, label in pairs:
        s, p = rows.get(f"{model}:surgeon", {}).get("losses") or [], rows.get(f"{model}:peft-split", {}).get("losses") or []
        k = min(len(s), len(p))
        if k:
            rel = [abs(x - y) / abs(y) for x, y in zip(s[:k], p[:k])]
            agree[model] = {"step": k, "surgeon": s[k - 1], "peft": p[k - 1], "rel_diff_at_step": rel[-1], "max_rel_diff": max(rel)}
            lines.append(f"train, {gpu}, {label}, loss at step {k}, surgeon vs PEFT on the same split factors and rows: "
                         f"{s[k - 1]:.4f} vs {p[k - 1]:.4f}, |Δ|/PEFT = {100 * rel[-1]:.3f} % (max over steps {100 * max(rel):.3f} %)")
    out["loss_agreement"] = agree
    out["payback"] = payback(rows, pairs, gpu)
    lines += [v["line"] for v in out["payback"].values()]
    table = ["| part | tokens/s | vs peft | warm-up extra s | set-up s | peak GiB | loss first → last | note |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows.values():
        base = rows.get(f"{r.get('model')}:peft", {}).get("tokens_per_s")
        note = r.get("error") or r.get("skipped") or (f"{r.get('steps_done')}/{r.get('steps')} steps" + (" (time limit)" if r.get("stopped_at_time_limit") else ""))
        if r.get("setup"):
            st = r["setup"]
            note += f"; loss {st.get('loss')}, kernels {st.get('kernels')}, compile {st.get('compile')}, micro {r.get('micro_batch')}"
        if r.get("compile_cache"):
            note += f"; compile {r['compile_cache']}"
        if r.get("dynamo", {}).get("stats"):
            note += f"; dynamo {r['dynamo']['stats']}" + (f", recompiles {sum(r['dynamo'].get('recompiles', {}).values())}" if r["dynamo"].get("recompiles") else "")
        table.append(f"| {r['id']} | {r.get('tokens_per_s', '')} | {_ratio(r.get('tokens_per_s'), base) if r.get('tokens_per_s') else ''} | "
                     f"{r.get('warmup_extra_s', '')} | {r.get('setup_s', '')} | {r.get('peak_mem_gib', '')} | "
                     f"{r.get('first_loss', '')} → {r.get('last_loss', '')} | {note[:300]} |")
    return out | {"lines": lines, "table": table, "gpu": gpu}


def payback(rows: dict, pairs, gpu: str) -> dict:
    """Steps after which compiling the blocks has paid for itself: its extra warm-up (set-up and first
    steps above the eager run's) over the time it saves a step. From each compiled part of a shape
    against its eager twin (surgeon-eager-chunked); cold = the first compile of that shape."""
    out = {}
    for model, label in pairs:
        e = rows.get(f"{model}:surgeon-eager-chunked", {})
        if not e.get("step_s"):
            continue
        for impl in ("surgeon", "surgeon-compile-chunked", "surgeon-compile-closs"):
            c = rows.get(f"{model}:{impl}", {})
            if not c.get("step_s") or not c.get("setup", {}).get("compile"):
                continue
            extra = (c["setup_s"] + c["warmup_extra_s"]) - (e["setup_s"] + e["warmup_extra_s"])
            saved = e["step_s"] - c["step_s"]
            n = extra / saved if saved > 0 else float("inf")
            out[f"{model}:{impl}"] = {"extra_s": round(extra, 2), "saved_per_step_s": round(saved, 5), "steps": round(n, 1),
                                      "cache": c.get("compile_cache"),
                                      "line": f"train, {gpu}, {label}, {impl} vs surgeon-eager-chunked: compile costs {extra:.1f} s "
                                              f"({c.get('compile_cache', '?')} cache), saves {1000 * saved:.1f} ms a step: "
                                              + (f"paid back after {n:.0f} steps" if saved > 0 else "never paid back")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-gpu-train")))
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cuda:N, cpu")
    ap.add_argument("--gpu-name", default=None, help="the card's name in the printed lines (default: from torch.cuda.get_device_name)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, few steps (a CPU check of the plumbing)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for everything; later parts are skipped after it")
    ap.add_argument("--part-limit", type=float, default=60, help="seconds per part (unless the plan gives one); a part stops at its first step past it")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s (the warm-up)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of surgeon's compiled parts (--tiny: aot_eager)")
    ap.add_argument("--only", default="", help="run only these parts (comma-separated ids, e.g. 1b:peft,1b:surgeon), in the plan's order")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--parts", default="")
    ap.add_argument("--work", default="")
    ap.add_argument("--results", default="")
    ap.add_argument("--deadline", type=float, default=0.0)
    a = ap.parse_args()
    if a.worker:
        a.deadline_perf = time.perf_counter() + (a.deadline - time.time())
        worker(a)
    else:
        drive(a)


if __name__ == "__main__":
    main()
