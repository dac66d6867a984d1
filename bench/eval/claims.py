"""One sentence per paper claim, decided from the numbers by a fixed rule (stated in the md).

Rule: a difference between two arms counts when |mean_a − mean_b| > max(2·SE, floor), SE the standard
error of the difference over seeds (sqrt(s_a²/n_a + s_b²/n_b)); floors: 0.01 accuracy, 1 percentage
point of perplexity increase, 5 % of a latency. A claim that holds for one target set and not the
other is "reproduced only with" that set.
"""

from __future__ import annotations

import math

from bench.eval.aggregate import mean_sd

TARGET_NAMES = {"all": "all-linear", "qv": "q/v"}


def compare(a: list[float], b: list[float], floor: float) -> tuple[int, float, float]:
    """(sign, mean difference a − b, SE) with sign ∈ {+1, 0, −1} by the rule above."""
    (ma, sa, na), (mb, sb, nb) = mean_sd(a), mean_sd(b)
    if not na or not nb:
        return 0, math.nan, math.nan
    d = ma - mb
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    return (1 if d > max(2 * se, floor) else -1 if d < -max(2 * se, floor) else 0), d, se


def _vals(res: dict, method: str, targets: str, field: str) -> list[float]:
    s = res["summary"].get(f"{method}/{targets}")
    if not s or s["best_lr"] is None:
        return []
    return [r[field] for r in res["runs"] if r["method"] == method and r["targets"] == targets and "error" not in r
            and r["seed"] in s["seeds"] and abs(r["lr"] - s["best_lr"]) < 1e-12 and r.get(field) is not None]


def _verdict(per_target: dict[str, bool | None], signs: dict[str, int] | None = None) -> str:
    known = {t: v for t, v in per_target.items() if v is not None}
    if not known:
        return "not measured"
    yes = [t for t, v in known.items() if v]
    if len(yes) == len(known):
        return "reproduced"
    if yes:
        return "reproduced only with " + " and ".join(TARGET_NAMES.get(t, t) for t in yes) + " targets"
    if signs and all(signs.get(t, 0) < 0 for t in known):
        return "not reproduced (the opposite holds)"
    return "not reproduced (no difference beyond the seed noise)" if signs else "not reproduced"


def _acc(res, m, t):
    return mean_sd(_vals(res, m, t, "test_acc"))[0]


