"""The command line: clear one-line errors, --json, resume, overwrite, pickle, Hub ids from the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from cliutil import one_error_line, run
from safetensors.torch import save_file

import surgeon.engine.runner as split_runner
from surgeon.commands.split import SplitOptions, split


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "split" in r.output and "absorb" in r.output and "export" in r.output
    r = run("split", "--help")
    assert r.exit_code == 0 and "--rank" in r.output and "--target" in r.output
    assert run("--version").output.startswith("surgeon ")


def test_split_json_summary_and_absorb(tiny, tmp_path):
    r = run("split", tiny["tiny-llama"], "--rank", "4", "--out", tmp_path / "s", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["method"] == "milora" and data["summary"]["layers"] == 14
    assert data["summary"]["solvers"] == {"gram-eigh": 14}
    r = run("absorb", tmp_path / "s", "--out", tmp_path / "m", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base"] == "original"
    r = run("export", tmp_path / "s", "--to", "lora", "--out", tmp_path / "l")
    assert r.exit_code == 0 and (tmp_path / "l" / "adapter_config.json").exists()
    r = run("spectra", tmp_path / "s", "--out", tmp_path / "sp.png")
    assert r.exit_code == 0 and (tmp_path / "sp.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["split", "no/such/dir/x", "--out", "{tmp}/o"], 1, "not found"),
        (["split", "{llama}", "--rank", "64", "--out", "{tmp}/o"], 2, "--rank 64"),
        (["split", "{llama}", "--target", "nothing_like_this", "--out", "{tmp}/o"], 2, "no linear weight matches"),
        (["split", "{llama}", "--method", "lorax", "--out", "{tmp}/o"], 2, "unknown method"),
        (["split", "{llama}", "--dtype", "int4", "--out", "{tmp}/o"], 2, "--dtype"),
        (["split", "{llama}", "--shard-size", "lots", "--out", "{tmp}/o"], 2, "--shard-size"),
        (["absorb", "{llama}", "--out", "{tmp}/o"], 1, "not a surgeon split"),
    ],
)
def test_bad_input_gives_one_clear_line(tiny, tmp_path, args, code, words):
    args = [a.format(tmp=tmp_path, llama=tiny["tiny-llama"]) for a in args]
    r = run(*args)
    assert r.exit_code == code, r.output
    assert words in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_out_dir_exists_needs_overwrite(tiny, tmp_path):
    r = run("split", tiny["tiny-llama"], "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 0
    r = run("split", tiny["tiny-llama"], "--rank", "4", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "--overwrite" in one_error_line(r)
    r = run("split", tiny["tiny-llama"], "--rank", "4", "--out", tmp_path / "o", "-q", "--overwrite")
    assert r.exit_code == 0 and json.loads((tmp_path / "o" / "surgeon.json").read_text())["rank"] == 4
    assert not list(tmp_path.glob(".o.*"))  # no leftovers beside it


def test_truncated_shard(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny["tiny-llama"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    r = run("split", bad, "--rank", "2", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "truncated" in one_error_line(r) and shard.name in r.output


def test_quantized_weights_are_refused(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8, dtype=torch.int8)}, d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "llama"}')
    r = run("split", d, "--rank", "2", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "I8" in one_error_line(r) and "quantized" in r.output


def test_pickle_is_refused_unless_asked(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "pkl"
    AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"]).save_pretrained(d, safe_serialization=False) if False else None
    d.mkdir()
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(tiny["tiny-llama"].glob("model-*.safetensors")):
        sd.update(load_file(f))
    torch.save(sd, d / "pytorch_model.bin")
    shutil.copy(tiny["tiny-llama"] / "config.json", d / "config.json")
    r = run("split", d, "--rank", "2", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--allow-pickle" in one_error_line(r)
    r = run("split", d, "--rank", "2", "--out", tmp_path / "o", "--allow-pickle", "-q", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["layers"] == 14
    r = run("absorb", tmp_path / "o", "--out", tmp_path / "a", "--json")  # into the pickled original, hash-checked
    assert r.exit_code == 0 and json.loads(r.stdout)["base"] == "original" and json.loads(r.stdout)["layers_changed"] == 0, r.output
    from surgeon.format import Checkpoint

    got = Checkpoint.open([tmp_path / "a" / "model.safetensors"])
    assert all(torch.equal(got.read(n), t) for n, t in sd.items())  # bit for bit


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


def test_interrupted_split_resumes_and_matches_a_clean_run(tiny, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    split(str(tiny["tiny-llama"]), clean, SplitOptions(rank=4, shard_size="100KB"))
    real, calls = split_runner.split_one, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(split_runner, "split_one", flaky)
    out = tmp_path / "o"
    opts = SplitOptions(rank=4, shard_size="100KB", workers=1)  # default commit interval: the interrupt commits
    with pytest.raises(KeyboardInterrupt):
        split(str(tiny["tiny-llama"]), out, opts)
    assert not out.exists() and (tmp_path / ".o.partial" / ".surgeon" / "journal.jsonl").exists()
    monkeypatch.setattr(split_runner, "split_one", real)
    m = split(str(tiny["tiny-llama"]), out, opts)
    assert m["run"]["resumed_tensors"] >= 8
    assert _hashes(out) == _hashes(clean)
    assert not (tmp_path / ".o.partial").exists()


def test_changed_settings_do_not_resume_a_partial_run(tiny, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(split_runner, "split_one", boom)
    with pytest.raises(KeyboardInterrupt):
        split(str(tiny["tiny-llama"]), tmp_path / "o", SplitOptions(rank=4))
    monkeypatch.undo()
    r = run("split", tiny["tiny-llama"], "--rank", "2", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "interrupted run with different settings" in one_error_line(r)
    r = run("split", tiny["tiny-llama"], "--rank", "2", "--out", tmp_path / "o", "--overwrite", "-q")
    assert r.exit_code == 0


def test_hub_id_resolves_from_the_offline_cache(tiny, tmp_path, monkeypatch):
    """org/name is resolved by huggingface_hub.snapshot_download from a pre-filled cache."""
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / sha
    shutil.copytree(tiny["tiny-llama"], snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    r = run("split", "acme/tiny-llama", "--rank", "2", "--out", tmp_path / "o", "-q", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "surgeon.json").read_text())
    assert m["source"]["hub_id"] == "acme/tiny-llama" and m["source"]["revision"] == sha
    card = (tmp_path / "o" / "README.md").read_text()
    assert "base_model: acme/tiny-llama" in card and "library_name: peft" in card
    r = run("split", "acme/not-cached", "--rank", "2", "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "acme/not-cached" in one_error_line(r)


def test_a_nan_weight_is_named(tiny, tmp_path):
    from safetensors.torch import load_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny["tiny-llama"], bad)
    for f in sorted(bad.glob("model-*.safetensors")):
        sd = load_file(f)
        name = next((k for k in sd if k.endswith("mlp.up_proj.weight")), None)
        if name:
            sd[name][1, 2] = float("nan")
            save_file(sd, f, metadata={"format": "pt"})
            break
    r = run("split", bad, "--rank", "2", "--out", tmp_path / "o")
    assert r.exit_code == 1 and name in one_error_line(r) and "NaN" in r.output
    assert not (tmp_path / "o").exists()
