"""The job list, recomputed from the finished results (so a second invocation resumes).

Order of priority (a job is dispatched only when its dependencies have finished):
  0 ref                  the untrained model
  1 train, all-linear    the lr grid at seed 0, every method (grids widen by one step, twice at
                         most, when the best lr sits on an edge)
  2 seq                  NuSA and LoRA over the task sequence, at their all-linear best lr
  3 train, all-linear    seeds 1, 2 at the best lr
  4 kasa                 the truncation sweep
  5, 6 train, q/v        grid, then seeds
  latency                exclusive (alone on the GPU), when moe's and lora's all-linear grids are done
"""

from __future__ import annotations

import math

GRID_STEP = 3.0  # neighbouring grid points differ by this factor


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def train_id(method: str, targets: str, lr: float, seed: int) -> str:
    return f"train-{targets}-{method}-lr{lr_tag(lr)}-s{seed}"


def score(res: dict | None) -> tuple[float, float]:
    """Selection key on the VALIDATION split (higher is better): mean exact match, then −mean loss."""
    if not res or res.get("error"):
        return (-math.inf, -math.inf)
    val = res["result"]["val"]
    acc = sum(v["acc"] for v in val.values()) / len(val)
    loss = sum(v["loss"] for v in val.values()) / len(val)
    return (acc, -loss if math.isfinite(loss) else -math.inf)


def grid_state(settings: dict, results: dict, method: str, targets: str) -> tuple[list[float], float | None]:
    """(the lrs of the grid so far, the best lr once every grid run has finished, else None)."""
    lrs, widen = sorted(settings["lr_grid"][method]), settings.get("max_widen", 2)
    for _ in range(widen + 1):
        ids = [train_id(method, targets, lr, 0) for lr in lrs]
        if not all(i in results for i in ids):
            return lrs, None
        best = max(lrs, key=lambda lr: score(results[train_id(method, targets, lr, 0)]))
        if score(results[train_id(method, targets, best, 0)])[0] == -math.inf:
            return lrs, best  # every grid point diverged: nothing to widen towards
        if best == lrs[0] and len(lrs) < len(settings["lr_grid"][method]) + widen:
            lrs = [lrs[0] / GRID_STEP] + lrs
        elif best == lrs[-1] and len(lrs) < len(settings["lr_grid"][method]) + widen:
            lrs = lrs + [lrs[-1] * GRID_STEP]
        else:
            return lrs, best
    return lrs, best


def jobs(settings: dict, results: dict) -> list[dict]:
    """Every job known now, in priority order, each with "ready" (its dependencies have finished)."""
    out: list[dict] = [{"id": "ref", "kind": "ref", "prio": 0, "ready": True}]
    best = {}
    for tg_i, targets in enumerate(settings["targets"]):
        base = 1 if tg_i == 0 else 5
        for method in settings["methods"]:
            lrs, b = grid_state(settings, results, method, targets)
            best[(method, targets)] = b
            keep = tg_i == 0 and method in ("moe", "lora")  # the latency job reuses them
            for lr in lrs:
                out.append({"id": train_id(method, targets, lr, 0), "kind": "train", "prio": base, "ready": True, "method": method,
                            "targets": targets, "lr": lr, "seed": 0, "keep": keep})
            if b is not None:
                for seed in settings["seeds"][1:]:
                    out.append({"id": train_id(method, targets, b, seed), "kind": "train", "prio": base + (2 if tg_i == 0 else 1),
                                "ready": True, "method": method, "targets": targets, "lr": b, "seed": seed})
    tg = settings["seq_targets"]
    for method in settings["seq_methods"]:
        b = best.get((method, tg))
        for seed in settings["seeds"]:
            out.append({"id": f"seq-{tg}-{method}-s{seed}", "kind": "seq", "prio": 2, "ready": b is not None, "method": method,
                        "targets": tg, "lr": b, "seed": seed})
    if settings["kasa_ranks"]:
        out.append({"id": "kasa-sweep", "kind": "kasa", "prio": 4, "ready": True})
    if settings["latency_batches"]:
        first = settings["targets"][0]
        bm, bl = best.get(("moe", first)), best.get(("lora", first))
        out.append({"id": "latency", "kind": "latency", "prio": 3, "exclusive": True, "ready": bm is not None and bl is not None,
                    "moe_run": train_id("moe", first, bm, 0) if bm else None, "lora_run": train_id("lora", first, bl, 0) if bl else None})
    order = {j["id"]: i for i, j in enumerate(out)}
    return sorted(out, key=lambda j: (j["prio"], order[j["id"]]))


def best_lrs(settings: dict, results: dict) -> dict:
    return {f"{m}/{t}": grid_state(settings, results, m, t)[1] for t in settings["targets"] for m in settings["methods"]}


def best_finished(settings: dict, results: dict, method: str, targets: str) -> float | None:
    """The best lr among the seed-0 runs that finished (for a grid the deadline left unfinished:
    its widening step did not run, so the report says so)."""
    done = [r["job"]["lr"] for i, r in results.items() if r["job"].get("kind") == "train" and r["job"].get("method") == method
            and r["job"].get("targets") == targets and r["job"].get("seed") == 0 and not r.get("error")]
    return max(done, key=lambda lr: score(results[train_id(method, targets, lr, 0)])) if done else None
