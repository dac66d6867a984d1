"""Protocol v2 of bench/eval_methods.py (issue 25): plan, run, fold, report.

    python bench/eval_methods.py plan   [--budget S] [--workers W]      # the cost estimate, then what fits in S
    python bench/eval_methods.py run    --device cuda --model DIR --budget S --workers W --export NEW.jsonl
    python bench/eval_methods.py fold   NEW.jsonl [...]                  # into bench/eval/archive_v2.jsonl
    python bench/eval_methods.py report                                  # bench/eval_methods.{md,png} from the archive alone
    python bench/eval_methods.py run --tiny                              # the CPU smoke protocol (tiny-llama fixture)

`run` skips every job the archive (--archive) or its --results folder holds, starts only what fits before
--budget seconds, and leaves the finished records in --results (and in --export, one jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.eval import archive as A
from bench.eval import grid as G
from bench.eval.folders import budget_plan
from bench.eval.jobs2 import has_calibrate
from bench.eval.report2 import write
from bench.eval.runner import load_results, results_log, stored
from bench.eval.runner import run as run_jobs

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "fixtures" / "tiny-llama"


def settings2(tiny: bool = False, arms=None, calibrate: bool | None = None) -> dict:
    cal = has_calibrate() if calibrate is None else calibrate
    s = {"protocol": 2, "task_version": "v2", "tag": "v2", "model_name": "SmolLM2-135M-Instruct", "tasks": ["add", "reverse", "lookup"],
         "n_train": 1200, "n_val": 500, "n_test": 1000, "task_seed": 0, "rank": 8, "steps": 300, "batch_size": 16, "seq_len": 256,
         "grid": list(G.GRID), "select_seeds": list(G.SELECT_SEEDS), "heldout_seeds": list(G.HELDOUT_SEEDS),
         "heldout_by_arm": {k: list(v) for k, v in G.HELDOUT_BY_ARM.items()}, "targets": ["all", "qv"],
         "arms": list(arms or G.ARMS) + (list(G.CALIBRATED) if cal and not arms else []), "calibrated_pending": [] if cal else list(G.CALIBRATED),
         "seq_arms": list(G.SEQ_ARMS), "seq_seeds": [0, 1, 2], "gen_batch": 256, "n_probes": None, "gen_tokens": None,
         "latency_batches": [1, 16, 64], "latency_new_tokens": 32, "latency_repeat": 3, "latency_per_token": True}
    if tiny:
        s |= {"tag": "v2-tiny", "model_name": "tiny-llama", "n_train": 12, "n_val": 3, "n_test": 4, "steps": 2, "seq_len": 64, "batch_size": 2,
              "grid": [1e-3, 1e-2], "heldout_seeds": [2], "heldout_by_arm": {"moe": [2, 3]}, "targets": ["qv"], "seq_seeds": [0], "seq_arms": ["nusa", "lora"], "gen_batch": 8,
              "n_probes": 6, "gen_tokens": 512, "est": {"ref": 10.0, "train": 10.0, "seq": 30.0, "latency": 10.0},
              "latency_batches": [1, 3], "latency_new_tokens": 3, "latency_repeat": 1}
    return s


def fits(settings: dict, done: dict, per: dict, budget: float, workers: int) -> list[dict]:
    """The ready jobs, in value order, that W workers finish within BUDGET (each worker takes the next job when free)."""
    free, out = [0.0] * workers, []
    for j in G.jobs(settings, done):
        if j["id"] in done or not j["ready"]:
            continue
        if j.get("exclusive"):  # waits for every worker, then has the GPU alone
            start = max(free)
            if start + per[j["kind"]] <= budget:
                free = [start + per[j["kind"]]] * workers
                out.append(j)
            continue
        i = min(range(workers), key=free.__getitem__)
        if free[i] + per[j["kind"]] > budget:
            continue
        free[i] += per[j["kind"]]
        out.append(j)
    return out


def print_plan(settings: dict, done: dict, budget: float, workers: int, say=print) -> dict:
    per, src = G.per_job_seconds(done, settings["tag"], settings.get("est"))
    c = G.cost(settings, {k: r for k, r in done.items() if k.endswith(settings["tag"]) and not r.get("error")}, per, workers)
    say(f"cost estimate ({settings['tag']}): " + "; ".join(f"{k} {c['left'][k]} of {c['planned'][k]} runs left × {per[k]:.0f} s ÷ {1 if k in G.EXCLUSIVE else workers} workers = "
                                                    f"{c['seconds'][k]:.0f} s" for k in c["left"]) + f" (seconds per run: {src})")
    say(f"total {c['total_s']:.0f} s of one GPU (runs × seconds a run ÷ workers) ≈ {c['total_s'] / 540:.1f} calls of 9 minutes")
    go = fits(settings, done, per, budget, workers)
    say(f"within {budget:.0f} s: {len(go)} jobs, by value: " + ", ".join(j["id"] for j in go[:30]) + (" …" if len(go) > 30 else ""))
    if settings.get("calibrated_pending"):
        say(f"calibrated arms {settings['calibrated_pending']} wait for `surgeon split --calibrate` (not in this checkout)")
    return c | {"fits": [j["id"] for j in go]}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval_methods.py", description="protocol v2 (issue 25)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("plan", "run", "report", "fold"):
        p = sub.add_parser(name)
        p.add_argument("--archive", type=Path, default=A.DEFAULT)
        p.add_argument("--tiny", action="store_true", help="the CPU smoke protocol on the tiny-llama fixture")
        p.add_argument("--arms", nargs="+", default=None)
        p.add_argument("--budget", type=float, default=540.0, help="seconds of work (run: the deadline)")
        p.add_argument("--workers", type=int, default=8)
        p.add_argument("--out", type=Path, default=ROOT / "bench" / "eval_methods", help="report prefix (.md, .png, .json)")
        if name == "run":
            p.add_argument("--model", type=Path, default=None)
            p.add_argument("--device", default="cpu")
            p.add_argument("--threads", type=int, default=1)
            p.add_argument("--results", type=Path, default=Path("/tmp/eval25/results"))
            p.add_argument("--work", type=Path, default=Path("/tmp/eval25/work"))
            p.add_argument("--export", type=Path, default=None, help="write this call's finished records here (one jsonl)")
            p.add_argument("--fold", action="store_true", help="fold them into --archive too")
            p.add_argument("--no-report", action="store_true")
            p.add_argument("--no-forced", action="store_true", help="generate every answer (no teacher-forced pass: bench/eval/measure2.py)")
        if name == "fold":
            p.add_argument("sources", nargs="+", type=Path)
    return ap


def main(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    if args.cmd == "fold":
        added, kept = A.fold(args.archive, args.sources)
        print(f"{added} records added to {args.archive}, {kept} already there")
        return {"added": added, "kept": kept}
    settings = settings2(args.tiny, args.arms)
    done = A.load(args.archive)
    if args.cmd == "plan":
        return print_plan(settings, done, args.budget, args.workers)
    if args.cmd == "report":
        return report(settings, done, args.out)
    return run(args, settings, done)


def run(args, settings: dict, done: dict) -> dict:
    model = args.model or (TINY_MODEL if args.tiny else None)
    if model is None:
        raise SystemExit("run needs --model DIR (the converted SmolLM2 folder) or --tiny")
    log = results_log(args.results)
    if args.no_forced:
        settings["forced"] = False

    t0 = time.time()
    print_plan(settings, done | load_results(args.results), args.budget, max(1, args.workers), log)
    try:  # `timeout -s INT` may come before the runner (which stops on it by itself) starts: still export and report
        plan = stored(args.results / "_plan.json", lambda: budget_plan(settings, model, args.device), log, "budget plan")
        inv = run_jobs(settings, plan, model, args.work, args.results, args.device, args.workers, args.threads, args.budget - (time.time() - t0),
                       True, log, prior=done)
    except KeyboardInterrupt:
        log("interrupted before the jobs started")
        inv = {"info": {}, "started": 0}
    new = {k: r for k, r in load_results(args.results).items() if k not in done or (done[k].get("error") and not r.get("error"))}
    log(f"this call: {len(new)} finished records ({sum(1 for r in new.values() if r.get('error'))} errors); {json.dumps(inv.get('info'))}")
    if args.export:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        args.export.write_text("".join(json.dumps(A._compact(r), separators=(",", ":")) + "\n" for r in new.values()), encoding="utf-8")
    if args.fold:
        A.fold(args.archive, [args.export] if args.export else [args.results])
    res = {"new": sorted(new), "invocation": inv}
    if not args.no_report:
        res["report"] = report(settings, A.load(args.archive) | new, args.out)
    return res


def report(settings: dict, done: dict, out: Path) -> dict:
    return write(settings, done, out)
