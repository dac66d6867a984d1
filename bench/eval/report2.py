"""Protocol v2's report, from the archive alone: bench/eval_methods.{md,png,json}.

Sections: status and the plan to finish, the claims (a verdict with its statistic, or "not yet measured:
N runs missing"), each arm at its chosen point (held-out seeds), forgetting at matched accuracy, the papers'
own settings, the lr curves, the three-task sequence (ACC, BWT), what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.eval import derive as D
from bench.eval import grid as G
from bench.eval import stats as S
from bench.eval.claims2 import claims, sequence_rows
from bench.eval.measure2 import probes
from bench.eval.plots2 import plot

NAMES = {"all": "all-linear", "qv": "q/v"}


def f3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def ci(t, spec=".3f") -> str:
    if t is None:
        return "–"
    return f"{t[0]:{spec}} [{t[1]:{spec}}, {t[2]:{spec}}]"


def chosen_rows(settings, done, ref) -> tuple[list[str], dict]:
    lines = ["## Each arm at its chosen point (held-out seeds)", "",
             "Chosen lr: the best mean validation accuracy over the selection seeds "
             f"{settings['select_seeds']}; measured on the held-out seeds {settings['heldout_seeds']} (the mixture: "
             f"{G.heldout(settings, 'moe')}; never used to choose). "
             "Accuracy: mean over the three tasks' test items, exact match of the greedy answer (an item whose teacher-forced argmax "
             "writes its answer and then stops is settled without generating: the same answer greedy decoding gives); Δ log-ppl: general-text log-perplexity change (nats/token, paired by window); "
             "Δ chat NLL: the probes' reference answers in the chat format; [95 % bootstrap interval over seeds × items or windows]; "
             "divergence: diverged grid runs / finished grid runs; (grid edge): the chosen lr is the grid's first or last point, "
             "so the optimum may lie outside it.", "",
             "| arm | targets | chosen lr | seeds | test accuracy | Δ log-ppl | Δ chat NLL | probes correct | diverged |", "|---|---|---|---|---|---|---|---|---|"]
    data = {}
    for t in settings["targets"]:
        for arm in settings["arms"]:
            best = G.chosen_lr(settings, done, arm, t)
            dv, fin = D.divergence(settings, done, arm, t)
            if best is None or ref is None:
                lines.append(f"| {arm} | {NAMES[t]} | – | – | not yet measured: {D.missing(settings, done, [arm], t)} runs missing | | | | {dv}/{fin} |")
                continue
            p = D.point(settings, done, ref, arm, t, best, G.heldout(settings, arm))
            data[(arm, t)] = p | {"lr": best}
            acc = S.boot(list(p["acc"].values())) if p["acc"] else None
            fg = S.boot(list(p["forget"].values())) if p["forget"] else None
            ch = S.boot(list(p["chat"].values())) if p["chat"] else None
            pr = np.mean(list(p["probe"].values())) if p["probe"] else None
            edge = " (grid edge)" if best in (settings["grid"][0], settings["grid"][-1]) else ""
            lines.append(f"| {arm} | {NAMES[t]} | {G.lr_tag(best)}{edge} | {len(p['acc'])}" + (f" ({p['missing']} missing)" if p["missing"] else "")
                         + f" | {ci(acc)} | {ci(fg)} | {ci(ch)} | {f3(pr)} | {dv}/{fin} |")
    return lines + [""] + room(settings, data), data


def room(settings, data) -> list[str]:
    """Per task, the held-out accuracy of each arm at its point: whether the tasks leave room (none at ceiling or floor)."""
    if not data:
        return []
    tasks = settings["tasks"]
    lines = ["Per task (held-out seeds, mean): does the benchmark leave room? (v1's reversal and lookup were at ≈ 1.0.)", "",
             "| arm | targets | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    means = {t: [] for t in tasks}
    for (arm, tg), p in data.items():
        row = []
        for t in tasks:
            m = float(np.mean(p["task_acc"][t])) if p["task_acc"][t] else None
            row.append(f3(m))
            if m is not None:
                means[t].append(m)
        lines.append(f"| {arm} | {NAMES[tg]} | " + " | ".join(row) + " |")
    flags = [f"{t} at ceiling (every arm ≥ 0.95)" for t, v in means.items() if v and min(v) >= 0.95]
    flags += [f"{t} at floor (every arm ≤ 0.05)" for t, v in means.items() if v and max(v) <= 0.05]
    return lines + ["", ("Not separating: " + "; ".join(flags) + ".") if flags else "No task is at ceiling or floor for every arm.", ""]


def matched_rows(settings, done, ref) -> tuple[list[str], dict]:
    lines = ["## Forgetting at matched accuracy", "",
             "Along each arm's lr curve (selection seeds, every grid lr), the forgetting (Δ log-ppl) where the test accuracy first reaches a "
             "common level, linear in accuracy between the two grid points around it; the level is the highest accuracy every arm's curve "
             "reaches (and 80 % of it). Difference against LoRA: paired bootstrap (same seeds, same windows).", ""]
    out = {}
    for t in settings["targets"]:
        curves = {a: c for a in settings["arms"] if (c := D.curve(settings, done, ref, a, t)) and len(c["lr"]) == len(settings["grid"])} if ref else {}
        need = [a for a in settings["arms"] if a not in curves]
        if "lora" not in curves or len(curves) < 2:
            lines += [f"{NAMES[t]}: not yet measured: {D.missing(settings, done, need, t, heldout=False)} grid runs missing "
                      f"(arms without a complete curve: {', '.join(need)}).", ""]
            continue
        a_c = S.common_accuracy(curves)
        if a_c is None:
            lines += [f"{NAMES[t]}: no common accuracy level (an arm's lowest grid point is above another arm's best).", ""]
            out[t] = {"level": None, "matched": {}}
            continue
        lines += [f"**{NAMES[t]}**" + (f" (not in the comparison yet: {', '.join(need)})" if need else ""), "",
                  "| arm | " + " | ".join(f"Δ log-ppl at acc {lvl:.3f} | vs LoRA" for lvl in (a_c, 0.8 * a_c)) + " |", "|---|" + "---|---|" * 2]
        res = {lvl: S.matched(curves, lvl, "lora", reps=1000) for lvl in (a_c, 0.8 * a_c)}
        for arm in curves:
            cells = []
            for m in res.values():
                r = m[arm]
                cells.append(f"{f3(r['forget'])}" + (f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if "ci" in r else ""))
                cells.append(ci(r.get("diff"), "+.3f") if arm != "lora" else "")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        out[t] = {"level": a_c, "matched": {str(k): v for k, v in res.items()}}
        lines.append("")
    return lines, out


def paper_rows(settings, done, ref) -> tuple[list[str], dict]:
    lines = ["## The papers' own settings", "",
             "PiSSA's: PiSSA against LoRA at the SAME lr (every grid lr); MiLoRA's: lr ≈ 3e-4 (the grid's 3.2e-4). Paired differences over the "
             "selection seeds (accuracy: items; forgetting: windows), all-linear targets.", "",
             "| comparison | lr | Δ test accuracy | Δ Δlog-ppl |", "|---|---|---|---|"]
    out = {}
    t = settings["targets"][0]
    pairs = [("pissa", lr) for lr in settings["grid"]] + [("milora", G.DECISIVE_LRS[0])]
    for arm, lr in pairs:
        if ref is None:
            break
        a = D.point(settings, done, ref, arm, t, lr, settings["select_seeds"])
        b = D.point(settings, done, ref, "lora", t, lr, settings["select_seeds"])
        da, df = S.paired(a["acc"], b["acc"]), S.paired(a["forget"], b["forget"])
        out[f"{arm}@{G.lr_tag(lr)}"] = {"acc": da, "forget": df}
        if da is None:
            continue
        lines.append(f"| {arm} − lora | {G.lr_tag(lr)} | {ci(da, '+.3f')} | {ci(df, '+.3f')} |")
    if not any(v["acc"] for v in out.values()):
        need = D.missing(settings, done, ["pissa", "milora", "lora"], t, heldout=False)
        lines.append(f"| not yet measured: {need + (ref is None)} runs missing | | | |")
    return lines + [""], out


def curve_rows(settings, done, ref) -> list[str]:
    lines = ["## The lr curves", "", "Mean over the selection seeds: test accuracy / Δ log-ppl (– not run yet; × diverged).", ""]
    for t in settings["targets"]:
        lines += [f"**{NAMES[t]}**", "", "| arm | " + " | ".join(G.lr_tag(lr) for lr in settings["grid"]) + " |", "|---|" + "---|" * len(settings["grid"])]
        for arm in settings["arms"]:
            cells = []
            for lr in settings["grid"]:
                recs = [r for r in D.runs(settings, done, arm, t, lr) if r["job"].get("select")]
                ok = [r["result"] for r in recs if not r.get("error") and not D.diverged(r)]
                if not recs:
                    cells.append("–")
                elif not ok:
                    cells.append("×")
                else:
                    acc = np.mean([D.bits(r, settings["tasks"]).mean() for r in ok])
                    fg = np.mean([D.forget(r, ref).mean() for r in ok]) if ref else float("nan")
                    cells.append(f"{acc:.2f} / {fg:+.2f}" + ("×" * (len(recs) - len(ok))))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def missing_rows(settings, done) -> list[str]:
    """Per arm and target set: the grid's selection runs and the held-out runs not in the archive."""
    tag = settings["tag"]
    lines = ["## What is missing", "", "| arm | targets | grid runs missing (of {}) | held-out runs missing | chosen lr |".format(
        len(settings["grid"]) * len(settings["select_seeds"])), "|---|---|---|---|---|"]
    for t in settings["targets"]:
        for arm in settings["arms"] + settings.get("calibrated_pending", []):
            grid = sum(G.train_id(arm, t, lr, s, tag) not in done for lr in settings["grid"] for s in settings["select_seeds"])
            best = G.chosen_lr(settings, done, arm, t) if arm in settings["arms"] else None
            seeds = G.heldout(settings, arm)
            held = len(seeds) if best is None else sum(G.train_id(arm, t, best, s, tag) not in done for s in seeds)
            why = " (waits for `surgeon split --calibrate`)" if arm not in settings["arms"] else ""
            lines.append(f"| {arm}{why} | {NAMES[t]} | {grid} | {held} of {len(seeds)} | {G.lr_tag(best) if best else '–'} |")
    seq = sum(f"seq-{settings['targets'][0]}-{a}-s{s}-{tag}" not in done for a in settings["seq_arms"] for s in settings["seq_seeds"])
    lat = done.get(f"latency-{tag}")
    return lines + ["", f"Sequence runs missing: {seq} of {len(settings['seq_arms']) * len(settings['seq_seeds'])} "
                        f"({', '.join(settings['seq_arms'])} × seeds {settings['seq_seeds']}); untrained reference: "
                        f"{'done' if D.ref_of(settings, done) else 'missing'}; latency job (per-token router): "
                        f"{'done' if lat and not lat.get('error') else 'missing'}.", ""]


