"""A review of the issue-13 work as an attacker would do it: what it still let through. Each test is a
finding that failed before this file was written.

    PYTHONPATH=$PWD python -m pytest tests/test_safety_outputs.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cliutil import one_error_line, run, tree_hashes
from safetensors.torch import load_file, save_file


@pytest.fixture()
def split_dir(model, tmp_path) -> Path:
    s = tmp_path / "s"
    assert run("split", model, "--rank", "2", "--out", s, "-q").exit_code == 0
    return s


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# --- outputs never replace what they came from, nor what the user added ------------------------------

def test_export_never_replaces_the_model_its_split_came_from(split_dir, tmp_path):
    merged, again = tmp_path / "merged", tmp_path / "again"
    assert run("absorb", split_dir, "--out", merged, "-q").exit_code == 0
    assert run("split", merged, "--rank", "2", "--out", again, "-q").exit_code == 0
    before = tree_hashes(merged)
    r = run("export", again, "--to", "lora", "--out", merged, "--overwrite")
    assert r.exit_code == 2 and "input" in one_error_line(r)
    assert tree_hashes(merged) == before


def test_overwrite_keeps_a_surgeon_output_that_holds_files_the_user_added(model, split_dir):
    (split_dir / "checkpoints").mkdir()
    (split_dir / "checkpoints" / "step-9000.pt").write_text("weeks of training")
    (split_dir / "my_notes.md").write_text("mine")
    r = run("split", model, "--rank", "3", "--out", split_dir, "--overwrite", "-q")
    assert r.exit_code == 2 and "checkpoints/step-9000.pt" in one_error_line(r) and "my_notes.md" in r.output
    assert (split_dir / "my_notes.md").read_text() == "mine" and (split_dir / "checkpoints" / "step-9000.pt").exists()
    (split_dir / "my_notes.md").unlink()
    shutil.rmtree(split_dir / "checkpoints")
    r = run("split", model, "--rank", "3", "--out", split_dir, "--overwrite", "-q", "--json")  # its own files only: replaced
    assert r.exit_code == 0 and json.loads(r.stdout)["rank"] == 3


def test_out_inside_the_model_folder_is_refused_and_beside_a_single_file_is_fine(model, tmp_path):
    r = run("split", model, "--rank", "2", "--out", model / "split", "-q")
    assert r.exit_code == 2 and "inside the input" in one_error_line(r)
    assert not (model / "split").exists() and not list(model.glob(".split*"))
    one = tmp_path / "one"  # a model given as one file: its output may live in the same folder
    one.mkdir()
    tensors = {k: v for f in sorted(model.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    save_file(tensors, one / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(model / "config.json", one / "config.json")
    r = run("split", one / "model.safetensors", "--rank", "2", "--out", one / "split", "-q")
    assert r.exit_code == 0, r.output


def test_a_typo_in_an_option_leaves_no_partial_folder_behind(split_dir, tmp_path):
    out = tmp_path / "merged"
    for bad in (["--shard-size", "abc"], ["--base", "bogus"]):
        r = run("absorb", split_dir, "--out", out, *bad)
        assert r.exit_code == 2 and bad[1] in one_error_line(r)
        assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert run("absorb", split_dir, "--out", out, "-q").exit_code == 0  # the corrected command needs no --overwrite


def test_a_trash_folder_of_the_users_is_not_swept(model, tmp_path):
    mine = tmp_path / ".o.trash-mine"
    mine.mkdir()
    (mine / "notes").write_text("mine")
    assert run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q").exit_code == 0
    assert (mine / "notes").read_text() == "mine"


# --- settings that would make the factors non-finite --------------------------------------------------

@pytest.mark.parametrize("opts", [["--alpha", "nan"], ["--alpha", "inf"], ["--alpha", "0"], ["--alpha", "-1"],
                                  ["--alpha-pattern", "q_proj=nan"], ["--rank-pattern", "q_proj=0"]])
def test_settings_that_give_non_finite_factors_are_refused(model, tmp_path, opts):
    r = run("split", model, "--rank", "2", *opts, "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and opts[0] in one_error_line(r)
    assert not (tmp_path / "o").exists()


# --- damaged split folders: one line, never a traceback -------------------------------------------

DAMAGE = {
    "method_config null": ("surgeon.json", lambda m: m.update(method_config=None)),
    "null_rank text": ("surgeon.json", lambda m: m["method_config"].update(null_rank="x")),
    "source path null": ("surgeon.json", lambda m: m["source"]["files"][0].update(path=None)),
    "hashes text": ("surgeon.json", lambda m: m["source"].update(tensor_hashes="x")),
    "hashes number": ("surgeon.json", lambda m: m["source"].update(tensor_hashes=-1)),
    "adapter r text": ("adapter_config.json", lambda c: c.update(r="x")),
    "adapter r null": ("adapter_config.json", lambda c: c.update(r=None)),
    "adapter alpha text": ("adapter_config.json", lambda c: c.update(lora_alpha="x")),
    "adapter pattern list": ("adapter_config.json", lambda c: c.update(rank_pattern=[1])),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_field_of_a_split_is_one_line(split_dir, tmp_path, damage):
    name, change = DAMAGE[damage]
    _edit_json(split_dir / name, change)
    for args in (["absorb", split_dir, "--out", tmp_path / "a"], ["export", split_dir, "--out", tmp_path / "e"]):
        r = run(*args)
        assert r.exit_code == 1 and str(split_dir) in one_error_line(r), (args, r.output)


@pytest.mark.parametrize("target", ["split:surgeon.json", "split:adapter_config.json", "model:config.json", "model:model.safetensors.index.json"])
def test_json_nested_too_deeply_is_one_line(model, split_dir, tmp_path, target):
    where, name = target.split(":")
    folder = split_dir if where == "split" else model
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    args = ["absorb", split_dir, "--out", tmp_path / "a"] if where == "split" else ["split", model, "--rank", "2", "--out", tmp_path / "o"]
    r = run(*args)
    assert r.exit_code == 1 and name in one_error_line(r)


# --- nothing outside the folder is read or published ----------------------------------------------

def test_a_model_card_linked_from_outside_is_not_read(model, tmp_path):
    secret = tmp_path / "secret.md"
    secret.write_text("---\nlicense: SECRET-FROM-OUTSIDE\n---\n")
    (model / "README.md").unlink(missing_ok=True)
    (model / "README.md").symlink_to(secret)
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "README.md" in one_error_line(r) and "outside" in r.output
    assert not (tmp_path / "o").exists()


def test_push_never_uploads_what_a_link_points_to_outside_the_folder(split_dir, tmp_path):
    secret = tmp_path / "secret.env"
    secret.write_text("HF_TOKEN=hf_secret")
    (split_dir / "notes.txt").symlink_to(secret)
    r = run("push", split_dir, "me/x", "--check")
    assert r.exit_code == 1 and "notes.txt links to" in r.output and "outside" in r.output


def test_a_side_file_that_is_a_fifo_is_refused_not_skipped(model, tmp_path):
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    r = run("split", model, "--rank", "2", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "tokenizer.json is not a regular file" in one_error_line(r)


# --- surgeon spectra writes a picture, and only where it was told -----------------------------------

def test_spectra_checks_its_options_and_never_overwrites_silently(split_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("spectra", split_dir, "--layers", "(")
    assert r.exit_code == 2 and "not a regular expression" in one_error_line(r)
    r = run("spectra", split_dir, "--out", "x.tex")
    assert r.exit_code == 2 and ".png" in one_error_line(r) and not Path("x.tex").exists()
    Path("victim.txt").write_text("mine")
    Path("link.png").symlink_to("victim.txt")
    r = run("spectra", split_dir, "--out", "link.png")
    assert r.exit_code == 2 and "link" in one_error_line(r) and Path("victim.txt").read_text() == "mine"
    r = run("spectra", split_dir, "--out", "pic")
    assert r.exit_code == 0 and "pic.png" in r.output and Path("pic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("spectra", split_dir, "--out", "pic.png")
    assert r.exit_code == 2 and "--overwrite" in one_error_line(r)
    assert run("spectra", split_dir, "--out", "pic.png", "--overwrite").exit_code == 0
    assert not list(tmp_path.glob(".pic*"))
