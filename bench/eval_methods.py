"""Do the methods do what their papers claim? LoRA, PiSSA, MiLoRA, KaSA, NuSA and the MiLoRA mixture on
SmolLM2-135M-Instruct: task accuracy against forgetting, NuSA vs LoRA over three tasks in sequence,
KaSA's truncation before training, and the mixture's multi-tenant latency.

    # protocol v2 (issue 25; bench/eval_methods.md, bench/eval/cli2.py): plan, run, fold, report
    python bench/eval_methods.py plan | run | fold | report ...

    # protocol v1 (bench/eval_methods_v1.md): resumable; run it again with the same --results to go on
    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/eval_methods.py --device cuda --model SMOLLM2_DIR \
        --workers 10 --deadline 420 --results /tmp/eval17/results --work /tmp/eval17/work --out bench/eval_methods_v1
    # re-render bench/eval_methods_v1.{md,png} from a returned JSON
    python bench/eval_methods.py --from-json bench/eval_methods_v1.json
    # the KaSA truncation sweep alone, on the CPU (bench/eval/kasa_sweep_cpu.json)
    python bench/eval_methods.py --kasa-only --out bench/eval/kasa_sweep_cpu

The pieces live in bench/eval/: tasks.py (the generated tasks), probes.py (forgetting measures),
folders.py (split folders and budgets), jobs.py / sweep.py / latency.py (what a worker runs),
plan.py (the job list and lr selection), runner.py (workers, deadline, resume), aggregate.py,
claims.py, report.py and plots.py (the outputs), convert_gguf.py (the weights on a machine without Hub).
Protocol v2 adds: cli2.py (the subcommands), grid.py (the lr grid, the value order, the cost), jobs2.py and
measure2.py (what a worker runs and measures), archive.py (bench/eval/archive_v2.jsonl: resume and fold),
derive.py, stats.py, claims2.py, report2.py, plots2.py (the report from the archive), general/ (the text,
the probes, their sources and licences), gpu_prep2.sh and gpu_run2.sh (one GPU call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins" / "surgeon-train"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

METHODS = ("lora", "pissa", "milora", "kasa", "nusa", "moe")
LR_GRID = {"lora": [3e-4, 1e-3, 3e-3], "pissa": [1e-4, 3e-4, 1e-3], "milora": [3e-4, 1e-3, 3e-3], "kasa": [3e-4, 1e-3, 3e-3],
           "nusa": [1e-3, 3e-3, 1e-2], "moe": [3e-4, 1e-3, 3e-3]}
KASA_SETS = ["q", "k", "v", "o", "gate", "up", "down", "qv", "attn", "mlp", "all"]
CPU_SWEEP = ROOT / "bench" / "eval" / "kasa_sweep_cpu.json"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--model", type=Path, help="converted SmolLM2 folder (default: tests' cache, converted on demand; required on CUDA)")
    a("--device", default="cpu")
    a("--workers", type=int, default=1, help="worker processes (each its own CUDA context)")
    a("--threads", type=int, default=1, help="torch CPU threads per worker")
    a("--deadline", type=float, default=1e9, help="seconds: start no job that would not finish by then")
    a("--results", type=Path, default=Path("/tmp/eval17/results"))
    a("--work", type=Path, default=Path("/tmp/eval17/work"))
    a("--out", type=Path, default=ROOT / "bench" / "eval_methods_v1", help="output prefix (.json, .md, .png)")
    a("--retry-failed", action="store_true")
    a("--from-json", type=Path, help="only re-render the .md and .png of --out (default: beside the JSON) from this JSON")
    a("--report-only", action="store_true", help="only aggregate the finished jobs under --results into --out")
    a("--kasa-only", action="store_true", help="run the KaSA sweep alone in this process and write --out.json")
    g = ap.add_argument_group("protocol (stored with the results at the first invocation)")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    g.add_argument("--targets", nargs="+", default=["all", "qv"], choices=["all", "qv"])
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--grid-points", type=int, default=3, help="use the middle N points of each lr grid")
    g.add_argument("--max-widen", type=int, default=2)
    g.add_argument("--n-train", type=int, default=1200)
    g.add_argument("--n-val", type=int, default=100)
    g.add_argument("--n-test", type=int, default=200)
    g.add_argument("--seq-steps", type=int, default=300)
    g.add_argument("--seq-methods", nargs="*", default=["lora", "nusa"])
    g.add_argument("--ppl-tokens", type=int, default=4096)
    g.add_argument("--gen-batch", type=int, default=128)
    g.add_argument("--n-probes", type=int, default=None, help="ask only the first N probe questions (CPU smoke runs)")
    g.add_argument("--kasa-ranks", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    g.add_argument("--kasa-sets", nargs="*", default=KASA_SETS)
    g.add_argument("--latency-batches", nargs="*", type=int, default=[1, 16, 64])
    g.add_argument("--latency-new-tokens", type=int, default=32)
    g.add_argument("--latency-repeat", type=int, default=3)
    return ap


def settings_of(args) -> dict:
    import torch
    import transformers

    grid = {}
    for m in args.methods:
        g = LR_GRID[m]
        k = max(1, min(args.grid_points, len(g)))
        grid[m] = g[(len(g) - k) // 2 :][:k]
    tasks = ["add", "reverse", "lookup"]
    name = "SmolLM2-135M-Instruct" if "smollm2" in str(args.model).lower() or "smol" in str(args.model).lower() else Path(args.model).name
    return {"model_name": name, "methods": args.methods, "targets": args.targets, "rank": args.rank, "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "seeds": args.seeds, "lr_grid": grid, "max_widen": args.max_widen,
            "tasks": tasks, "all_tasks": tasks, "task_seed": 0, "n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test,
            "seq_tasks": tasks, "seq_steps": args.seq_steps, "seq_methods": [m for m in args.seq_methods if m in args.methods],
            "seq_targets": args.targets[0], "ppl_tokens": args.ppl_tokens, "gen_batch": args.gen_batch, "n_probes": args.n_probes, "kasa_ranks": args.kasa_ranks,
            "kasa_sets": args.kasa_sets, "latency_batches": args.latency_batches if "moe" in args.methods and "lora" in args.methods else [],
            "latency_new_tokens": args.latency_new_tokens, "latency_repeat": args.latency_repeat,
            "torch": torch.__version__, "transformers": transformers.__version__}


def write_outputs(res: dict, prefix: Path) -> None:
    from bench.eval.plots import plot
    from bench.eval.report import markdown

    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(res, indent=1))
    prefix.with_suffix(".md").write_text(markdown(res))
    plot(res, prefix.with_suffix(".png"))


def default_model() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import convert_smollm2, smollm2_cache

    dest = smollm2_cache()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return convert_smollm2(dest)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("plan", "run", "report", "fold"):  # protocol v2 (issue 25): bench/eval/cli2.py
        from bench.eval import cli2

        return cli2.main(argv)
    args = parser().parse_args(argv)
    if args.from_json:
        from bench.eval.plots import plot
        from bench.eval.report import markdown

        res = json.loads(args.from_json.read_text())
        prefix = args.out if "--out" in argv else args.from_json.with_suffix("")
        prefix.with_suffix(".md").write_text(markdown(res))
        plot(res, prefix.with_suffix(".png"))
        return res
    if args.report_only:
        return report(args.results, args.out)
    if args.model is None:
        if args.device != "cpu":
            raise SystemExit("--device cuda needs --model PATH: the converted SmolLM2 folder (no Hub there).")
        args.model = default_model()
    if args.kasa_only:
        return kasa_only(args)
    from bench.eval.folders import budget_plan
    from bench.eval.runner import results_log, run, stored

    log = results_log(args.results)

    settings = stored(args.results / "_settings.json", lambda: settings_of(args), log, "protocol")
    plan = stored(args.results / "_plan.json", lambda: budget_plan(settings, args.model, args.device), log, "budget plan")
    log(f"plan: {json.dumps({k: v for k, v in plan.items() if k != 'null_sizes'})}")
    inv = run(settings, plan, args.model, args.work, args.results, args.device, args.workers, args.threads, args.deadline, args.retry_failed, log)
    inv |= {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "workers": args.workers, "deadline_s": args.deadline}
    invs = json.loads((args.results / "_invocations.json").read_text()) if (args.results / "_invocations.json").exists() else []
    invs.append(inv)
    (args.results / "_invocations.json").write_text(json.dumps(invs, indent=1))
    res = report(args.results, args.out)
    log(f"wrote {args.out}.{{json,md,png}}; {len(res['runs'])} runs, {len(res['not_run'])} jobs not run")
    return res


def report(results_dir: Path, out: Path) -> dict:
    """Aggregate every finished job under RESULTS into OUT.{json,md,png}."""
    from bench.eval import plan as P
    from bench.eval.aggregate import aggregate
    from bench.eval.runner import load_results

    settings, plan = (json.loads((results_dir / f).read_text()) for f in ("_settings.json", "_plan.json"))
    inv = results_dir / "_invocations.json"
    results = load_results(results_dir)
    res = aggregate(settings, plan, results, json.loads(inv.read_text()) if inv.exists() else [])
    res["not_run"] = [j["id"] for j in P.jobs(settings, results) if j["id"] not in results]
    if CPU_SWEEP.exists() and settings["model_name"].startswith("SmolLM2"):
        res["kasa_sweep_cpu"] = json.loads(CPU_SWEEP.read_text()).get("result")
    write_outputs(res, out)
    return res


def kasa_only(args) -> dict:
    from bench.eval.jobs import Ctx
    from bench.eval.measure import Evaluator
    from bench.eval.sweep import kasa_job

    settings = settings_of(args)
    ev = Evaluator(args.model, args.device, {}, settings["seq_len"], settings["ppl_tokens"])
    t0 = time.time()
    res = {"job": {"id": "kasa-sweep", "kind": "kasa"}, "settings": settings, "device": args.device,
           "result": kasa_job(Ctx(settings, {}, args.model, args.work, args.device, ev), {})}
    res["seconds"] = round(time.time() - t0, 1)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