def status(settings, done) -> list[str]:
    need = G.planned(settings)
    tag = settings["tag"]
    have = {k: sum(1 for i, r in done.items() if i.endswith(tag) and r["job"]["kind"] == k and not (r.get("error") and not D.diverged(r))) for k in need}
    devs = sorted({(r.get("result") or {}).get("device_name") for i, r in done.items() if i.endswith(tag) and (r.get("result") or {}).get("device_name")})
    lines = [f"Archive: {sum(have.values())} of {sum(need.values())} planned jobs finished (" + ", ".join(f"{k} {have[k]}/{need[k]}" for k in need) + ")"
             + (f" on {', '.join(devs)}" if devs else "") + ". Resume and finish: see \"Plan to finish\" below."]
    if settings.get("calibrated_pending"):
        lines.append(f"The calibrated arms ({', '.join(settings['calibrated_pending'])}) wait for `surgeon split --calibrate` (issue 24).")
    return lines + [""]


def markdown(settings, done) -> tuple[str, dict]:
    ref = D.ref_of(settings, done)
    s = settings
    lines = ["# Do the methods do what their papers claim? (protocol v2, issue 25)", ""] + status(s, done)
    lines += ["## Protocol", "",
              f"{s['model_name']}, rank {s['rank']} (NuSA matched on its effective count), {s['steps']} steps, batch {s['batch_size']}, "
              f"sequence length {s['seq_len']}; tasks {s['task_version']} (4–5-digit addition, reversal of 8–10 words, lookup among 20 pairs), "
              f"{s['n_train']} training, {s['n_val']} validation, {s['n_test']} test items per task, no input shared between splits; lr grid "
              f"{', '.join(G.lr_tag(x) for x in s['grid'])} for every arm, selection seeds {s['select_seeds']}, held-out seeds "
              f"{s['heldout_seeds']}; forgetting on the general text (bench/eval/general/README.md) in {len(ref['gen_nll']) if ref else 222} windows of 256 tokens "
              "inside documents, "
              f"on the chat-formatted reference answers of {len(probes())} probes, "
              "and the probes' keyword accuracy. The earlier protocol's report: [bench/eval_methods_v1.md](eval_methods_v1.md).", ""]
    chosen, cdata = chosen_rows(s, done, ref)
    matched, mdata = matched_rows(s, done, ref)
    paper, pdata = paper_rows(s, done, ref)
    seq_lines, sdata = sequence_rows(s, done)
    lines += ["## The papers' claims", ""] + [f"- {c}" for c in claims(s, done, ref, cdata, mdata, pdata, sdata)] + [""]
    lines += chosen + matched + paper + curve_rows(s, done, ref) + seq_lines
    return "\n".join(lines) + "\n", {"chosen": {f"{a}/{t}": {"lr": v["lr"]} for (a, t), v in cdata.items()}, "matched": mdata}


