"""bench/eval_methods.py's whole pipeline on the tiny-llama fixture: 2 steps, every method, the sequence."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "plugins" / "surgeon-train")]


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_eval_methods_tiny(tiny, tmp_path):
    import eval_methods as em

    out = tmp_path / "ev"
    res = em.main(["--model", str(tiny["tiny-llama"]), "--steps", "2", "--seeds", "0", "--rank", "2", "--seq-len", "32",
                   "--ppl-tokens", "128", "--out", str(out), "--work", str(tmp_path / "work"), "--quiet", "--threads", "1"])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data["runs"]] == list(em.METHODS)
    assert [q["method"] for q in data["sequence"]] == ["lora", "nusa"]
    for r in data["runs"]:
        assert _finite(r), r["method"]
        for k in ("taskA_loss", "taskA_acc", "taskA_recall", "ppl", "ppl_increase_pct", "probe_changed", "probe_drift", "taskA_gain_loss", "probe_correct"):
            assert isinstance(r[k], float), (r["method"], k)
        assert len(r["probe_answers"]) == len(em.PROBES)
        assert r["trainable"] > 0 and 0 < r["effective_trainable"] <= r["trainable"]
    lora = next(r for r in data["runs"] if r["method"] == "lora")
    assert lora["trainable"] == em.lora_count(tiny["tiny-llama"], ["q_proj", "v_proj"], 2)
    # LoRA's untrained split is the original model exactly (residual W, B = 0)
    assert abs(lora["untrained_split"]["ppl"] - data["untrained"]["ppl"]) < 1e-6 * data["untrained"]["ppl"]
    for q in data["sequence"]:
        assert _finite(q) and isinstance(q["taskA_loss_increase"], float) and isinstance(q["taskB_loss"], float)
    md = out.with_suffix(".md").read_text()
    for m in em.METHODS:
        assert f"\n| {m} | " in md
    assert "## Sequence" in md and out.with_suffix(".png").stat().st_size > 1000
    assert res["ranks"]["nusa"] >= 1
