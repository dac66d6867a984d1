"""Protocol v2: one verdict per paper claim, from bootstrap intervals (bench/eval/stats.py).

Rule: a difference counts when its 95 % bootstrap interval excludes 0 (accuracy: over seeds × test items;
forgetting: over seeds × text windows; the sequence: over seeds). A claim whose runs are not all in the
archive says "not yet measured: N runs missing".
"""

from __future__ import annotations

import numpy as np

from bench.eval import derive as D
from bench.eval import stats as S

NAMES = {"all": "all-linear", "qv": "q/v"}


def _ci(t, spec="+.3f") -> str:
    return "–" if t is None else f"{t[0]:{spec}} [{t[1]:{spec}}, {t[2]:{spec}}]"


def _missing(s, done, arms, t, heldout=True) -> str:
    return f"**not yet measured: {D.missing(s, done, arms, t, heldout)} runs missing**"


def heldout_claim(s, done, cdata, arm, label, claim, t) -> str:
    """ARM vs LoRA at their chosen points, held-out seeds paired by seed: accuracy (and forgetting)."""
    a, b = cdata.get((arm, t)), cdata.get(("lora", t))
    if a is None or b is None or a["missing"] or b["missing"]:
        return f"**{label}** ({NAMES[t]}) — *{claim}*: " + _missing(s, done, [arm, "lora"], t)
    da, df = S.paired(a["acc"], b["acc"]), S.paired(a["forget"], b["forget"])
    v = S.verdict(da, "not reproduced (the opposite holds: lower accuracy)", "reproduced")
    return (f"**{label}** ({NAMES[t]}) — *{claim}*: **{v}**; held-out test accuracy {arm} − LoRA {_ci(da)} "
            f"(lr {a['lr']:.1e} vs {b['lr']:.1e}, seeds {sorted(set(a['acc']) & set(b['acc']))}), Δ log-ppl {arm} − LoRA {_ci(df)}.")


def milora_claim(s, done, mdata, pdata, t) -> str:
    m = mdata.get(t)
    head = f"**MiLoRA** ({NAMES[t]}) — *adapting the minor singular components learns as well as LoRA while forgetting less*: "
    n = D.missing(s, done, ["milora", "lora"], t, heldout=False)
    if n or D.ref_of(s, done) is None:
        return head + f"**not yet measured: {n + (D.ref_of(s, done) is None)} runs missing**"
    if not m or not m["matched"] or "milora" not in next(iter(m["matched"].values())):
        return head + "**not resolved**: the curves share no accuracy level (see the matched-accuracy section)."
    lvl, res = next(iter(m["matched"].items()))
    diff = res["milora"].get("diff")
    v = S.verdict(diff, "reproduced (less forgetting at matched accuracy)", "not reproduced (the opposite holds: more forgetting)")
    paper = pdata.get("milora@3.2e-4", {}) if t == "all" else {}
    extra = f"; at the paper's lr 3.2e-4: accuracy {_ci(paper.get('acc'))}, Δ log-ppl {_ci(paper.get('forget'))}" if paper.get("acc") else ""
    return head + f"**{v}**; at matched test accuracy {float(lvl):.3f}, Δ log-ppl MiLoRA − LoRA {_ci(diff)}{extra}."


def pissa_equal_lr(pdata) -> str:
    rows = [(k.split("@")[1], v["acc"]) for k, v in pdata.items() if k.startswith("pissa@") and v.get("acc")]
    if not rows:
        return ""
    up = [lr for lr, d in rows if d[1] > 0]
    down = [lr for lr, d in rows if d[2] < 0]
    return (f" At equal lr (PiSSA's own setting, {len(rows)} grid lrs, selection seeds): higher accuracy than LoRA at {', '.join(up) or 'none'}, "
            f"lower at {', '.join(down) or 'none'}.")


def sequence_rows(s, done) -> tuple[list[str], dict]:
    tag, order = s["tag"], s["tasks"]
    data = {}
    for arm in s["seq_arms"]:
        recs = [r for k, r in done.items() if k.startswith(f"seq-{s['targets'][0]}-{arm}-s") and k.endswith("-" + tag) and not r.get("error")]
        rows = []
        for r in recs:
            acc = np.array([[st["test"][t]["acc"] for t in order] for st in r["result"]["stages"]])  # acc[k, j]: task j after stage k
            rows.append({"seed": r["job"]["seed"], "ACC": float(acc[-1].mean()), "BWT": float(np.mean([acc[-1, j] - acc[j, j] for j in range(len(order) - 1)]))})
        data[arm] = rows
    lines = ["## Three tasks in sequence (" + " → ".join(order) + ", absorbed after each)", "",
             "ACC: final mean test accuracy over the tasks; BWT: mean over the earlier tasks of (final accuracy − accuracy right after "
             "learning it), negative = forgetting. Mean [95 % bootstrap over seeds].", "", "| arm | seeds | ACC | BWT |", "|---|---|---|---|"]
    for arm, rows in data.items():
        if not rows:
            lines.append(f"| {arm} | 0 | not yet measured | |")
            continue
        acc, bwt = (S.boot([[r[k]] for r in rows]) for k in ("ACC", "BWT"))
        lines.append(f"| {arm} | {len(rows)} | {_ci(acc, '.3f')} | {_ci(bwt, '+.3f')} |")
    return lines + [""], data


