"""Issue 27, round two of bad inputs (findings 9, 10, 12, 16 and the tracebacks): factor files checked
against the manifest, out-of-range casts named, numeric options checked in one place, user regexes
bounded in time. Each test failed on 3b6e02f.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python -m pytest tests/test_validation_round2.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cliutil import one_error_line, run
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
TRAIN = ["--steps", "1", "--seq-len", "32", "--batch-size", "2", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def split_dir(model, tmp_path) -> Path:
    s = tmp_path / "s"
    assert run("split", model, "--rank", "4", "--out", s, "-q").exit_code == 0
    return s


def _leftovers(folder: Path) -> list[str]:
    """What a refused command left beside its --out (a partial or work folder)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


# --- finding 12 and the tracebacks: numeric options, checked before any folder is made -----------------

SPLIT_BAD = [
    (["--shard-size", "nan"], "--shard-size"), (["--shard-size", "infGB"], "--shard-size"), (["--shard-size", "1e400GB"], "--shard-size"),
    (["--workers", "-1"], "--workers"), (["--device", "meta"], "--device"), (["--tol", "nan"], "--tol"),
]


@pytest.mark.parametrize("opts, word", SPLIT_BAD, ids=[" ".join(o) for o, _ in SPLIT_BAD])
def test_split_numeric_options_are_one_line_and_leave_nothing(model, tmp_path, opts, word):
    r = run("split", model, "--rank", "4", *opts, "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and word in one_error_line(r)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []  # --workers -1 left .o.partial


@pytest.mark.parametrize("size", ["nan", "infGB", "1e400GB"])
def test_absorb_shard_size_is_one_line(split_dir, tmp_path, size):
    r = run("absorb", split_dir, "--out", tmp_path / "a", "--shard-size", size, "-q")
    assert r.exit_code == 2 and "--shard-size" in one_error_line(r)
    assert not (tmp_path / "a").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-3"])
def test_push_timeout_must_be_finite_and_positive(split_dir, timeout, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_used")  # checked before any token or network use
    r = run("push", split_dir, "acme/x", "--timeout", timeout, "-q")
    assert r.exit_code == 2 and "--timeout" in one_error_line(r)


TRAIN_BAD = [
    (["--steps", "1", "--device", "meta"], "--device"), (["--epochs", "nan"], "--epochs"), (["--epochs", "inf"], "--epochs"),
    (["--steps", "1", "--weight-decay", "nan"], "--weight-decay"), (["--steps", "1", "--min-lr-ratio", "-5"], "--min-lr-ratio"),
    (["--steps", "1", "--min-lr-ratio", "nan"], "--min-lr-ratio"), (["--steps", "1", "--max-grad-norm", "nan"], "--max-grad-norm"),
    (["--steps", "1", "--lr", "inf"], "--lr"),
]


@pytest.mark.parametrize("opts, word", TRAIN_BAD, ids=[" ".join(o) for o, _ in TRAIN_BAD])
def test_train_numeric_options_are_one_line(split_dir, tmp_path, opts, word):
    r = run("train", split_dir, "--data", DATA, "--out", tmp_path / "t", "--seq-len", "32", *opts, "-q")
    assert r.exit_code == 2 and word in one_error_line(r)
    assert not (tmp_path / "t").exists()


def test_min_lr_ratio_in_range_still_trains(split_dir, tmp_path):
    r = run("train", split_dir, "--data", DATA, "--out", tmp_path / "t", *TRAIN, "--min-lr-ratio", "0.5")
    assert r.exit_code == 0, r.output


def test_train_data_that_is_not_data_is_one_line(split_dir, model, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("garbage{\n")
    for data, word in ((garbage, "JSON parse error"), (model, "model folder")):
        r = run("train", split_dir, "--data", data, "--out", tmp_path / "t", *TRAIN)
        assert r.exit_code == 1 and word in one_error_line(r) and str(data) in r.output
        assert not (tmp_path / "t").exists()


@pytest.fixture()
def trained(split_dir, tmp_path) -> Path:
    """Two steps, saved after each."""
    out = tmp_path / "t"
    r = run("train", split_dir, "--data", DATA, "--out", out, *TRAIN[2:], "--steps", "2", "--save-every", "1")
    assert r.exit_code == 0, r.output
    return out


def test_resume_drops_a_metrics_line_torn_by_a_kill(split_dir, trained):
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    with open(trained / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill while appending
    r = run("train", split_dir, "--data", DATA, "--out", trained, *TRAIN[2:], "--steps", "2", "--save-every", "1", "--resume")
    assert r.exit_code == 0, r.output
    assert (trained / "metrics.jsonl").read_text().splitlines() == lines


def test_resume_from_a_truncated_state_is_one_line(split_dir, trained):
    state = trained / "train_state" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    r = run("train", split_dir, "--data", DATA, "--out", trained, *TRAIN[2:], "--steps", "2", "--resume")
    assert r.exit_code == 1 and "state.pt is damaged" in one_error_line(r) and "--overwrite" in r.output


# --- finding 16: user regexes matched under a time bound ---------------------------------------------

SLOW = "(.*?.*?)*(X|Y)"  # backtracks exponentially in `regex` too: only the time bound stops it


@pytest.fixture()
def quick_bound(monkeypatch):
    """The bound itself, lowered so the suite spends a second, not several, per case."""
    from surgeon.model import patterns

    monkeypatch.setattr(patterns, "REGEX_SECONDS", 0.5)


def test_the_issues_target_regex_ends_at_once(model, tmp_path):
    r = run("split", model, "--rank", "4", "--target", "(.*.*)*X", "--out", tmp_path / "o", "-q")  # `re` ran past 60 s
    assert r.exit_code == 2 and "no linear weight matches" in one_error_line(r)


@pytest.mark.parametrize("opts", [["--target", SLOW], ["--rank-pattern", f"{SLOW}=8"], ["--alpha-pattern", f"{SLOW}=8"]])
def test_a_backtracking_split_regex_is_one_line(model, tmp_path, quick_bound, opts):
    r = run("split", model, "--rank", "4", *opts, "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and f"{opts[0]} '{SLOW}' takes more than 0.5 s" in one_error_line(r)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_a_backtracking_spectra_regex_is_one_line(split_dir, tmp_path, quick_bound):
    r = run("spectra", split_dir, "--layers", SLOW, "--out", tmp_path / "p.png")
    assert r.exit_code == 2 and "--layers" in one_error_line(r) and not (tmp_path / "p.png").exists()


def test_bounded_regexes_select_what_re_selects():
    import re

    from surgeon.model.patterns import UserRegex

    names = [f"model.layers.{i}.{m}" for i in (0, 11) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    for p in (r".*\.(q|v)_proj", r"model\.layers\.1\d?\..*", r"(?i).*UP_proj", r".*(?<!q)_proj"):
        rx = UserRegex(p, "--target")
        assert [n for n in names if rx.fullmatch(n)] == [n for n in names if re.fullmatch(p, n)], p
        assert [n for n in names if rx.search(n)] == [n for n in names if re.search(p, n)], p


# --- finding 9: factor files checked against the manifest before any use ------------------------------

def _absorb_export_train(split: Path, tmp_path: Path) -> list:
    return [run("absorb", split, "--out", tmp_path / "a", "-q"), run("export", split, "--out", tmp_path / "e"),
            run("train", split, "--data", DATA, "--out", tmp_path / "t", *TRAIN)]


def test_a_factor_file_of_another_rank_is_refused_everywhere(model, split_dir, tmp_path):
    r8 = tmp_path / "s8"
    assert run("split", model, "--rank", "8", "--out", r8, "-q").exit_code == 0
    shutil.copy(r8 / "adapter_model.safetensors", split_dir / "adapter_model.safetensors")  # the issue's `cp sp8/adapter_model.safetensors sp/`
    for r in _absorb_export_train(split_dir, tmp_path):
        line = one_error_line(r)
        assert r.exit_code == 1 and "adapter_model.safetensors does not belong to this split" in line
        assert "layers.0.self_attn.k_proj.lora_A.weight has shape [8, 64], the split's is [4, 64]" in line
    assert not any((tmp_path / d).exists() for d in "aet")
    from surgeon.errors import SplitDirError
    from surgeon.runtime import load_split

    with pytest.raises(SplitDirError, match="does not belong"):
        load_split(split_dir)


def test_untrained_factors_of_another_split_are_refused_by_their_hash(model, split_dir, tmp_path):
    pissa = tmp_path / "p"
    assert run("split", model, "--method", "pissa", "--rank", "4", "--out", pissa, "-q").exit_code == 0  # same keys and shapes
    shutil.copy(pissa / "surgeon.init.safetensors", split_dir / "surgeon.init.safetensors")
    for r in _absorb_export_train(split_dir, tmp_path):
        assert r.exit_code == 1 and "surgeon.init.safetensors is not the file split wrote" in one_error_line(r)
        assert "lora_A.weight differs from the content hash" in r.output


def test_an_adapter_config_of_another_rank_is_refused(split_dir, tmp_path):
    conf = json.loads((split_dir / "adapter_config.json").read_text())
    (split_dir / "adapter_config.json").write_text(json.dumps(conf | {"r": 8, "lora_alpha": 8}))
    r = run("absorb", split_dir, "--out", tmp_path / "a", "-q")
    assert r.exit_code == 1 and "rank 8" in one_error_line(r) and "records 4" in r.output


def test_factors_trained_elsewhere_keep_working(model, split_dir, tmp_path):
    """README's PEFT recipe: trained factors (same keys and shapes, other values) put into the split."""
    f = split_dir / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key] = t[key] + 0.01
    save_file(t, f, metadata={"format": "pt"})
    r = run("absorb", split_dir, "--out", tmp_path / "a", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers_changed"] == 1
    assert run("train", split_dir, "--data", DATA, "--out", tmp_path / "t", *TRAIN).exit_code == 0
    assert run("absorb", tmp_path / "t", "--out", tmp_path / "a2", "-q").exit_code == 0  # a train output too


# --- finding 10: a cast that overflows is named, never written -------------------------------------

def _set(model: Path, name: str, index: tuple, value: float, dtype: torch.dtype | None = None) -> None:
    """Set one value of tensor `name` (and cast every tensor to `dtype`) in the model's shards."""
    for f in sorted(model.glob("model-*.safetensors")):
        t = load_file(f)
        if name in t:
            t[name][index] = value
        if dtype is not None:
            t = {k: v.to(dtype) for k, v in t.items()}
        save_file(t, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"])
def test_a_weight_beyond_float16_is_named_not_written_as_inf(model, tmp_path, name):
    _set(model, name, (3, 5) if name.endswith("proj.weight") else (5,), 1e5)
    r = run("split", model, "--rank", "4", "--dtype", "float16", "--out", tmp_path / "o", "-q")
    line = one_error_line(r)
    assert r.exit_code == 1 and f"{name}: a value of 1e+05 does not fit float16 (largest 65504)" in line and "--dtype float32" in line
    assert not (tmp_path / "o").exists()
    r = run("split", model, "--rank", "4", "--dtype", "bfloat16", "--out", tmp_path / "b", "-q")
    assert r.exit_code == 0, r.output
    for f in (tmp_path / "b").glob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(f).values())


def test_an_absorb_that_overflows_float16_is_named(model, tmp_path):
    _set(model, "", (), 0.0, dtype=torch.float16)  # a float16 model
    s = tmp_path / "s"
    assert run("split", model, "--rank", "4", "--out", s, "-q").exit_code == 0
    t = load_file(s / "adapter_model.safetensors")
    key = next(k for k in t if "layers.1.mlp.up_proj.lora_B" in k)
    t[key] = t[key] * 1e9  # trained far too far
    save_file(t, s / "adapter_model.safetensors", metadata={"format": "pt"})
    for base in ("original", "residual"):
        r = run("absorb", s, "--out", tmp_path / base, "--base", base, "-q")
        assert r.exit_code == 1 and "model.layers.1.mlp.up_proj.weight: a value of" in one_error_line(r) and "float16" in r.output
        assert not (tmp_path / base).exists()
