"""A user's data survives every flag; inputs are confined to the model folder; absorb merges only into
the source that was split. Each test is a finding of issue 13 that failed on the earlier main.

    PYTHONPATH=$PWD python -m pytest tests/test_safety.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cliutil import one_error_line, run, tree_hashes
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model(tiny, tmp_path) -> Path:
    """A private copy of tiny-llama with the user's own files in it."""
    m = tmp_path / "m"
    shutil.copytree(tiny["tiny-llama"], m)
    (m / "user-notes.txt").write_text("mine")
    (m / "sub").mkdir()
    (m / "sub" / "data.csv").write_text("1,2\n")
    return m


# --- 1: --overwrite deletes only what surgeon wrote ------------------------------------------------

@pytest.mark.parametrize("out", ["{m}", "{m}/.", "{m}/..", "{m}/sub"])
def test_overwrite_never_deletes_the_input_or_what_holds_it(model, out):
    before = tree_hashes(model.parent)
    r = run("split", model, "--rank", "2", "--out", out.format(m=model), "--overwrite", "-q")
    assert r.exit_code == 2 and "input" in one_error_line(r)
    assert tree_hashes(model.parent) == before


def test_overwrite_refuses_a_folder_surgeon_did_not_write(model, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "sub").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\begin{document}")
    (thesis / "sub" / "data.csv").write_text("1,2\n")
    r = run("split", model, "--rank", "2", "--out", thesis, "--overwrite", "-q")
    assert r.exit_code == 2 and "not written by surgeon" in one_error_line(r) and "thesis.tex" in r.output
    assert (thesis / "thesis.tex").read_text() == "\\begin{document}" and (thesis / "sub" / "data.csv").exists()
    r = run("split", model, "--rank", "2", "--out", thesis, "-q")  # the first error must not advise --overwrite
    assert r.exit_code == 2 and "--overwrite" not in one_error_line(r)