def nusa_claim(s, sdata) -> str:
    head = "**NuSA-CL** — *continual learning in the null space keeps earlier tasks without replay*: "
    n_need = len(s["seq_seeds"])
    lack = {a: n_need - len(sdata.get(a, [])) for a in ("nusa", "lora")}
    if any(lack.values()):
        return head + f"**not yet measured: {sum(lack.values())} sequence runs missing**"
    out = []
    for other in [a for a in s["seq_arms"] if a != "nusa" and len(sdata.get(a, [])) == n_need]:
        d = S.paired({r["seed"]: [r["BWT"]] for r in sdata["nusa"]}, {r["seed"]: [r["BWT"]] for r in sdata[other]})
        da = S.paired({r["seed"]: [r["ACC"]] for r in sdata["nusa"]}, {r["seed"]: [r["ACC"]] for r in sdata[other]})
        out.append(f"BWT NuSA − {other} {_ci(d)}, ACC NuSA − {other} {_ci(da)}")
        if other == "lora":
            v = S.verdict(d, "not reproduced (the opposite holds: more forgetting)", "reproduced (less backward forgetting)")
    return head + f"**{v}** (over {n_need} seeds, paired by seed); " + "; ".join(out) + "."


def latency_claim(s, done) -> str:
    head = "**MiLoRA-mixture** — *gates computed once per prompt cut latency against per-token routing (multi-tenant batches)*: "
    rec = done.get(f"latency-{s['tag']}")
    if not s.get("latency_batches"):
        return head + "**not planned in this protocol**."
    if rec is None or rec.get("error"):
        return head + "**not yet measured: 1 run missing** (the latency job, alone on the GPU, against a true per-token router: bench/eval/per_token.py)" + (
            f"; last attempt: {rec['error']}" if rec else "")
    lat, per, bits = rec["result"], {}, []
    for b, v in lat["batches"].items():
        c, t = v["moe_cached"]["best_s"], v["moe_per_token"]["best_s"]
        per[b] = c < 0.95 * t
        bits.append(f"batch {b}: {v['moe_cached']['ms_per_step']:.1f} ms/token cached vs {v['moe_per_token']['ms_per_step']:.1f} per-token "
                    f"(plain LoRA {v['lora']['ms_per_step']:.1f})")
    yes = [b for b, ok in per.items() if ok]
    verdict = "reproduced" if len(yes) == len(per) else ("reproduced only at batch " + ", ".join(yes)) if yes else "not reproduced"
    return head + f"**{verdict}** (faster by more than 5 %, best of {lat['repeat']} rounds); " + "; ".join(bits) + f" ({lat['device']}, {lat['weights']})."


def claims(s, done, ref, cdata, mdata, pdata, sdata) -> list[str]:
    out = []
    for t in s["targets"]:
        out.append(milora_claim(s, done, mdata, pdata, t))
    for t in s["targets"]:
        c = heldout_claim(s, done, cdata, "pissa", "PiSSA", "training the principal components learns more than LoRA at equal budget", t)
        out.append(c + (pissa_equal_lr(pdata) if t == "all" else ""))
    for arm, label in (("kasa", "KaSA (PEFT's truncation)"), ("kasa-authors", "KaSA (the authors' truncation, alpha 2r)")):
        for t in s["targets"]:
            out.append(heldout_claim(s, done, cdata, arm, label, "knowledge-aware truncation plus a gated update beats LoRA at equal budget", t))
    out.append(nusa_claim(s, sdata))
    for t in s["targets"]:
        out.append(heldout_claim(s, done, cdata, "moe", "MiLoRA-mixture", "a prompt-routed mixture of LoRA experts beats one LoRA at equal budget", t))
    out.append(latency_claim(s, done))
    for arm in s.get("calibrated_pending", []):
        out.append(f"**{arm}** (calibrated split, issue 24): **not yet measured**: `surgeon split --calibrate` is not in this checkout.")
    return out
