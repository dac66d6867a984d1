"""Job results → one JSON document (bench/eval_methods_v1.json): settings, the untrained reference, every
run with its derived forgetting measures, the chosen lrs, the sequences, the KaSA sweep, latency."""

from __future__ import annotations

import math

from bench.eval import plan as P
from bench.eval.probes import probe_correct, probe_drift


def mean_sd(xs) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, len(xs)


def _task_mean(split: dict) -> float:
    return sum(v["acc"] for v in split.values()) / len(split)


def _run(rec: dict, ref: dict | None) -> dict:
    j, r = rec["job"], rec.get("result")
    row = {k: j[k] for k in ("method", "targets", "lr", "seed")}
    if rec.get("error") or r is None:
        return row | {"error": rec.get("error", "no result")}
    row |= {k: r[k] for k in ("rank", "trainable", "effective_trainable", "final_train_loss", "train_s", "tokens_per_s", "steps",
                              "warmup_steps", "ppl", "split_ppl", "probe_correct", "probe_answers", "job_s")}
    row["test"] = {t: {k: v[k] for k in ("acc", "lenient", "loss", "answers")} for t, v in r["test"].items()}
    if "val" in r:
        row["val"] = {t: {k: v[k] for k in ("acc", "loss")} for t, v in r["val"].items()}
        row["val_acc"] = _task_mean(r["val"])
    row["test_acc"] = _task_mean(r["test"])
    if ref:
        row["ppl_increase_pct"] = 100 * (r["ppl"] / ref["ppl"] - 1)
        if r["split_ppl"] is not None:
            row["split_ppl_increase_pct"] = 100 * (r["split_ppl"] / ref["ppl"] - 1)
        row["probe_changed"], row["probe_drift"] = probe_drift(r["probe_answers"], ref["probe_answers"])
        row["probe_correct_change"] = r["probe_correct"] - ref["probe_correct"]
    return row


def _seq(rec: dict, ref: dict | None, order: list[str]) -> dict:
    j, r = rec["job"], rec.get("result")
    row = {k: j[k] for k in ("method", "targets", "lr", "seed")}
    if rec.get("error") or r is None:
        return row | {"error": rec.get("error", "no result")}
    st = r["stages"]
    acc = [[s["test"][t]["acc"] for t in order] for s in st]  # acc[k][j]: task j after stage k
    n = len(order)
    row |= {"rank": r["rank"], "acc": acc, "ppl": [s["ppl"] for s in st], "trainable": st[0]["trainable"]}
    row["learned"] = [acc[k][k] for k in range(n)]  # each task right after it was trained
    row["final"] = acc[-1]
    row["forgetting"] = [acc[j][j] - acc[-1][j] for j in range(n - 1)]
    row["avg_forgetting"] = sum(row["forgetting"]) / max(1, n - 1)
    row["avg_final_acc"] = sum(acc[-1]) / n
    row["avg_learned_acc"] = sum(row["learned"]) / n
    if ref:
        row["ppl_increase_pct"] = [100 * (p / ref["ppl"] - 1) for p in row["ppl"]]
        row["probe_correct"] = [probe_correct(s["probe_answers"]) for s in st]
        row["probe_changed_final"] = probe_drift(st[-1]["probe_answers"], ref["probe_answers"])[0]
    return row


def aggregate(settings: dict, plan: dict, results: dict, invocations: list[dict]) -> dict:
    ref_rec = results.get("ref")
    ref = ref_rec["result"] if ref_rec and not ref_rec.get("error") else None
    runs = [_run(r, ref) for jid, r in sorted(results.items()) if r["job"].get("kind") == "train"]
    seq = [_seq(r, ref, settings["seq_tasks"]) for jid, r in sorted(results.items()) if r["job"].get("kind") == "seq"]
    best = P.best_lrs(settings, results)
    summary = {}
    for key, lr in best.items():
        m, t = key.split("/")
        finished = lr is not None
        lr = lr if finished else P.best_finished(settings, results, m, t)
        rs = [x for x in runs if x["method"] == m and x["targets"] == t and lr is not None and P.lr_tag(x["lr"]) == P.lr_tag(lr) and "error" not in x]
        grid = {P.lr_tag(x["lr"]): (x.get("val_acc") if "error" not in x else None) for x in runs if x["method"] == m and x["targets"] == t and x["seed"] == 0}
        summary[key] = {"best_lr": lr, "grid_finished": finished, "grid_val_acc": grid, "seeds": [x["seed"] for x in rs],
                        "edge": lr is not None and grid and P.lr_tag(lr) in (min(grid, key=lambda g: float(g)), max(grid, key=lambda g: float(g))),
                        **{f: mean_sd([x.get(f) for x in rs]) for f in ("test_acc", "ppl_increase_pct", "probe_correct", "probe_changed", "split_ppl",
                                                                         "final_train_loss", "train_s")},
                        **{f"test_{tk}": mean_sd([x["test"][tk]["acc"] for x in rs]) for tk in settings["tasks"]},
                        "trainable": rs[0]["trainable"] if rs else None, "effective_trainable": rs[0]["effective_trainable"] if rs else None,
                        "rank": rs[0]["rank"] if rs else None}
    kasa = results.get("kasa-sweep", {}).get("result")
    lat = results.get("latency", {}).get("result")
    return {"settings": settings, "plan": plan, "untrained": ref, "summary": summary, "runs": runs, "sequence": seq,
            "kasa_sweep": kasa, "latency": lat, "invocations": invocations,
            "errors": {jid: r["error"] for jid, r in results.items() if r.get("error")}}
