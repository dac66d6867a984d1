"""The jobs of the evaluation, each run inside a worker process (bench/eval/runner.py).

  ref    the untrained model: every task (val, test), perplexity, probes
  train  one arm (method, targets, lr, seed): split → untrained-split perplexity → train on the task
         mixture → val and test accuracy, perplexity, probes
  seq    one method and seed over the task sequence: split → train task k → measure every task →
         absorb → split the merged model again → … (NuSA: the null space of the merged weights;
         LoRA: a fresh PEFT-init LoRA on the merged weights)
  kasa   (bench/eval/sweep.py) and latency (bench/eval/latency.py)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.eval import folders as F
from bench.eval.measure import Evaluator, load_plain_model, load_split_model


@dataclass
class Ctx:
    settings: dict
    plan: dict  # nusa ranks and budgets (runner.make_plan)
    model: Path
    work: Path
    device: str
    ev: Evaluator


def rank_of(ctx: Ctx, method: str, targets: str) -> int:
    return ctx.plan["nusa_rank"][targets] if method == "nusa" else ctx.settings["rank"]


def make_split(ctx: Ctx, model: Path, method: str, targets: str, seed: int, where: Path) -> Path:
    """The arm's untrained split folder of `model` under `where` (shared where seed-independent)."""
    rank = rank_of(ctx, method, targets)
    if method == "lora":
        milora = F.split_folder(model, where / f"milora-{targets}-r{rank}", "milora", rank, targets, 0, ctx.device)
        return F.lora_folder(model, milora, where / f"lora-{targets}-r{rank}-s{seed}", seed)
    name = f"{method}-{targets}-r{rank}" + (f"-s{seed}" if method == "kasa" else "")
    return F.split_folder(model, where / name, method, rank, targets, seed, ctx.device)


def _train(ctx: Ctx, split_dir: Path, data, out: Path, lr: float, seed: int, steps: int) -> dict:
    from surgeon_train import TrainOptions, train

    s = ctx.settings
    opts = TrainOptions(steps=steps, lr=lr, batch_size=s["batch_size"], seq_len=s["seq_len"], seed=seed, device=ctx.device, overwrite=True)
    summ = train(split_dir, data, out, opts)
    return {"trainable": summ["plan"]["trainable"], "final_train_loss": summ["final_loss"], "train_s": summ["seconds_this_run"],
            "tokens_per_s": summ.get("tokens_per_s_this_run"), "steps": summ["steps_done"], "warmup_steps": summ["plan"]["warmup_steps"]}


def ref_job(ctx: Ctx, job: dict) -> dict:
    m = load_plain_model(ctx.model, ctx.device)
    r = ctx.ev.measure(m, list(ctx.ev.data), ("val", "test"))
    return r | {"ppl_tokens": ctx.ev.ppl_tokens, "general_text_sha256": ctx.ev.text_sha, "max_new_tokens": ctx.ev.max_new}


def train_job(ctx: Ctx, job: dict) -> dict:
    s, t0 = ctx.settings, time.perf_counter()
    method, targets, seed, lr = job["method"], job["targets"], job["seed"], job["lr"]
    sdir = make_split(ctx, ctx.model, method, targets, seed, ctx.work / "splits")
    t_split, split_ppl = time.perf_counter() - t0, None
    if seed == 0:  # what the split alone does to the model (KaSA truncates); the same for every lr
        m = load_split_model(sdir, ctx.device)
        split_ppl = ctx.ev.ppl(m)
        del m
    out = ctx.work / "runs" / job["id"]
    r = _train(ctx, sdir, ctx.ev.train_data(s["tasks"]), out, lr, seed, s["steps"])
    m = load_split_model(out, ctx.device)
    r |= ctx.ev.measure(m, s["tasks"], ("val", "test") if seed == 0 else ("test",))  # val: the lr selection (seed 0)
    del m
    r |= {"rank": rank_of(ctx, method, targets), "effective_trainable": F.effective_params(out), "split_ppl": split_ppl,
          "split_s": round(t_split, 2), "job_s": round(time.perf_counter() - t0, 2)}
    if not job.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return r


def seq_job(ctx: Ctx, job: dict) -> dict:
    """NuSA or LoRA over ctx.settings["seq_tasks"], merging after each task."""
    s, t0 = ctx.settings, time.perf_counter()
    method, seed, lr, targets = job["method"], job["seed"], job["lr"], job["targets"]
    home = ctx.work / "seq" / job["id"]
    shutil.rmtree(home, ignore_errors=True)
    cur, stages = ctx.model, []
    for k, task in enumerate(s["seq_tasks"]):
        t1 = time.perf_counter()
        sdir = make_split(ctx, cur, method, targets, 1000 * seed + k, home / f"split{k}")
        out = home / f"trained{k}"
        r = _train(ctx, sdir, ctx.ev.train_data([task]), out, lr, seed, s["seq_steps"])
        m = load_split_model(out, ctx.device)
        r |= {"task": task, "test": ctx.ev.tasks(m, s["seq_tasks"], "test"), "ppl": ctx.ev.ppl(m)}
        r["probe_answers"] = ctx.ev.probes(m)
        del m
        merged = F.merge(out, home / f"merged{k}")
        shutil.rmtree(home / f"split{k}", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        if cur != ctx.model:
            shutil.rmtree(cur, ignore_errors=True)
        cur = merged
        stages.append(r | {"stage_s": round(time.perf_counter() - t1, 2)})
    shutil.rmtree(home, ignore_errors=True)
    return {"stages": stages, "rank": rank_of(ctx, method, targets), "job_s": round(time.perf_counter() - t0, 2)}


def run_job(ctx: Ctx, job: dict) -> dict:
    from bench.eval import latency, sweep

    fn = {"ref": ref_job, "train": train_job, "seq": seq_job, "kasa": sweep.kasa_job, "latency": latency.latency_job}[job["kind"]]
    return fn(ctx, job)