def plan_section(settings, done, workers: int = 8) -> list[str]:
    per, src = G.per_job_seconds(done, settings["tag"], settings.get("est"))
    c = G.cost(settings, {k: r for k, r in done.items() if k.endswith(settings["tag"]) and not (r.get("error") and not D.diverged(r))}, per, workers)
    return ["## Plan to finish", "",
            "Left: " + ", ".join(f"{c['left'][k]} {k} runs × {per[k]:.0f} s" for k in c["left"]) + f" ÷ {workers} workers ≈ {c['total_s']:.0f} seconds "
            f"of one GPU's time ≈ {c['total_s'] / 540:.1f} calls of 9 minutes ({src}). Each call: the staging and compute calls in the header of "
            "bench/eval/gpu_run2.sh (`bash bench/eval/gpu_prep2.sh` first), then "
            "`python bench/eval_methods.py fold NEW.jsonl` and `python bench/eval_methods.py report`; the plan takes the most valuable jobs first "
            "(bench/eval/grid.py). The latency job (the mixture against a true per-token router, bench/eval/per_token.py) runs last, alone on "
            "the GPU.", ""]


def write(settings: dict, done: dict, out: Path) -> dict:
    md, data = markdown(settings, done)
    md += "\n".join(missing_rows(settings, done) + plan_section(settings, done)) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    plot(settings, done, D.ref_of(settings, done), out.with_suffix(".png"), {t: v["level"] for t, v in data["matched"].items()})
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float), encoding="utf-8")
    return data | {"md": md}
