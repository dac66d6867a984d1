"""The planned shard writer and the one-tensor-at-a-time reader."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgeon.errors import CorruptCheckpointError
from surgeon.format import Checkpoint, Journal, OutTensor, ShardSetWriter, plan_shards
from surgeon.format.dtypes import dtype_name


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "b.weight": torch.randn(64, 8, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=g).half(),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
        "f.empty": torch.zeros(0, 4),
    }


def test_planned_shards_roundtrip_in_any_write_order(tmp_path):
    ts = _tensors()
    plan = [OutTensor(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in ts.items()]
    shards = plan_shards(plan, max_bytes=1500)
    assert len(shards) > 1 and all(sum(t.nbytes for t in s) <= 1500 or len(s) == 1 for s in shards)
    w = ShardSetWriter(tmp_path, shards)
    order = list(ts)
    random.Random(1).shuffle(order)
    for n in order:
        w.write(n, ts[n])
    w.sync()
    w.close()
    index_path = w.write_index()
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in plan)
    seen = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        with safe_open(f, "pt") as h:  # the reference reader accepts our files
            for k in h.keys():
                seen[k] = h.get_tensor(k)
                assert index["weight_map"][k] == f.name
    assert set(seen) == set(ts)
    for n, t in ts.items():
        assert seen[n].dtype == t.dtype and torch.equal(seen[n], t)


def test_writer_refuses_a_tensor_that_does_not_match_the_plan(tmp_path):
    w = ShardSetWriter(tmp_path, [[OutTensor("x", "F32", (2, 2))]])
    with pytest.raises(ValueError, match="planned F32"):
        w.write("x", torch.zeros(2, 3))


def test_reopening_with_the_same_plan_keeps_written_data(tmp_path):
    plan = [[OutTensor("x", "F32", (4,)), OutTensor("y", "F32", (4,))]]
    w = ShardSetWriter(tmp_path, plan)
    w.write("x", torch.arange(4.0))
    w.sync()
    w.close()
    w2 = ShardSetWriter(tmp_path, plan)  # a resumed run
    w2.write("y", torch.ones(4))
    w2.close()
    with safe_open(tmp_path / "model.safetensors", "pt") as h:
        assert torch.equal(h.get_tensor("x"), torch.arange(4.0))
        assert torch.equal(h.get_tensor("y"), torch.ones(4))


def test_journal_ignores_a_torn_last_line(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.commit([{"name": "a"}])
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"name": "b"')  # crash mid-write
    assert set(Journal(tmp_path / "j.jsonl").done) == {"a"}


def test_reader_reads_each_tensor_and_streams_in_order(tmp_path):
    ts = {k: v for k, v in _tensors().items()}
    save_file(ts, tmp_path / "m.safetensors")
    ck = Checkpoint.open([tmp_path / "m.safetensors"])
    assert set(ck.tensors) == set(ts)
    for n, t in ts.items():
        assert torch.equal(ck.read(n), t)
    names = list(ck.tensors)
    streamed = [(i.name, x) for i, x in ck.stream(names, prefetch=2)]
    assert [n for n, _ in streamed] == names
    assert all(torch.equal(x, ts[n]) for n, x in streamed)


def test_stream_stops_cleanly_when_the_consumer_breaks(tmp_path):
    save_file({f"t{i}": torch.full((100,), float(i)) for i in range(20)}, tmp_path / "m.safetensors")
    ck = Checkpoint.open([tmp_path / "m.safetensors"])
    for i, (info, _) in enumerate(ck.stream(list(ck.tensors), prefetch=1)):
        if i == 2:
            break  # the reader thread must not hang


def test_truncated_and_garbled_files_are_named(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        Checkpoint.open([tmp_path / "cut.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Checkpoint.open([tmp_path / "junk.safetensors"])
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        Checkpoint.open([tmp_path / "tiny.safetensors"])
