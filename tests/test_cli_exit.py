"""The CLI leaves without the interpreter's teardown once a command has returned (surgeon.cli.leave):
its output still arrives whole, exit codes are kept, and a live worker thread or a non-numeric code
takes the ordinary way out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from surgeon import cli

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"


def _surgeon(*args, env=None):
    return subprocess.run([sys.executable, "-m", "surgeon", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_json_output_arrives_whole_and_codes_are_kept(tmp_path):
    ok = _surgeon("split", TINY, "--rank", "4", "--out", tmp_path / "o", "--json", "-q")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rank"] == 4  # flushed before the process ended
    again = _surgeon("split", TINY, "--rank", "4", "--out", tmp_path / "o", "-q")
    assert again.returncode == 2 and "--overwrite" in again.stderr  # usage error: code 2, its line on stderr
    missing = _surgeon("split", tmp_path / "nowhere", "--rank", "4", "--out", tmp_path / "p", "-q")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_fast_and_slow_exit_write_the_same_files(tmp_path):
    fast = _surgeon("split", TINY, "--rank", "4", "--out", tmp_path / "f", "-q")
    slow = _surgeon("split", TINY, "--rank", "4", "--out", tmp_path / "s", "-q", env={"SURGEON_SLOW_EXIT": "1"})
    assert fast.returncode == slow.returncode == 0
    for p in sorted((tmp_path / "s").rglob("*")):
        if p.is_file() and p.name != "surgeon.run.json":
            assert (tmp_path / "f" / p.relative_to(tmp_path / "s")).read_bytes() == p.read_bytes(), p.name


@pytest.fixture
def exits(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "_exit", calls.append)
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    monkeypatch.delenv("SURGEON_SLOW_EXIT", raising=False)
    return calls


def test_leave_runs_atexit_then_exits_with_the_code(exits):
    cli.leave(3)
    assert exits == ["atexit", 3]
    exits.clear()
    cli.leave(None)
    assert exits == ["atexit", 0]


def test_leave_takes_the_ordinary_way_out_when_work_is_still_running(exits):
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=False)
    worker.start()
    try:
        cli.leave(0)
    finally:
        stop.set()
        worker.join()
    assert exits == []
    cli.leave("a message")  # printed by the interpreter on the way out: not ours to drop
    assert exits == []


def test_slow_exit_on_request(exits, monkeypatch):
    monkeypatch.setenv("SURGEON_SLOW_EXIT", "1")
    cli.leave(0)
    assert exits == []


def test_a_stream_that_fails_to_flush_takes_the_ordinary_exit(exits, monkeypatch):
    class Full:
        def write(self, text):
            return len(text)

        def flush(self):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.sys, "stdout", Full())
    cli.leave(0)
    assert exits == ["atexit"]  # not os._exit(0): the interpreter's exit reports the lost output and fails

