"""The content listing (.surgeon.files) takes the hashes the writers computed while writing: a 7B
output is not read again after the early writeback dropped it from the page cache (issue 29: 9 s of a
cold H100 split). The listing must stay exactly what reading the files gives."""

from __future__ import annotations

import json

import pytest
import torch
import xxhash

from surgeon.commands.split import SplitOptions, split
from surgeon.format import listing
from surgeon.format.writer import OutTensor, ShardSetWriter, plan_shards


def _listed(folder):
    rows = [ln.split(" ", 3) for ln in (folder / listing.FILES).read_text().splitlines()[1:]]
    return {path: digest for digest, _size, mark, path in rows if mark != listing.TEMP}


def _plan():
    return [OutTensor("a", "F32", (3, 5)), OutTensor("b", "BF16", (7,)), OutTensor("c", "F32", (4, 4))]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(), "c": torch.randn(4, 4, generator=g)}


def test_in_order_writes_hash_the_file_as_it_is_on_disk(tmp_path):
    w = ShardSetWriter(tmp_path, plan_shards(_plan(), 10**9))
    for k, t in _tensors().items():
        w.write(k, t)
    w.close()
    (path, (key, digest)), = w.content_hashes().items()
    st = path.stat()
    assert key == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert digest == listing.content_hash(path) == xxhash.xxh3_128(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("order", [("b", "a", "c"), ("a", "b", "c", "a"), ("a", "c")])
def test_out_of_order_rewritten_or_partial_files_give_no_hash(tmp_path, order):
    w = ShardSetWriter(tmp_path, plan_shards(_plan(), 10**9))
    for k in order:
        w.write(k, _tensors()[k])
    w.close()
    assert w.content_hashes() == {}


def test_a_reopened_file_is_not_hashed_from_the_rest(tmp_path):
    """A resumed run reopens the file with the bytes written before the kill: hashing only what it
    writes now would be wrong, so it gives no hash and the listing reads the file."""
    w = ShardSetWriter(tmp_path, plan_shards(_plan(), 10**9))
    w.write("a", _tensors()["a"])
    w.close()
    w = ShardSetWriter(tmp_path, plan_shards(_plan(), 10**9))
    for k in ("b", "c"):
        w.write(k, _tensors()[k])
    w.close()
    assert w.content_hashes() == {}


def test_seeded_listing_equals_a_read_one_and_a_changed_file_is_read_again(tmp_path):
    w = ShardSetWriter(tmp_path, plan_shards(_plan(), 10**9))
    for k, t in _tensors().items():
        w.write(k, t)
    w.close()
    hashes = w.content_hashes()
    (path,) = hashes
    listing.write_listing(tmp_path, cache=listing.seeded_cache(tmp_path, hashes))
    seeded = (tmp_path / listing.FILES).read_text()
    listing.write_listing(tmp_path)
    assert seeded == (tmp_path / listing.FILES).read_text()
    with open(path, "ab") as f:  # changed after the writer closed it: another size
        f.write(b"\x01")
    listing.write_listing(tmp_path, cache=listing.seeded_cache(tmp_path, hashes))
    assert _listed(tmp_path)[path.name] == listing.content_hash(path) != hashes[path][1]


def test_split_lists_its_shards_without_reading_them_again(model, tmp_path, monkeypatch):
    read = []
    real = listing.content_hash
    monkeypatch.setattr(listing, "content_hash", lambda p, *a, **k: read.append(p.name) or real(p, *a, **k))
    out = tmp_path / "out"
    split(str(model), out, SplitOptions(method="milora", rank=4, device="cpu", shard_size="200KB"))
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    assert not set(shards) & set(read)  # hashed while written
    assert "surgeon.json" in read  # the small files are read as before
    assert _listed(out) == {p: real(out / p) for p in _listed(out)}  # the listing is what the bytes are


def test_absorb_lists_its_shards_without_reading_them_again(model, tmp_path, monkeypatch):
    from surgeon.commands.absorb import AbsorbOptions, absorb

    split(str(model), tmp_path / "s", SplitOptions(method="pissa", rank=4, device="cpu"))
    read = []
    real = listing.content_hash
    monkeypatch.setattr(listing, "content_hash", lambda p, *a, **k: read.append(p.name) or real(p, *a, **k))
    out = tmp_path / "merged"
    absorb(tmp_path / "s", out, AbsorbOptions(shard_size="200KB"))
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and not shards & set(read)
    assert _listed(out) == {p: real(out / p) for p in _listed(out)}