def test_overwrite_refuses_the_current_folder_and_home(model, tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    for d in (work, home):
        d.mkdir()
        (d / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    r = run("split", model, "--rank", "2", "--out", ".", "--overwrite", "-q")
    assert r.exit_code == 2 and "current folder" in one_error_line(r)
    r = run("split", model, "--rank", "2", "--out", home, "--overwrite", "-q")
    assert r.exit_code == 2 and "home folder" in one_error_line(r)
    from surgeon.engine.outdir import unsafe_reason

    assert "root folder" in unsafe_reason(Path("/"), [])  # never run for real: the check is the same code
    for d in (work, home):
        assert sorted(p.name for p in d.iterdir()) == ["keep.txt"] and (d / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*"))  # refused before any lock or partial folder was made


def test_overwrite_replaces_an_empty_folder_and_a_surgeon_output(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("split", model, "--rank", "2", "--out", empty, "-q").exit_code == 0  # nothing there to lose
    assert (empty / "surgeon.json").exists()
    r = run("split", model, "--rank", "4", "--out", empty, "--overwrite", "-q")
    assert r.exit_code == 0 and json.loads((empty / "surgeon.json").read_text())["rank"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, partial or trash left


# --- 2: reads stay inside the model folder -----------------------------------------------------------

def _reindex(model: Path, shard: str) -> None:
    index = model / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = shard
    index.write_text(json.dumps(idx))


@pytest.mark.parametrize("shard", ["../private.safetensors", "{tmp}/private.safetensors", "/etc/passwd", "/dev/stdin", "sub/../../private.safetensors"])
def test_index_names_outside_the_folder_are_refused(model, tmp_path, shard):
    save_file({"secret": torch.ones(4)}, tmp_path / "private.safetensors")
    _reindex(model, shard.format(tmp=tmp_path))
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "outside" in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_links_out_of_the_folder_are_refused(model, tmp_path):
    save_file({"secret": torch.ones(4)}, tmp_path / "private.safetensors")
    os.symlink(tmp_path / "private.safetensors", model / "link.safetensors")
    _reindex(model, "link.safetensors")
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "links to" in one_error_line(r) and "outside" in r.output
    (model / "link.safetensors").unlink()
    _reindex(model, "model-00001-of-00004.safetensors")
    (model / "tokenizer.json").unlink()
    os.symlink("/etc/passwd", model / "tokenizer.json")  # a side file would be copied into the output (and pushed)
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "tokenizer.json" in one_error_line(r) and "outside" in r.output


def test_a_fifo_shard_is_refused_without_blocking(model, tmp_path):
    os.mkfifo(model / "pipe.safetensors")
    _reindex(model, "pipe.safetensors")
    cmd = [sys.executable, "-m", "surgeon", "split", str(model), "--rank", "2", "--out", str(tmp_path / "o"), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "not a regular file" in r.stderr and "Traceback" not in r.stderr


# --- 9: the index and the shards agree; the output is complete ---------------------------------------

def test_a_tensor_missing_from_its_shard_is_named(model, tmp_path):
    shard = model / "model-00002-of-00004.safetensors"
    tensors = load_file(shard)
    gone = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != gone}, shard)
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and gone in one_error_line(r) and "does not hold it" in r.output


def test_a_tensor_the_index_does_not_list_is_named(model, tmp_path):
    index = model / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    dropped = sorted(idx["weight_map"])[3]
    del idx["weight_map"][dropped]
    index.write_text(json.dumps(idx))
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and dropped in one_error_line(r) and "does not list" in r.output


def test_a_missing_config_is_an_error_not_a_silent_gap(model, tmp_path):
    (model / "config.json").unlink()
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "config.json" in one_error_line(r) and "--config" in r.output
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q", "--config", ROOT / "fixtures" / "tiny-llama" / "config.json")
    assert r.exit_code == 0 and (tmp_path / "o" / "config.json").exists()


# --- 5: one line for every failure --------------------------------------------------------------------

@pytest.mark.parametrize("index", ["[1, 2, 3]", '"x"', "null", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}', "{not json"])
def test_a_broken_index_is_one_line(model, tmp_path, index):
    (model / "model.safetensors.index.json").write_text(index)
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "index" in one_error_line(r)


@pytest.mark.parametrize("manifest", ["{broken", "[1, 2]", '"split"', '{"operation": "split"}', '{"operation": "split", "surgeon_version": "0.1.0"}'])
def test_a_damaged_manifest_is_one_line_for_absorb_train_export_spectra(tiny, tmp_path, manifest):
    d = tmp_path / "s"
    assert run("split", tiny["tiny-llama"], "--rank", "2", "--out", d, "-q").exit_code == 0
    (d / "surgeon.json").write_text(manifest)
    for args in (["absorb", d, "--out", tmp_path / "a"], ["export", d, "--out", tmp_path / "e"], ["spectra", d, "--out", tmp_path / "p.png"],
                 ["train", d, "--data", ROOT / "fixtures" / "data" / "tiny_instruct.jsonl", "--out", tmp_path / "t", "--steps", "1"]):
        r = run(*args, "-q") if args[0] == "train" else run(*args)
        assert r.exit_code == 1 and "surgeon.json" in one_error_line(r), (args[0], r.output)


def test_spectra_of_a_folder_surgeon_did_not_write(tiny, tmp_path):
    r = run("spectra", tiny["tiny-llama"], "--out", tmp_path / "p.png")
    assert r.exit_code == 1 and "surgeon.json" in one_error_line(r)


# --- 7: absorb merges only into the source that was split ---------------------------------------------

def load_file_all(files: list[Path]) -> dict[str, torch.Tensor]:
    return {k: v for f in files for k, v in load_file(f).items()}


def _poke(shard: Path, name: str, value: float) -> None:
    """Change one value of a tensor in place, keeping size and mtime (`touch -r` afterwards)."""
    from surgeon.format import Checkpoint

    st = shard.stat()
    info = Checkpoint.open([shard]).tensors[name]
    with open(shard, "r+b") as f:
        f.seek(info.offset)
        f.write(torch.tensor([value], dtype=torch.float32).numpy().tobytes())
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_absorb_refuses_a_source_changed_in_place_and_names_the_tensor(model, tmp_path):
    d = tmp_path / "s"
    assert run("split", model, "--rank", "2", "--out", d, "-q").exit_code == 0
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][name]
    _poke(shard, name, 7.0)
    r = run("absorb", d, "--out", tmp_path / "a")
    assert r.exit_code == 1 and name in one_error_line(r) and "--base residual" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.partial").exists()
    r = run("absorb", d, "--out", tmp_path / "a", "--base", "residual")  # the offered way out works at once
    assert r.exit_code == 0
    assert load_file(tmp_path / "a" / "model.safetensors")[name][0, 0] != 7.0  # the residual, not the poked source


def test_absorb_into_a_touched_but_unchanged_source_is_still_exact(model, tmp_path):
    d = tmp_path / "s"
    assert run("split", model, "--rank", "2", "--out", d, "-q").exit_code == 0
    for p in model.glob("*.safetensors"):
        os.utime(p)  # a new mtime, the same bytes: no reason to give up the original
    r = run("absorb", d, "--out", tmp_path / "a", "--json", "--shard-size", "100KB")
    assert r.exit_code == 0 and json.loads(r.stdout)["base"] == "original"
    src, got = (load_file_all(sorted(f.glob("model-*.safetensors"))) for f in (model, tmp_path / "a"))
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)  # bit for bit


def test_absorb_says_why_it_merges_into_the_residual(model, tmp_path):
    d = tmp_path / "s"
    assert run("split", model, "--rank", "2", "--out", d, "-q").exit_code == 0
    shutil.rmtree(model)
    r = run("absorb", d, "--out", tmp_path / "a")
    assert r.exit_code == 0 and "residual" in r.output and "is gone" in r.output


# --- 8: the Hub never hangs ---------------------------------------------------------------------------

def test_push_to_a_server_that_never_answers_gives_one_line(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(16)], daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    d = tmp_path / "s"
    assert run("split", tiny["tiny-llama"], "--rank", "2", "--out", d, "-q").exit_code == 0
    t0 = time.monotonic()
    r = run("push", d, "me/x", "--timeout", "1")
    assert time.monotonic() - t0 < 30 and held
    assert r.exit_code == 1 and "no answer within 1 s" in one_error_line(r) and "run the same command again" in r.output
    monkeypatch.setenv("SURGEON_HUB_TIMEOUT", "soon")
    r = run("push", d, "me/x")
    assert r.exit_code == 2 and "SURGEON_HUB_TIMEOUT" in one_error_line(r)