def _f(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def task_claim(res, method: str, other: str, label: str, claim: str) -> str:
    per, signs, bits = {}, {}, []
    for t in res["settings"]["targets"]:
        a, b = _vals(res, method, t, "test_acc"), _vals(res, other, t, "test_acc")
        sign, d, se = compare(a, b, 0.01)
        per[t], signs[t] = ((sign > 0) if a and b else None), sign
        loss = [mean_sd(_vals(res, x, t, "final_train_loss"))[0] for x in (method, other)]
        bits.append(f"{TARGET_NAMES[t]}: test accuracy {_f(_acc(res, method, t))} vs {_f(_acc(res, other, t))} (Δ {_f(d, '+.3f')} ± {_f(se)}), "
                    f"final training loss {_f(loss[0])} vs {_f(loss[1])}")
    return f"**{label}** — *{claim}*: **{_verdict(per, signs)}**; " + "; ".join(bits) + "."


def milora_claim(res) -> str:
    per, bits = {}, []
    for t in res["settings"]["targets"]:
        acc_s, _, _ = compare(_vals(res, "milora", t, "test_acc"), _vals(res, "lora", t, "test_acc"), 0.01)
        f_l, dl, _ = compare(_vals(res, "milora", t, "ppl_increase_pct"), _vals(res, "lora", t, "ppl_increase_pct"), 1.0)
        have = _vals(res, "milora", t, "test_acc") and _vals(res, "lora", t, "test_acc")
        per[t] = (acc_s >= 0 and f_l < 0) if have else None
        why = ("holds" if per[t] else "learns less than LoRA" if acc_s < 0 else "forgets MORE than LoRA" if f_l > 0
               else "forgets no less than LoRA beyond the seed noise") if have else "not measured"
        bits.append(f"{TARGET_NAMES[t]} ({why}): accuracy {_f(_acc(res, 'milora', t))} (LoRA {_f(_acc(res, 'lora', t))}), perplexity increase "
                    f"{_f(mean_sd(_vals(res, 'milora', t, 'ppl_increase_pct'))[0], '.1f')} % vs LoRA {_f(mean_sd(_vals(res, 'lora', t, 'ppl_increase_pct'))[0], '.1f')} % "
                    f"and PiSSA {_f(mean_sd(_vals(res, 'pissa', t, 'ppl_increase_pct'))[0], '.1f')} %, probes correct "
                    f"{_f(mean_sd(_vals(res, 'milora', t, 'probe_correct'))[0], '.2f')} vs LoRA {_f(mean_sd(_vals(res, 'lora', t, 'probe_correct'))[0], '.2f')}")
    return ("**MiLoRA** — *adapting the minor singular components learns the task as well as LoRA while forgetting less*: "
            f"**{_verdict(per)}**; " + "; ".join(bits) + ".")


def kasa_claim(res) -> str:
    base = task_claim(res, "kasa", "lora", "KaSA", "knowledge-aware truncation plus a gated update beats LoRA at equal budget")
    sw = res.get("kasa_sweep")
    if not sw:
        return base
    safe = []
    for name in dict.fromkeys(r["set"] for r in sw["rows"]):
        rows = sorted((r for r in sw["rows"] if r["set"] == name), key=lambda r: r["rank"])
        ok = [r["rank"] for r in rows[: next((i for i, r in enumerate(rows) if r["ppl_ratio"] > 1.10), len(rows))]]
        safe.append(f"{name} r ≤ {ok[-1]}" if ok else f"{name} none")
    safe = ", ".join(safe)
    return base + f" Before training, the truncation keeps perplexity within 10 % of the original for (ranks measured: {sw_ranks(sw)}): {safe}."


def sw_ranks(sw) -> str:
    return ", ".join(map(str, sorted({r["rank"] for r in sw["rows"]})))


def nusa_claim(res) -> str:
    seq = [r for r in res["sequence"] if "error" not in r]
    by = {m: [r for r in seq if r["method"] == m] for m in ("nusa", "lora")}
    if not by["nusa"] or not by["lora"]:
        return "**NuSA-CL** — *continual learning in the null space keeps earlier tasks without replay*: **not measured**."
    sign, d, se = compare([r["avg_forgetting"] for r in by["nusa"]], [r["avg_forgetting"] for r in by["lora"]], 0.01)
    fin, _, _ = compare([r["avg_final_acc"] for r in by["nusa"]], [r["avg_final_acc"] for r in by["lora"]], 0.01)
    m = {k: {f: mean_sd([r[f] for r in v])[0] for f in ("avg_forgetting", "avg_learned_acc", "avg_final_acc")} for k, v in by.items()}
    ppl = {k: mean_sd([r["ppl_increase_pct"][-1] for r in v if r.get("ppl_increase_pct")])[0] for k, v in by.items()}
    verdict = "reproduced" if sign < 0 else "not reproduced (the opposite holds)" if sign > 0 else "not reproduced (no difference beyond the seed noise)"
    if sign < 0 and fin < 0:
        verdict = "reproduced only as less forgetting: its final mean accuracy stays below LoRA's"
    return ("**NuSA-CL** — *continual learning in the null space keeps earlier tasks without replay*: "
            f"**{verdict}**; over {' → '.join(res['settings']['seq_tasks'])}, mean forgetting of the earlier tasks {_f(m['nusa']['avg_forgetting'])} "
            f"vs LoRA {_f(m['lora']['avg_forgetting'])} (Δ {_f(d, '+.3f')} ± {_f(se)}), accuracy right after learning each task "
            f"{_f(m['nusa']['avg_learned_acc'])} vs {_f(m['lora']['avg_learned_acc'])}, final mean accuracy {_f(m['nusa']['avg_final_acc'])} "
            f"vs {_f(m['lora']['avg_final_acc'])}, general-text perplexity {_f(ppl['nusa'], '+.1f')} % vs {_f(ppl['lora'], '+.1f')} % after the three tasks.")


def latency_claim(res) -> str:
    lat = res.get("latency")
    if not lat:
        return "**MiLoRA-mixture** — *gates computed once per prompt cut latency against per-token routing*: **not measured**."
    if "moe_per_step" not in next(iter(lat["batches"].values())):
        return "**MiLoRA-mixture** — *gates computed once per prompt cut latency against per-token routing*: **not measured** (no per-step mode in the runtime)."
    per, bits = {}, []
    for b, v in lat["batches"].items():
        c, p, pd = (v[k]["best_s"] for k in ("moe_cached", "moe_per_step", "moe_per_step_dense"))
        per[b] = c < 0.95 * min(p, pd)
        bits.append(f"batch {b}: {v['moe_cached']['ms_per_step']:.1f} ms/token cached vs {v['moe_per_step']['ms_per_step']:.1f} per-step "
                    f"({v['moe_per_step_dense']['ms_per_step']:.1f} dense), plain LoRA {v['lora']['ms_per_step']:.1f}, experts active {_f(v['active_expert_share'], '.2f')}")
    yes = [b for b, ok in per.items() if ok]
    verdict = "reproduced" if len(yes) == len(per) else ("reproduced only at batch " + ", ".join(yes)) if yes else "not reproduced"
    return ("**MiLoRA-mixture** — *gates computed once per prompt cut latency against per-token routing (multi-tenant batches)*: "
            f"**{verdict}**; " + "; ".join(bits) + f" ({lat['device']}, {lat['new_tokens']} new tokens, {lat['weights']}).")


def all_claims(res) -> list[str]:
    return [
        task_claim(res, "pissa", "lora", "PiSSA", "training the principal components learns more than LoRA at equal budget"),
        milora_claim(res),
        kasa_claim(res),
        nusa_claim(res),
        task_claim(res, "moe", "lora", "MiLoRA-mixture", "a prompt-routed mixture of LoRA experts beats one LoRA at equal budget"),
        latency_claim(res),
    ]
