"""Fault injection: kill -9 anywhere, two runs on one --out, a full disk. After each, the same command
finishes the job and the files equal an uninterrupted run's byte for byte (the run log aside).

    PYTHONPATH=$PWD python -m pytest tests/test_faults.py -q

Kills land exactly where they must through surgeon/faults.py: SURGEON_FAULT=POINT makes the process
SIGKILL itself at that point (what `kill -9` does, at a chosen moment), SURGEON_SLOW=S slows every
solve so that an outside kill or a second run lands mid-run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliutil import one_error_line, run, tree_hashes

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ["--rank", "4", "--shard-size", "100KB", "-q"]
RUN_LOG = frozenset({"surgeon.run.json"})


def surgeon(*args, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "surgeon", *map(str, args)]
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "o"
    assert run("split", tiny["tiny-llama"], *SPLIT, "--out", out).exit_code == 0
    return out


@pytest.mark.parametrize("point", ["workdir-open", "tensor:1", "tensor:9", "after-index", "after-manifest", "after-card", "before-rename", "after-rename"])
def test_kill_anywhere_then_the_same_command_finishes_byte_identical(tiny, clean, tmp_path, point):
    out = tmp_path / "o"
    r = surgeon("split", tiny["tiny-llama"], *SPLIT, "--out", out, env={"SURGEON_FAULT": point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run("split", tiny["tiny-llama"], *SPLIT, "--out", out)  # the same command (in-process: faster)
    assert r.exit_code == 0, r.output
    assert tree_hashes(out, RUN_LOG) == tree_hashes(clean, RUN_LOG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no lock, partial or half-made folder left


@pytest.mark.parametrize("point", ["after-move-aside", "after-rename"])
def test_kill_while_replacing_an_older_output(tiny, clean, tmp_path, point):
    out = tmp_path / "o"
    assert run("split", tiny["tiny-llama"], "--rank", "2", "-q", "--out", out).exit_code == 0
    r = surgeon("split", tiny["tiny-llama"], *SPLIT, "--out", out, "--overwrite", env={"SURGEON_FAULT": point})
    assert r.returncode == -signal.SIGKILL
    assert run("split", tiny["tiny-llama"], *SPLIT, "--out", out, "--overwrite").exit_code == 0
    assert tree_hashes(out, RUN_LOG) == tree_hashes(clean, RUN_LOG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_an_outside_kill_mid_run_resumes_byte_identical(tiny, clean, tmp_path):
    out = tmp_path / "o"
    p = surgeon("split", tiny["tiny-llama"], *SPLIT, "--out", out, env={"SURGEON_SLOW": "0.5"}, wait=False)
    journal = tmp_path / ".o.partial" / ".surgeon" / "journal.jsonl"
    while p.poll() is None and not (journal.exists() and journal.read_text().count("\n") >= 4):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # at the first resume point (2 s in), ~5 s before the run would end
    assert p.wait() == -signal.SIGKILL, p.stderr.read()
    r = run("split", tiny["tiny-llama"], *SPLIT, "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "surgeon.run.json").read_text())["resumed_tensors"] >= 4
    assert tree_hashes(out, RUN_LOG) == tree_hashes(clean, RUN_LOG)


def test_absorb_killed_in_its_final_step_resumes(clean, tmp_path):
    ref = tmp_path / "ref"
    assert run("absorb", clean, "--out", ref).exit_code == 0
    for point in ("tensor:5", "after-manifest", "after-rename"):
        out = tmp_path / point.replace(":", "")
        assert surgeon("absorb", clean, "--out", out, env={"SURGEON_FAULT": point}).returncode == -signal.SIGKILL
        assert run("absorb", clean, "--out", out).exit_code == 0
        assert tree_hashes(out, RUN_LOG) == tree_hashes(ref, RUN_LOG), point


# --- concurrency -------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_out_fails_at_once_and_names_the_first(tiny, tmp_path):
    out = tmp_path / "o"
    first = surgeon("split", tiny["tiny-llama"], "--rank", "8", "-q", "--out", out, env={"SURGEON_SLOW": "0.4"}, wait=False)
    lock = tmp_path / ".o.lock"
    while first.poll() is None and not (lock.exists() and lock.read_text()):
        time.sleep(0.02)
    second = run("split", tiny["tiny-llama"], "--rank", "4", "-q", "--out", out, "--overwrite")  # 5 s later in the issue
    assert first.poll() is None  # refused at once, while the first still runs
    assert second.exit_code == 2 and "another surgeon run" in one_error_line(second) and f"pid {first.pid}" in second.output
    assert first.wait(timeout=300) == 0, first.stderr.read()
    m = json.loads((out / "surgeon.json").read_text())
    assert m["rank"] == 8 and json.loads((out / "adapter_config.json").read_text())["r"] == 8  # one run's output, whole


def test_two_identical_runs_half_a_second_apart(tiny, clean, tmp_path):
    out = tmp_path / "o"
    a = surgeon("split", tiny["tiny-llama"], *SPLIT, "--out", out, env={"SURGEON_SLOW": "0.05"}, wait=False)
    time.sleep(0.5)
    b = surgeon("split", tiny["tiny-llama"], *SPLIT, "--out", out, env={"SURGEON_SLOW": "0.05"}, wait=False)
    codes = sorted([a.wait(timeout=300), b.wait(timeout=300)])
    errs = a.stderr.read() + b.stderr.read()
    assert codes == [0, 2] and "Traceback" not in errs and len(errs.strip().splitlines()) == 1
    assert "another surgeon run" in errs or "exists; pass --overwrite" in errs  # refused while running, or after
    assert tree_hashes(out, RUN_LOG) == tree_hashes(clean, RUN_LOG)


# --- a full disk -------------------------------------------------------------------------------------

def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_not_enough_space_is_refused_before_writing(tiny, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "256k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = surgeon("split", tiny["tiny-llama"], *SPLIT, "--out", disk / "o")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert re.search(r"needs [\d.]+ [kMG]B at .*, [\d.]+ kB free", r.stderr) and str(disk) in r.stderr  # 256 kB: no "0.00 GB"
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_disk_that_fills_up_mid_run_is_one_line_and_resumes(tiny, clean, tmp_path, monkeypatch):
    """ENOSPC from the 6th data write (an injected OSError: the planned-size check passes, then the
    disk fills with someone else's data), then the same command once space is back."""
    import surgeon.format.writer as writer

    real, calls = writer._pwrite_all, {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] >= 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(writer, "_pwrite_all", full)
    out = tmp_path / "o"
    r = run("split", tiny["tiny-llama"], *SPLIT, "--out", out)
    assert r.exit_code == 1 and "disk is full" in one_error_line(r) and "run the same command again" in r.output
    monkeypatch.setattr(writer, "_pwrite_all", real)
    r = run("split", tiny["tiny-llama"], *SPLIT, "--out", out)
    assert r.exit_code == 0, r.output
    assert tree_hashes(out, RUN_LOG) == tree_hashes(clean, RUN_LOG)


@pytest.mark.parametrize("fail_at", [3, 7, 12])
def test_a_failed_write_is_never_journaled_as_done(tiny, clean, tmp_path, monkeypatch, fail_at):
    """Resume points every tensor (commit_seconds=0), the k-th data write fails (EIO): the commit
    queued behind it must not journal it, so the resumed output equals a clean run's."""
    import surgeon.format.writer as writer
    from surgeon.commands.split import SplitOptions, split

    real, calls = writer._pwrite_all, {"n": 0}

    def broken(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.EIO, "Input/output error")
        real(fd, data, offset)

    monkeypatch.setattr(writer, "_pwrite_all", broken)
    out, opts = tmp_path / "o", SplitOptions(rank=4, shard_size="100KB", commit_seconds=0, workers=1)
    with pytest.raises(OSError):
        split(str(tiny["tiny-llama"]), out, opts)
    monkeypatch.setattr(writer, "_pwrite_all", real)
    split(str(tiny["tiny-llama"]), out, opts)
    assert tree_hashes(out, RUN_LOG) == tree_hashes(clean, RUN_LOG)


def test_absorb_commits_as_it_goes_and_never_resumes_against_changed_factors(clean, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    split_dir, out = tmp_path / "s", tmp_path / "a"
    shutil.copytree(clean, split_dir)
    r = surgeon("absorb", split_dir, "--out", out, env={"SURGEON_FAULT": "tensor:14", "SURGEON_SLOW": "0.25"})
    assert r.returncode == -signal.SIGKILL
    journal = tmp_path / ".a.partial" / ".surgeon" / "journal.jsonl"
    assert journal.read_text().count("\n") >= 4  # resume points every 2 s: the kill lost at most the last ones
    f = split_dir / "adapter_model.safetensors"
    t = load_file(f)
    k = next(iter(t))
    t[k] = t[k] + 0.01  # as training in place would: the factors changed
    save_file(t, f, metadata={"format": "pt"})
    r = run("absorb", split_dir, "--out", out, "-q")
    assert r.exit_code == 2 and "different settings" in one_error_line(r)  # the old partial merged the old factors
    r = run("absorb", split_dir, "--out", out, "-q", "--overwrite")
    assert r.exit_code == 0 and json.loads((out / "surgeon.run.json").read_text())["resumed_tensors"] == 0
