"""The parallel reader (chunked positioned reads, several in flight) and the CLI's early reads: the same
bytes and hashes as one plain read per tensor, a bounded window, one-line errors, byte-identical splits.

    python -m pytest -q tests/test_reader_parallel.py
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cliutil import one_error_line, run, tree_hashes
from safetensors.torch import save_file

from surgeon.cli import early
from surgeon.commands.split import SplitOptions, split
from surgeon.errors import CorruptCheckpointError, SourceError
from surgeon.format import Checkpoint, reader

ROOT = Path(__file__).resolve().parents[1]


def _shards(folder: Path) -> list[Path]:
    """Three shards of mixed dtypes, sizes that are no multiple of any chunk, an empty and a scalar tensor."""
    g = torch.Generator().manual_seed(3)
    parts = [
        {"a.weight": torch.randn(97, 31, generator=g), "b.weight": torch.randn(40, 13, generator=g).bfloat16()},
        {"c.bias": torch.randn(7, generator=g).half(), "d.empty": torch.zeros(0, 4), "e.scalar": torch.tensor(2.5, dtype=torch.float64)},
        {"f.ids": torch.arange(1001, dtype=torch.int64), "g.weight": torch.randn(64, 65, generator=g)},
    ]
    files = []
    for i, p in enumerate(parts):
        f = folder / f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(p, str(f))
        files.append(f)
    return files


@pytest.mark.parametrize("depth,chunk,prefetch", [(4, 7, 2), (8, 4096, 1), (1, 1 << 20, 3), (3, 100, 5)])
def test_parallel_stream_returns_the_plain_reads_bytes_and_hashes(tmp_path, depth, chunk, prefetch):
    ck = Checkpoint.open(_shards(tmp_path))
    names = list(ck.tensors)
    plain = Checkpoint.open(sorted(tmp_path.glob("*.safetensors")))
    want = {n: plain.read(n, digest=True) for n in names}
    got = [(i.name, t) for i, t in ck.stream(names, prefetch=prefetch, digest=True, depth=depth, chunk=chunk)]
    assert [n for n, _ in got] == names
    for n, t in got:
        assert t.dtype == want[n].dtype and t.shape == want[n].shape
        assert t.numel() == 0 or t.reshape(-1).view(torch.uint8).tolist() == want[n].reshape(-1).view(torch.uint8).tolist()
    assert ck.digests == plain.digests and len(ck.digests) == len(names)


def test_the_window_stays_bounded_while_the_caller_is_slow(tmp_path, monkeypatch):
    """The reader allocates at most `prefetch` tensors ahead of the one being read (plus the caller's)."""
    ck = Checkpoint.open(_shards(tmp_path))
    made = []
    real = reader._buffer
    monkeypatch.setattr(reader, "_buffer", lambda n, pin: made.append(n) or real(n, pin))
    ahead = []
    for k, _ in enumerate(ck.stream(list(ck.tensors), prefetch=2, depth=4, chunk=16)):
        time.sleep(0.02)  # a slow caller: the reader runs as far ahead as it may
        ahead.append(len(made) - (k + 1))
    assert len(made) == len(ck.tensors)
    assert max(ahead) <= 2 + 1 and max(ahead) >= 1  # queue of 2, one more waiting to enter it


def test_a_file_truncated_after_open_is_one_line(tmp_path):
    files = _shards(tmp_path)
    ck = Checkpoint.open(files)
    os.truncate(files[2], files[2].stat().st_size - 100)
    with pytest.raises(CorruptCheckpointError, match="unexpected end of file reading 'g.weight'") as e:
        for _ in ck.stream(list(ck.tensors), depth=4, chunk=64):
            pass
    assert "\n" not in str(e.value) and files[2].name in str(e.value)


def _eio_on(path: Path, monkeypatch):
    real = os.preadv
    bad = os.stat(path).st_ino

    def preadv(fd, buffers, offset):
        if os.fstat(fd).st_ino == bad and offset > 4096:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "preadv", preadv)


def test_an_io_error_while_reading_is_one_line_naming_file_and_tensor(tmp_path, monkeypatch):
    files = _shards(tmp_path)
    ck = Checkpoint.open(files)
    _eio_on(files[2], monkeypatch)
    with pytest.raises(SourceError, match=r"model-00003-of-00003.safetensors: cannot read '(f.ids|g.weight)' \(Input/output error\)") as e:
        for _ in ck.stream(list(ck.tensors), depth=4, chunk=64):
            pass
    assert "\n" not in str(e.value)
    with pytest.raises(SourceError, match="Input/output error"):
        ck.read("g.weight")


def test_an_io_error_during_a_split_is_one_cli_line(tiny, tmp_path, monkeypatch):
    model = tiny["tiny-llama"]
    shard = sorted(model.glob("*.safetensors"))[1]
    _eio_on(shard, monkeypatch)
    r = run("split", model, "--rank", "4", "-q", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "Input/output error" in one_error_line(r) and shard.name in r.output


def test_a_split_is_byte_identical_with_sequential_and_parallel_reads(tiny, tmp_path):
    model = tiny["tiny-llama"]
    split(str(model), tmp_path / "seq", SplitOptions(rank=4, prefetch=0))  # one plain read per tensor, no threads
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SURGEON_EARLY_READ": "8"}
    r = subprocess.run([sys.executable, "-m", "surgeon", "split", str(model), "--rank", "4", "-q", "--out", str(tmp_path / "par")],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    skip = frozenset({"surgeon.run.json"})
    assert tree_hashes(tmp_path / "seq", skip) == tree_hashes(tmp_path / "par", skip)


def test_early_reads_find_the_split_model_and_only_its_regular_shards(tiny, tmp_path):
    model = tiny["tiny-llama"]
    shards = sorted(model.glob("*.safetensors"))
    assert early.model_files(["split", str(model), "--out", "o"]) == shards
    assert early.model_files(["split", "--method", "pissa", str(model), "-r", "8"]) == shards
    assert early.model_files(["split", "-o", str(model), "org/name"]) == []  # the output folder is never read
    assert early.model_files(["absorb", str(model)]) == []
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "config.json").write_text("{}")
    (linked / "model.safetensors").symlink_to(shards[0])
    assert early.model_files(["split", str(linked)]) == []


def test_early_reads_read_every_byte_within_the_budget(tiny):
    shards = sorted(tiny["tiny-llama"].glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    w = early.Warmer(shards, budget=total, depth=3, chunk=1000)
    for t in w._threads:
        t.join()
    assert w.done_bytes == total
    small = early.Warmer(shards, budget=2500, depth=2, chunk=1000)
    small.stop()
    assert small.done_bytes <= 2000 and len(small.jobs) == 2


def test_early_reads_start_before_torch_when_asked_and_are_off_by_default(tiny):
    code = ("import sys; from surgeon.cli import early; w = early.start(['split', sys.argv[1]]); "
            "assert 'torch' not in sys.modules; early.stop(); print(w is not None)")
    env = {k: v for k, v in os.environ.items() if k != "SURGEON_EARLY_READ"} | {"PYTHONPATH": str(ROOT)}
    on = subprocess.run([sys.executable, "-c", code, str(tiny["tiny-llama"])], env={**env, "SURGEON_EARLY_READ": "4"},
                        capture_output=True, text=True, timeout=60, check=False)
    off = subprocess.run([sys.executable, "-c", code, str(tiny["tiny-llama"])], env=env,  # off by default
                         capture_output=True, text=True, timeout=60, check=False)
    assert (on.stdout.strip(), off.stdout.strip()) == ("True", "False"), on.stderr + off.stderr
