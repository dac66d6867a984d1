"""bench/eval_methods.py: the generated tasks, the budget plan, and the whole runner on the tiny-llama
fixture (2 steps, every method, the sequence, the KaSA sweep, latency), resumed, re-rendered."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "plugins" / "surgeon-train")]


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_tasks_are_deterministic_disjoint_and_checked():
    from bench.eval import tasks as T

    a, b = T.make_tasks(50, 10, 20), T.make_tasks(50, 10, 20)
    assert a == b and T.make_tasks(50, 10, 20, seed=1) != a
    for name, sp in a.items():
        assert [len(sp[s]) for s in ("train", "val", "test")] == [50, 10, 20]
        prompts = [set(r["prompt"] for r in sp[s]) for s in ("train", "val", "test")]
        assert sum(map(len, prompts)) == 80 and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    add = a["add"]["test"][0]
    x, y = map(int, add["prompt"].split("What is ")[1].split("?")[0].split(" + "))
    assert add["completion"] == str(x + y)
    rev = a["reverse"]["test"][0]
    assert rev["completion"].split() == rev["prompt"].split(": ")[1].split()[::-1]
    look = a["lookup"]["test"][0]
    pairs = dict(p.split("=") for p in look["prompt"].split(". What")[0].split(", "))
    assert pairs[look["prompt"].rsplit(" ", 1)[1].rstrip("?")] == look["completion"]
    assert T.exact(" 1226.", "1226") and not T.exact("1226 apples", "1226")
    assert T.lenient("The sum is 1226.", "1226") and not T.lenient("The sum is 12260.", "1226")


def test_nusa_rank_matches_the_effective_budget():
    from bench.eval.folders import nusa_rank_for

    r, eff = nusa_rank_for(1000, [5, 40, 40], kmin=64)
    assert eff == sum(min(n, r) ** 2 for n in (5, 40, 40)) and abs(eff - 1000) <= abs(sum(min(n, r + 1) ** 2 for n in (5, 40, 40)) - 1000)
    assert nusa_rank_for(10**9, [5, 40, 40], kmin=32)[0] == 31  # capped below the smallest min(out, in)


def test_runner_tiny_end_to_end(tmp_path):
    import eval_methods as em

    out, res_dir = tmp_path / "ev", tmp_path / "results"
    argv = ["--model", str(ROOT / "fixtures" / "tiny-llama"), "--workers", "0", "--n-probes", "4", "--steps", "2", "--seeds", "0", "--grid-points", "1", "--max-widen", "0",
            "--n-train", "12", "--n-val", "3", "--n-test", "4", "--seq-steps", "2", "--kasa-ranks", "1", "2", "--kasa-sets", "qv", "all",
            "--latency-batches", "1", "3", "--latency-new-tokens", "3", "--latency-repeat", "1", "--ppl-tokens", "128", "--seq-len", "64",
            "--batch-size", "2", "--results", str(res_dir), "--work", str(tmp_path / "work"), "--out", str(out)]
    res = em.main(argv)
    data = json.loads(out.with_suffix(".json").read_text())
    assert not data["errors"] and not data["not_run"], (data["errors"], data["not_run"])
    assert {(r["method"], r["targets"]) for r in data["runs"]} == {(m, t) for m in em.METHODS for t in ("all", "qv")}
    for r in data["runs"]:
        assert _finite(r) and r["steps"] == 2 and set(r["test"]) == {"add", "reverse", "lookup"}, r["method"]
        assert 0 < r["effective_trainable"] <= r["trainable"] and 0 <= r["test_acc"] <= 1
    lora = next(r for r in data["runs"] if r["method"] == "lora" and r["targets"] == "qv")
    assert lora["trainable"] == data["plan"]["budget"]["qv"]
    assert abs(lora["split_ppl"] - data["untrained"]["ppl"]) < 1e-5 * data["untrained"]["ppl"]  # PEFT-init LoRA: the original model
    assert sorted(q["method"] for q in data["sequence"]) == ["lora", "nusa"]
    for q in data["sequence"]:
        assert len(q["acc"]) == 3 and all(len(row) == 3 for row in q["acc"]) and _finite(q)
    assert {r["set"] for r in data["kasa_sweep"]["rows"]} == {"qv", "all"}
    assert set(data["latency"]["batches"]) == {"1", "3"} and data["latency"]["batches"]["1"]["same_tokens_cached_vs_per_step"]
    md = out.with_suffix(".md").read_text()
    assert "## The papers' claims" in md and "## Proposed README summary" in md and md.count("**PiSSA**") == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
    again = em.main(argv)  # resumed: every job is found finished, nothing runs
    assert again["invocations"][-1]["started"] == 0 and len(again["runs"]) == len(res["runs"])
    md = out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    em.main(["--from-json", str(out.with_suffix(".json"))])
    assert out.with_suffix(".md").read_text() == md
