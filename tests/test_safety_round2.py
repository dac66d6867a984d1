"""Issue 27, "data lost or written where it should not be": each test is one finding of that battery,
reproduced as the issue tells it, and failed on 3b6e02f. M is a copy of fixtures/tiny-llama, sp its split.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python -m pytest tests/test_safety_round2.py -q
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import one_error_line, run, tree_hashes
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
TRAIN = ["--data", DATA, "--steps", "1", "--seq-len", "64", "--device", "cpu", "-q"]


@pytest.fixture()
def M(tiny, tmp_path) -> Path:
    m = tmp_path / "M"
    shutil.copytree(tiny["tiny-llama"], m)
    return m


@pytest.fixture()
def sp(M, tmp_path) -> Path:
    s = tmp_path / "sp"
    assert run("split", M, "--rank", "4", "--out", s, "-q").exit_code == 0
    return s


@pytest.fixture()
def trained(sp, tmp_path) -> Path:
    t = tmp_path / "trained"
    r = run("train", sp, "--out", t, *TRAIN)
    assert r.exit_code == 0, r.output
    return t


def surgeon(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a process of its own (to be killed at a fault point)."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "surgeon-train")])
    full = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "surgeon", *map(str, args)], env=full, capture_output=True, text=True, timeout=300)


def _tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


# --- 1. --overwrite deletes user files in outputs without a listing, train's included ---------------

def test_1_overwrite_keeps_a_file_the_user_added_to_a_train_output(M, sp, trained):
    (trained / "eval_notes.txt").write_text("notes\n")
    for args in (["train", sp, "--out", trained, *TRAIN, "--overwrite"], ["split", M, "--rank", "4", "--out", trained, "--overwrite", "-q"],
                 ["absorb", sp, "--out", trained, "--overwrite", "-q"]):
        r = run(*args)
        assert r.exit_code == 2 and "eval_notes.txt" in one_error_line(r), (args[0], r.output)
        assert (trained / "eval_notes.txt").read_text() == "notes\n"
    (trained / "eval_notes.txt").unlink()
    assert run("train", sp, "--out", trained, *TRAIN, "--overwrite").exit_code == 0  # its own files only: replaced


def test_1_a_copy_made_with_a_glob_has_no_listing_and_is_not_replaced(M, sp, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in sp.iterdir():  # cp sp/* copy/: the hidden listing stays behind
        if not f.name.startswith("."):
            shutil.copy(f, copy / f.name)
    (copy / "mine.txt").write_text("mine")
    r = run("split", M, "--rank", "4", "--out", copy, "--overwrite", "-q")
    assert r.exit_code == 2 and ".surgeon.files" in one_error_line(r)
    assert (copy / "mine.txt").read_text() == "mine"


# --- 2. --overwrite compares content, not names -------------------------------------------------------

def test_2_a_trained_adapter_copied_into_a_split_is_not_replaced(M, sp, trained, tmp_path):
    that_copy = tmp_path / "that_copy"
    shutil.copytree(sp, that_copy)  # the listing comes along
    shutil.copy(trained / "adapter_model.safetensors", that_copy / "adapter_model.safetensors")  # README's PEFT recipe
    before = tree_hashes(that_copy)
    r = run("split", M, "--rank", "4", "--out", that_copy, "--overwrite", "-q")
    assert r.exit_code == 2 and "adapter_model.safetensors" in one_error_line(r) and "changed" in r.output
    assert tree_hashes(that_copy) == before


def test_2_a_hand_edited_model_card_is_not_replaced(M, sp):
    card = sp / "README.md"
    card.write_text(card.read_text().replace("surgeon", "surgeon (my evaluation notes)", 1))
    r = run("split", M, "--rank", "4", "--out", sp, "--overwrite", "-q")
    assert r.exit_code == 2 and "README.md" in one_error_line(r)
    assert "my evaluation notes" in card.read_text()


def test_2_an_output_with_an_older_name_only_listing_says_how_to_proceed(M, sp):
    names = sorted(p.name for p in sp.iterdir() if p.name != ".surgeon.files")
    (sp / ".surgeon.files").write_text("".join(n + "\n" for n in names))  # what surgeon wrote before content hashes
    r = run("split", M, "--rank", "4", "--out", sp, "--overwrite", "-q")
    assert r.exit_code == 2 and "older surgeon" in one_error_line(r) and "delete it yourself" in r.output
    assert (sp / "surgeon.json").exists()


# --- 3. train never rewrites its own input ------------------------------------------------------------

def test_3_train_refuses_its_own_split_as_out(M, sp, tmp_path):
    before, model = tree_hashes(sp), tree_hashes(M)
    for out in (sp, sp / "x", M, M / "x"):
        r = run("train", sp, "--out", out, *TRAIN, "--overwrite")
        assert r.exit_code == 2 and "input" in one_error_line(r), (out, r.output)
    assert tree_hashes(sp) == before and tree_hashes(M) == model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M", "sp"]


# --- 4. a mount point as --out -----------------------------------------------------------------------

def test_4_a_mount_point_as_out_is_refused_before_any_work(M, sp, tmp_path):
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "size=16m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        for args in (["split", M, "--rank", "4", "-q"], ["absorb", sp, "-q"], ["train", sp, *TRAIN]):
            r = run(*args, "--out", mnt)
            assert r.exit_code == 2 and "mount point" in one_error_line(r) and str(mnt / "NAME") in r.output, args[0]
            assert sorted(p.name for p in tmp_path.iterdir()) == ["M", "mnt", "sp"] and not any(mnt.iterdir())
        assert run("split", M, "--rank", "4", "-q", "--out", mnt / "o").exit_code == 0  # inside it: fine
    finally:
        subprocess.run(["umount", str(mnt)])


# --- 5. a refused train leaves no lock file behind ----------------------------------------------------

def test_5_a_refused_train_leaves_no_lock_file(M, sp, trained, tmp_path):
    r = run("train", sp, "--out", trained, *TRAIN)  # exists, no --overwrite
    assert r.exit_code == 2 and "--resume" in one_error_line(r)
    r = run("train", sp, "--out", sp / "x", *TRAIN)  # inside the input
    assert r.exit_code == 2
    assert not list(tmp_path.glob(".*.lock")) and sorted(p.name for p in sp.glob(".*")) == [".surgeon.files"]
    assert run("split", M, "--rank", "4", "--out", sp, "--overwrite", "-q").exit_code == 0


# --- 6. side files are copied only from inside the split, as regular files ----------------------------

def test_6_absorb_and_train_never_copy_a_file_linked_from_outside(sp, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    (sp / "notes.txt").symlink_to(secret)
    for args in (["absorb", sp, "--out", tmp_path / "merged", "-q"], ["train", sp, "--out", tmp_path / "t", *TRAIN]):
        r = run(*args)
        assert r.exit_code == 1 and "notes.txt" in one_error_line(r) and "outside" in r.output, (args[0], r.output)
    assert not list(tmp_path.glob("merged")) and not list(tmp_path.glob("t"))


def test_6_push_check_refuses_a_link_to_a_folder_outside(sp, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("the secret")
    (sp / "extra").symlink_to(tmp_path / "elsewhere")
    r = run("push", sp, "--check")
    assert r.exit_code == 1 and "extra links to" in r.output and "outside" in r.output


# --- 7. spectra, stray folders, modes, user files with surgeon-like names ---------------------------

def test_7_spectra_never_writes_into_an_input(M, sp):
    before, split = tree_hashes(M), tree_hashes(sp)
    for out in (M / "spectra.png", sp / "spectra.png"):
        r = run("spectra", sp, "--out", out)
        assert r.exit_code == 2 and "inside the input" in one_error_line(r)
    assert tree_hashes(M) == before and tree_hashes(sp) == split


def test_7_an_out_through_a_missing_folder_leaves_no_stray_folder(M, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("split", M, "--rank", "4", "--out", "nonexist/../o", "-q").exit_code == 0
    assert run("spectra", "o", "--out", "nonexist/../pic.png").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M", "o", "pic.png"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_7_output_folders_get_the_umask_mode(M, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert run("split", M, "--rank", "4", "--out", tmp_path / "o", "-q").exit_code == 0
        assert run("absorb", tmp_path / "o", "--out", tmp_path / "a", "-q").exit_code == 0
    finally:
        os.umask(old)
    for name in ("o", "a"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o777 & ~umask, name


def test_7_user_files_named_like_surgeons_hidden_ones_are_kept(M, tmp_path):
    trash = tmp_path / ".o.trash-x"
    trash.mkdir()
    (trash / "x").write_text("mine")
    lock = tmp_path / ".p.lock"
    lock.write_text("my lock notes")
    assert run("split", M, "--rank", "4", "--out", tmp_path / "o", "-q").exit_code == 0
    assert (trash / "x").read_text() == "mine"
    r = run("split", M, "--rank", "4", "--out", tmp_path / "p", "-q")
    assert r.exit_code == 2 and ".p.lock" in one_error_line(r)
    assert lock.read_text() == "my lock notes"


# --- minor --------------------------------------------------------------------------------------------

def test_minor_a_solver_typo_leaves_no_partial_folder(M, tmp_path):
    r = run("split", M, "--rank", "4", "--solver", "gram_eigh", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "--solver" in one_error_line(r) and "gram-eigh" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M"]
    assert run("split", M, "--rank", "4", "--solver", "gram-eigh", "--out", tmp_path / "o", "-q").exit_code == 0


@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_minor_a_train_killed_before_its_first_save_starts_over(sp, tmp_path, again):
    out = tmp_path / "t"
    args = ["train", sp, "--out", out, *TRAIN[:2], "--steps", "2", *TRAIN[4:]]
    r = surgeon(*args, env={"SURGEON_FAULT": "train-step:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / "metrics.jsonl").exists() and not (out / "train_state" / "state.pt").exists()
    r = run(*args, *again)
    assert r.exit_code == 0, r.output
    assert (out / "train_state" / "state.pt").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_train_killed_mid_save_stays_replaceable_and_resumable(sp, tmp_path):
    """Not a finding: the listing's guard for train's own saves (the factor file is rewritten before
    the state and the listing follow)."""
    out = tmp_path / "t"
    args = ["train", sp, "--out", out, *TRAIN]
    assert surgeon(*args, env={"SURGEON_FAULT": "train-save:1"}).returncode == -signal.SIGKILL
    r = run(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    (out / "mine.txt").write_text("mine")  # and what the user adds is still refused
    r = run(*args, "--overwrite")
    assert r.exit_code == 2 and "mine.txt" in one_error_line(r)


def test_a_card_surgeon_regenerated_stays_replaceable(M, sp):
    """Not a finding: push --regenerate-card rewrites README.md, surgeon's own, so its listing follows."""
    (sp / "README.md").write_text("my edit")
    assert run("push", sp, "--check", "--regenerate-card").exit_code in (0, 1)
    assert "my edit" not in (sp / "README.md").read_text()
    assert run("split", M, "--rank", "4", "--out", sp, "--overwrite", "-q").exit_code == 0


