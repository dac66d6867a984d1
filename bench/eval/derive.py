"""Archive records of protocol v2 → the arrays the report needs (per run, per arm point, per lr curve)."""

from __future__ import annotations

import math

import numpy as np

from bench.eval import grid as G


def ref_of(settings: dict, done: dict) -> dict | None:
    rec = done.get(f"ref-{settings['tag']}")
    return rec["result"] if rec and not rec.get("error") else None


def diverged(rec: dict) -> bool:
    if rec.get("error"):
        return "NumericsError" in rec["error"] or "nan" in rec["error"].lower()
    loss = rec["result"].get("final_train_loss")
    return loss is None or not math.isfinite(loss)


def runs(settings: dict, done: dict, arm: str, targets: str, lr: float | None = None) -> list[dict]:
    """The finished train records of the tag for ARM/TARGETS (at LR if given), errors included."""
    tag = settings["tag"]
    return [r for k, r in sorted(done.items()) if k.startswith(f"train-{targets}-{arm}-lr") and k.endswith("-" + tag)
            and r["job"]["method"] == arm and (lr is None or G.lr_tag(r["job"]["lr"]) == G.lr_tag(lr))]


def bits(res: dict, tasks) -> np.ndarray:
    """Every test item of every task, 1 correct / 0 not (tasks in protocol order)."""
    return np.array([c == "1" for t in tasks for c in res["test"][t]["bits"]], dtype=float)


def forget(res: dict, ref: dict) -> np.ndarray:
    return np.asarray(res["gen_nll"], float) - np.asarray(ref["gen_nll"], float)


def chat_forget(res: dict, ref: dict) -> np.ndarray:
    return np.asarray(res["chat_nll"], float) - np.asarray(ref["chat_nll"], float)


def by_seed(settings: dict, recs: list[dict], ref: dict, what) -> dict:
    """{seed: row} of the finished, non-diverged records; a diverged run's accuracy counts 0 (forgetting: left out)."""
    out = {}
    for r in recs:
        if r.get("error") and not diverged(r):
            continue
        if diverged(r):
            if what is bits:
                out[r["job"]["seed"]] = np.zeros(sum(len(ref["test"][t]["bits"]) for t in settings["tasks"]))
            continue
        out[r["job"]["seed"]] = what(r["result"], settings["tasks"]) if what is bits else what(r["result"], ref)
    return out


def curve(settings: dict, done: dict, ref: dict, arm: str, targets: str) -> dict | None:
    """The lr curve over the selection seeds: {"lr", "acc": [S × I], "forget": [S × W]} at every grid lr that has
    every selection seed finished and not diverged (accuracy and forgetting matrices; lr ascending)."""
    out = {"lr": [], "acc": [], "forget": []}
    for lr in settings["grid"]:
        recs = [r for r in runs(settings, done, arm, targets, lr) if r["job"]["seed"] in settings["select_seeds"]]
        a, f = by_seed(settings, recs, ref, bits), by_seed(settings, recs, ref, forget)
        if sorted(f) != sorted(settings["select_seeds"]):
            continue
        out["lr"].append(lr)
        out["acc"].append(np.array([a[s] for s in sorted(a)]))
        out["forget"].append(np.array([f[s] for s in sorted(f)]))
    return out if out["lr"] else None


def point(settings: dict, done: dict, ref: dict, arm: str, targets: str, lr: float, seeds) -> dict:
    """Per seed at one lr: accuracy bits, forgetting windows, chat forgetting, probes; and what is missing."""
    recs = [r for r in runs(settings, done, arm, targets, lr) if r["job"]["seed"] in seeds]
    ok = [r for r in recs if not r.get("error") and not diverged(r)]
    return {"acc": by_seed(settings, recs, ref, bits), "forget": by_seed(settings, recs, ref, forget),
            "chat": by_seed(settings, recs, ref, chat_forget),
            "probe": {r["job"]["seed"]: r["result"]["probe_bits"].count("1") / len(r["result"]["probe_bits"]) for r in ok},
            "task_acc": {t: [r["result"]["test"][t]["acc"] for r in ok] for t in settings["tasks"]},
            "missing": len(set(seeds) - {r["job"]["seed"] for r in recs}), "diverged": sum(diverged(r) for r in recs)}


def divergence(settings: dict, done: dict, arm: str, targets: str) -> tuple[int, int]:
    """(diverged, finished) over the arm's grid runs."""
    rs = [r for r in runs(settings, done, arm, targets) if r["job"].get("select")]
    return sum(diverged(r) for r in rs), len(rs)


def missing(settings: dict, done: dict, arms, targets: str, heldout: bool = True) -> int:
    """Train jobs of ARMS/TARGETS the archive lacks: the grid's selection runs, and the held-out seeds."""
    tag, n = settings["tag"], 0
    for arm in arms:
        n += sum(G.train_id(arm, targets, lr, s, tag) not in done for lr in settings["grid"] for s in settings["select_seeds"])
        if heldout:
            best = G.chosen_lr(settings, done, arm, targets)
            seeds = G.heldout(settings, arm)
            n += len(seeds) if best is None else sum(G.train_id(arm, targets, best, s, tag) not in done for s in seeds)
    return n
