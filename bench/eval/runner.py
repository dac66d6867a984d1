"""Runs the evaluation's jobs on a pool of worker processes, resumably, within a wall-clock deadline.

Each worker is its own process with its own CUDA context (a 135M model leaves an H200 mostly idle;
several processes fill it), holds one Evaluator, and runs one job at a time. Every finished job's
result is written at once to RESULTS/<job id>.json; a later invocation with the same RESULTS skips
it (failed jobs are retried only with --retry-failed). A job is started only when its duration
estimate (the slowest finished job of its kind, or a default) fits before the deadline; an exclusive
job (latency) runs only when no other job is in flight.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from pathlib import Path

from bench.eval import grid as G
from bench.eval import plan as P

DEFAULT_EST = {"ref": 30.0, "train": 90.0, "seq": 300.0, "kasa": 90.0, "latency": 120.0}


def v2(settings: dict) -> bool:
    return settings.get("protocol") == 2


def jobs_of(settings: dict, done: dict) -> list[dict]:
    return (G.jobs if v2(settings) else P.jobs)(settings, done)


def make_ctx(settings: dict, plan: dict, model: str, work: str, device: str, threads: int):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    from bench.eval.jobs import Ctx
    from bench.eval.measure import Evaluator
    from bench.eval.tasks import make_tasks

    if v2(settings):
        from bench.eval.measure2 import Evaluator2

        data = make_tasks(settings["n_train"], settings["n_val"], settings["n_test"], settings["task_seed"], settings["tasks"], settings["task_version"])
        ev = Evaluator2(Path(model), device, data, settings["seq_len"], settings["gen_batch"], settings.get("n_probes"), settings.get("gen_tokens"),
                        force=settings.get("forced", True))
        return Ctx(settings, plan, Path(model), Path(work), device, ev)
    data = make_tasks(settings["n_train"], settings["n_val"], settings["n_test"], settings["task_seed"], settings["all_tasks"])
    ev = Evaluator(Path(model), device, data, settings["seq_len"], settings["ppl_tokens"], settings["gen_batch"], settings.get("n_probes"))
    return Ctx(settings, plan, Path(model), Path(work), device, ev)


def execute(ctx, job: dict, i: int, results: str) -> None:
    """Run one job and write its record (result or error) to RESULTS/<id>.json."""
    import torch

    from bench.eval import jobs, jobs2
    from bench.eval.measure import dump

    run_job = jobs2.run_job if v2(ctx.settings) else jobs.run_job
    t0 = time.time()
    rec = {"job": job, "worker": i, "started": t0}
    try:
        rec["result"] = run_job(ctx, job)
    except Exception as e:  # recorded, so the plan can go on (a diverged lr is a result too)
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        print(f"[worker {i}] {job['id']} failed: {rec['error']}", file=sys.stderr, flush=True)
    rec["seconds"] = round(time.time() - t0, 2)
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()
    dump(rec, Path(results) / f"{job['id']}.json")


def _worker(i: int, settings: dict, plan: dict, model: str, work: str, results: str, device: str, threads: int, jobs_q, done_q) -> None:
    ctx = make_ctx(settings, plan, model, work, device, threads)
    import torch

    done_q.put(("hello", i, {"device": device, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}))
    while True:
        job = jobs_q.get()
        if job is None:
            return
        execute(ctx, job, i, results)
        done_q.put(("done", i, job["id"]))


class Inline:
    """--workers 0: the jobs run one after another in this process (tests, debugging)."""

    def __init__(self, settings, plan, model, work, results, device, threads):
        self.args, self.ctx, self.results = (settings, plan, str(model), str(work), device, threads), None, str(results)
        self.idle, self.busy, self.info, self.finished = [0], {}, {"device": device, "gpu": None}, []

    def poll(self, timeout: float) -> list[str]:
        out, self.finished = self.finished, []
        return out

    def start(self, job: dict) -> None:
        self.ctx = self.ctx or make_ctx(*self.args)
        execute(self.ctx, job, 0, self.results)
        self.finished.append(job["id"])

    def alive(self) -> int:
        return 1

    def close(self, kill: bool) -> None:
        pass


def results_log(results: Path):
    """log(msg): printed and appended to RESULTS/_log.txt (flushed per line: a killed call keeps its log)."""
    results.mkdir(parents=True, exist_ok=True)
    logf = (results / "_log.txt").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    return log


def stored(path: Path, make, log, what: str):
    """The JSON at `path` if it is there (a resumed run keeps its protocol), else make it and store it."""
    if path.exists():
        return json.loads(path.read_text())
    obj = make()
    path.write_text(json.dumps(obj, indent=1))
    log(f"{what} stored in {path}")
    return obj


def load_results(results: Path, retry_failed: bool = False) -> dict:
    out = {}
    for f in sorted(results.glob("*.json")):
        if f.name.startswith("_"):
            continue
        rec = json.loads(f.read_text())
        if rec.get("error") and retry_failed and "NumericsError" not in rec["error"]:
            continue
        out[rec["job"]["id"]] = rec
    return out


class Pool:
    def __init__(self, n: int, settings, plan, model, work, results, device, threads, log):
        ctx = mp.get_context("spawn")
        self.jobs_q = [ctx.Queue() for _ in range(n)]
        self.done_q = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(i, settings, plan, str(model), str(work), str(results), device, threads, self.jobs_q[i], self.done_q),
                                  daemon=True) for i in range(n)]
        for p in self.procs:
            p.start()
        self.idle, self.busy, self.log, self.info = [], {}, log, {}

    def poll(self, timeout: float) -> list[str]:
        finished = []
        try:
            msg = self.done_q.get(timeout=timeout)
            while True:
                kind, i, payload = msg
                if kind == "hello":
                    self.idle.append(i)
                    self.info = payload
                else:
                    finished.append(self.busy.pop(i)[0]["id"])
                    self.idle.append(i)
                msg = self.done_q.get_nowait()
        except queue.Empty:
            pass
        for i, p in enumerate(self.procs):  # a worker that died (e.g. a CUDA crash) loses its job
            if not p.is_alive() and i in self.busy:
                job = self.busy.pop(i)[0]
                self.log(f"worker {i} died running {job['id']}")
                finished.append(job["id"])
        return finished

    def start(self, job: dict) -> None:
        i = self.idle.pop(0)
        self.busy[i] = (job, time.time())
        self.jobs_q[i].put(job)

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.procs)

    def close(self, kill: bool) -> None:
        for i, q in enumerate(self.jobs_q):
            if self.procs[i].is_alive() and not kill:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 30)
            if p.is_alive():
                p.kill()


class Estimates:
    """Expected seconds per job kind: the 90th percentile of the finished jobs of the kind (earlier invocations'
    included: the same machine and pool), else a default."""

    def __init__(self, settings: dict, done: dict):
        self.seen: dict[str, list[float]] = {}
        self.default = (settings.get("est") or G.v1_scaled()) if v2(settings) else DEFAULT_EST
        self.n_seq = len(settings.get("seq_tasks", settings["tasks"])) * settings.get("seq_steps", settings["steps"]) / max(1, settings["steps"])
        for rec in done.values():
            if rec.get("seconds") and not rec.get("error"):
                self.add(rec["job"]["kind"], rec["seconds"])

    def add(self, kind: str, seconds: float) -> None:
        self.seen.setdefault(kind, []).append(seconds)

    def __call__(self, kind: str) -> float:
        if self.seen.get(kind):
            xs = sorted(self.seen[kind])
            return xs[min(len(xs) - 1, int(0.9 * len(xs)))]
        if kind == "seq" and self.seen.get("train"):
            return 1.3 * self.n_seq * max(self.seen["train"])  # + a split and a merge per stage
        return self.default[kind]


def run(settings: dict, plan: dict, model: Path, work: Path, results: Path, device: str, workers: int, threads: int,
        deadline_s: float, retry_failed: bool, log, grace_s: float = 20.0, prior: dict | None = None) -> dict:
    """PRIOR: records finished elsewhere (protocol v2's archive); they count as done and are not written again."""
    t0 = time.time()
    results.mkdir(parents=True, exist_ok=True)
    done = {k: r for k, r in (prior or {}).items() if not (retry_failed and r.get("error") and "NumericsError" not in r["error"])}
    done |= load_results(results, retry_failed)
    log(f"{len(done)} finished jobs found in {results}")
    if not any(j["id"] not in done and j["ready"] for j in jobs_of(settings, done)):
        log("nothing to run")
        return {"info": {}, "wall_s": round(time.time() - t0, 1), "estimates": {}, "started": 0}
    pool = Pool(workers, settings, plan, model, work, results, device, threads, log) if workers else Inline(settings, plan, model, work, results, device, threads)
    est, started, killed = Estimates(settings, done), set(), False
    try:
        while True:
            for jid in pool.poll(1.0):
                rec = load_results(results).get(jid) or {"job": {"id": jid}, "error": "worker died"}
                done[jid] = rec
                if rec.get("seconds") and not rec.get("error"):
                    est.add(rec["job"]["kind"], rec["seconds"])
                log(f"[{time.time() - t0:6.0f}s] done {jid} ({rec.get('seconds', '?')} s){' ERROR ' + rec['error'] if rec.get('error') else ''}")
            todo = [j for j in jobs_of(settings, done) if j["id"] not in done and j["id"] not in started]
            left = deadline_s - (time.time() - t0)
            if not todo and not pool.busy:
                log("all jobs finished")
                break
            if pool.busy and left < -grace_s:
                log(f"deadline: stopping {len(pool.busy)} jobs in flight")
                killed = True
                break
            if pool.alive() == 0:
                log("every worker died")
                break
            if any(j.get("exclusive") for j, _ in pool.busy.values()) or not pool.idle:
                continue
            ready = [j for j in todo if j["ready"]]
            excl = next((j for j in ready if j.get("exclusive")), None)
            reserve = est(excl["kind"]) if excl else 0.0
            normal = [j for j in ready if not j.get("exclusive") and est(j["kind"]) <= left - reserve]
            go = normal[: len(pool.idle)]
            if not go and excl and not pool.busy and est(excl["kind"]) <= left:
                go = [excl]
            for job in go:
                pool.start(job)
                started.add(job["id"])
                log(f"[{time.time() - t0:6.0f}s] start {job['id']} (est {est(job['kind']):.0f} s, {left:.0f} s left)")
            if not go and not pool.busy:
                log(f"nothing left that fits in {left:.0f} s ({len(todo)} jobs not run)")
                break
    except KeyboardInterrupt:  # `timeout -s INT`: keep what is written, stop the workers
        log("interrupted: stopping the workers")
        killed = True
    finally:
        pool.close(kill=killed)
    return {"info": pool.info, "wall_s": round(time.time() - t0, 1), "estimates": {k: est(k) for k in est.seen}, "started": len(started)}
