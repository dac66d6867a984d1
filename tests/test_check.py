"""`surgeon check`: the split against its original, on text (issue 23).

    python -m pytest -q tests/test_check.py
"""

from __future__ import annotations

import json

import pytest
from cliutil import one_error_line, run

from surgeon.commands.check import check
from surgeon.commands.split import SplitOptions, split


@pytest.fixture(scope="module")
def splits(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    out = {}
    for name, opts in {"milora32": SplitOptions(method="milora", rank=4, dtype="float32"),
                       "kasa": SplitOptions(method="kasa", rank=12)}.items():
        split(str(tiny["tiny-llama"]), root / name, opts)
        out[name] = root / name
    return out


def test_untrained_float32_milora_split_matches_its_original(splits):
    r = check(splits["milora32"])
    assert r["max_abs_logit_diff"] < 1e-3 and r["top1_agreement"] == 1.0
    assert r["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5) and r["tokens"] > 200


def test_kasa_split_is_reported_as_different(splits):
    r = check(splits["kasa"])
    assert r["top1_agreement"] < 1.0 and r["max_abs_logit_diff"] > 1e-3
    assert r["perplexity_ratio"] != pytest.approx(1.0, abs=1e-6)


def test_cli_one_line_and_json(splits):
    res = run("check", splits["kasa"])
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.output.splitlines() if "top-1 agreement" in ln]
    assert len(line) == 1 and "perplexity" in line[0] and "ratio" in line[0] and "max |Δlogit|" in line[0]
    res = run("check", splits["kasa"], "--json", "--tokens", "40")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout[res.stdout.index("{"):])
    assert r["tokens"] == 39 and 0 <= r["top1_agreement"] < 1 and r["perplexity_ratio"] > 0


def test_data_in_chat_format(splits, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "Name a river."},
                                          {"role": "assistant", "content": "The Danube flows through ten countries."}]}) + "\n")
    r = check(splits["milora32"], data=f)
    assert r["data"] == str(f) and 5 < r["tokens"] < 100 and r["max_abs_logit_diff"] < 1e-3


def test_errors_are_one_line(splits, tmp_path):
    one_error_line(run("check", tmp_path))  # not a split
    one_error_line(run("check", splits["milora32"], "--data", tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    out = one_error_line(run("check", splits["milora32"], "--data", bad))
    assert "--columns" in out and "messages" in out


@pytest.mark.real_model
def test_real_model_milora_float32_and_kasa(smollm2, tmp_path):
    split(str(smollm2), tmp_path / "m", SplitOptions(method="milora", rank=8, dtype="float32", target=["q_proj", "v_proj"]))
    r = check(tmp_path / "m", tokens=128)
    assert r["max_abs_logit_diff"] < 1e-3 and r["top1_agreement"] == 1.0
    split(str(smollm2), tmp_path / "k", SplitOptions(method="kasa", rank=8))
    k = check(tmp_path / "k", tokens=128)
    assert k["top1_agreement"] < 1.0 and k["perplexity_ratio"] > 1.0


def test_a_changed_source_is_refused(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(tiny["tiny-llama"], src)
    split(str(src), tmp_path / "s", SplitOptions(method="milora", rank=4))
    f = sorted(src.glob("model-*.safetensors"))[0]
    t = load_file(f)
    name = next(iter(t))
    t[name] = t[name] + 1  # same size, other content
    save_file(t, f, metadata={"format": "pt"})
    out = one_error_line(run("check", tmp_path / "s"))
    assert "changed since the split" in out and "restore it" in out and "absorb" not in out


def test_a_model_that_cannot_fit_in_free_memory_is_refused_before_loading(splits, tiny, monkeypatch):
    """check holds one decoder block (and its read-ahead) and the modules outside the blocks in float32 at
    a time, the two sets of logits and the factors: with less free host memory than that it refuses in one line with
    the numbers, before anything is materialised; with exactly enough it runs, never loading the
    whole model."""
    import math
    import re

    from safetensors import safe_open

    import surgeon.commands.check as chk
    from surgeon.methods.folder import SplitDir
    from surgeon.model.blockrun import BlockRunner

    per_block, outside, largest = {}, 0, 0  # bytes: float32 values plus the read-ahead copy (blocks) or the largest read (outside)
    for f in sorted(tiny["tiny-llama"].glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_slice(k)
                n = math.prod(t.get_shape())
                stored = n * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
                m = re.match(r"model\.layers\.(\d+)\.", k)
                if m:
                    per_block[m[1]] = per_block.get(m[1], 0) + 4 * n + stored
                else:
                    outside, largest = outside + 4 * n, max(largest, stored)
    vocab = json.loads((splits["milora32"] / "config.json").read_text())["vocab_size"]
    factors = SplitDir(splits["milora32"]).factors_file  # adapter_model.safetensors
    need = max(per_block.values()) + outside + largest + 2 * 4 * 64 * vocab + factors.stat().st_size
    real_materialise = BlockRunner.materialise
    monkeypatch.setattr(chk, "load_model_from", lambda *a, **k: pytest.fail("loaded the whole model"))
    monkeypatch.setattr(BlockRunner, "materialise", lambda *a, **k: pytest.fail("materialised a module of a model that cannot fit"))
    monkeypatch.setattr(chk, "host_available", lambda: need - 1)
    out = one_error_line(run("check", splits["milora32"], "--tokens", "64"))
    assert "float32" in out and "GiB" in out and "more free memory" in out
    with pytest.raises(chk.HostMemoryError):
        check(splits["milora32"], tokens=64)
    monkeypatch.setattr(chk, "host_available", lambda: need)
    monkeypatch.setattr(BlockRunner, "materialise", real_materialise)
    assert check(splits["milora32"], tokens=64)["tokens"] == 63