def test_minor_a_model_card_linking_outside_is_refused_before_any_work(M, tmp_path):
    (tmp_path / "card.md").write_text("---\nlicense: mit\n---\n")
    (M / "README.md").unlink(missing_ok=True)
    (M / "README.md").symlink_to(tmp_path / "card.md")
    r = run("split", M, "--rank", "4", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "README.md" in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M", "card.md"]  # no partial folder, no lock


def test_minor_a_zero_size_weight_is_named_as_empty(M, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = next(f for f in M.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name] = tensors[name][:0]  # (0, in)
    save_file(tensors, shard, metadata={"format": "pt"})
    r = run("split", M, "--rank", "4", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "empty" in one_error_line(r) and "below 0" not in r.output


def test_minor_a_path_component_that_is_a_file_is_named(M, tmp_path):
    (tmp_path / "f").write_text("a file")
    r = run("split", M, "--rank", "4", "--out", tmp_path / "f" / "o", "-q")
    assert r.exit_code == 2 and "is a file, not a folder" in one_error_line(r) and "File exists" not in r.output


def test_minor_no_inodes_left_is_not_called_a_full_disk(M, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "size=16m,nr_inodes=8"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = surgeon("split", M, "--rank", "4", "--out", disk / "o", "-q")  # a process of its own: its files close with it
        assert r.returncode == 1 and "inodes" in r.stderr and "disk is full" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(disk)])
