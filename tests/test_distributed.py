"""split and absorb under torchrun (gloo, 2 CPU processes) against a single process, byte for byte.

Each torchrun launch costs ~5 s on two cores; the reference runs are in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.commands.absorb import AbsorbOptions, absorb
from surgeon.commands.split import SplitOptions, split, split_cost
from surgeon.engine import distributed
from surgeon.engine.distributed import Group, assign, matrix_cost
from surgeon.format import Checkpoint
from surgeon.model.selection import select_targets

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` (its module form, this interpreter)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_thread(fn, *args):
    """The reference run with one BLAS thread per solve, as each torchrun rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def assert_same_output(a: Path, b: Path) -> dict:
    """Every file byte-identical (surgeon.json holds no timings), except the run log; returns b's
    manifest with its run log under "run"."""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if name != "surgeon.run.json":
            assert hashlib.sha256((a / name).read_bytes()).digest() == hashlib.sha256((b / name).read_bytes()).digest(), name
    mb = json.loads((b / "surgeon.json").read_text())
    if (b / "surgeon.run.json").exists():
        mb["run"] = json.loads((b / "surgeon.run.json").read_text())
    return mb


@pytest.fixture(scope="module")
def llama_ref(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "split"
    one_thread(split, str(tiny["tiny-llama"]), out, SplitOptions(rank=4, shard_size="100KB"))
    return out


@pytest.mark.parametrize("fixture, method, extra", [
    ("tiny-gpt2", "kasa", []),  # Conv1D (transposed), factors not LoRA-shaped, seeded random init
    ("tiny-qwen2", "moe", ["--dtype", "float32"]),  # bf16 source, tied, per-block router tensors (rank 0 writes them)
])
def test_split_under_torchrun_is_byte_identical(tiny, tmp_path, fixture, method, extra):
    src = tiny[fixture]
    ref = tmp_path / "ref"
    one_thread(split, str(src), ref, SplitOptions(method=method, rank=4, shard_size="30KB", dtype=(extra or [None, None])[1]))
    r = torchrun("-m", "surgeon", "split", src, "--method", method, "--rank", "4", "--shard-size", "30KB", *extra, "--out", tmp_path / "d", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(ref.glob("model-*.safetensors"))) > 2  # several shards, shared by the ranks
    m = assert_same_output(ref, tmp_path / "d")
    s = m["run"]
    assert s["world_size"] == 2 and [x["rank"] for x in s["ranks"]] == [0, 1]
    n_tensors = len(Checkpoint.open(sorted(src.glob("*.safetensors"))))
    assert sum(x["tensors"] for x in s["ranks"]) == n_tensors and min(x["tensors"] for x in s["ranks"]) > 0
    assert json.loads(r.stdout)["summary"]["layers"] == m["summary"]["layers"]  # --json printed once, by rank 0


def test_absorb_under_torchrun_is_byte_identical(llama_ref, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(llama_ref, trained)
    f = trained / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in load_file(f).items()}, f)  # "trained" factors
    ref = tmp_path / "ref"
    one_thread(absorb, trained, ref, AbsorbOptions(shard_size="100KB"))
    r = torchrun("-m", "surgeon", "absorb", trained, "--shard-size", "100KB", "--out", tmp_path / "d", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    m = assert_same_output(ref, tmp_path / "d")
    assert m["base"] == "original" and m["layers_changed"] == 14 and json.loads(r.stdout)["layers_changed"] == 14


def test_a_bad_tensor_on_rank_1_fails_every_rank_cleanly(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny["tiny-llama"], bad)
    ck = Checkpoint.open(sorted(bad.glob("model-*.safetensors")))
    targets = select_targets(ck.tensors, ["all-linear"], "llama")
    names = list(ck.tensors)
    owner = assign([split_cost(ck.tensors[n], n in targets, "cpu") for n in names], 2)
    victim = ck.tensors[[n for n, o in zip(names, owner) if o == 1 and n in targets][-1]]  # rank 1's last solve
    fd = os.open(victim.file, os.O_RDWR)
    os.pwrite(fd, np.full(victim.nbytes // 4, np.nan, np.float32).tobytes(), victim.offset)
    os.close(fd)
    r = torchrun("-m", "surgeon", "split", bad, "--rank", "4", "--out", tmp_path / "o", timeout=90)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: rank 1 of 2 failed: {victim.name}: the weight contains NaN or Inf values; the checkpoint is damaged."], r.stderr[-3000:]
    assert "surgeon/" not in r.stderr  # no traceback from our code, only torchrun's report
    assert not (tmp_path / "o").exists()


def test_interrupted_run_resumes_with_two_ranks_or_one(tiny, llama_ref, tmp_path):
    src, out = tiny["tiny-llama"], tmp_path / "o"
    r = torchrun(ROOT / "tests" / "dist_driver.py", src, out, "--fail-rank", "0", "--fail-at", "3", "--slow", "0.2")
    assert r.returncode != 0
    assert "rank 0 stopped after" in r.stdout and "NumericsError: injected failure on rank 0" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "PeerFailedError: rank 0 of 2 failed: injected failure on rank 0" in r.stdout
    partial = tmp_path / ".o.partial"
    lines = {k: len((partial / ".surgeon" / f"journal.rank{k}.jsonl").read_text().splitlines()) for k in (0, 1)}
    ck = Checkpoint.open(sorted(src.glob("model-*.safetensors")))
    assert 0 < lines[0] and 0 < lines[1] < 10 and sum(lines.values()) < len(ck)  # rank 1 stopped early (its share: 10)
    shutil.copytree(partial, tmp_path / ".o1.partial")

    r = torchrun("-m", "surgeon", "split", src, "--rank", "4", "--shard-size", "100KB", "--out", out, "--json", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["run"]["resumed_tensors"] == sum(lines.values())
    assert_same_output(llama_ref, out)  # bytes_read differs: the resumed run reads less
    assert not partial.exists()

    m = one_thread(split, str(src), tmp_path / "o1", SplitOptions(rank=4, shard_size="100KB"))  # one process takes over
    assert m["run"]["resumed_tensors"] == sum(lines.values())
    assert_same_output(llama_ref, tmp_path / "o1")


def test_greedy_assignment_balances_cost_not_count():
    # a 7B-shaped layer list: one embedding, 32 × (4 square + 3 MLP) solves, norms
    shapes = [((32000, 4096), False)] + [((4096, 4096), True)] * 128 + [((11008, 4096), True)] * 96 + [((4096,), False)] * 65
    costs = [matrix_cost(s, 2 * int(np.prod(s)), "cuda", solve=t) for s, t in shapes]
    k = 4096
    assert costs[1] == 2 * k**2 * 256 + 2 * k**3  # bytes × 256 + eigh k³ + Gram m·n·k
    for world in (2, 3, 4):
        owner = assign(costs, world)
        loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(costs)  # LPT: within one item of even
        assert max(loads) / (sum(costs) / world) < 1.02
    # one heavy matrix and many light tensors: count-balancing would give rank 0 half the light ones too
    costs = [1000] + [10] * 100
    owner = assign(costs, 2)
    assert owner[0] == 0 and owner[1:].count(1) == 100


def test_each_rank_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert Group(rank=3, world=4, local_rank=3).device("auto") == "cuda:3"
    assert Group(rank=5, world=8, local_rank=1).device("cuda") == "cuda:1"
    assert Group(rank=1, world=2, local_rank=1).device("cpu") == "cpu"
    assert Group().device("auto") == "auto"  # one process: unchanged
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert Group(rank=2, world=4, local_rank=2).device("auto") == "cuda:0"  # one visible GPU per process
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(distributed.DistributedError, match="--nproc-per-node 2"):
        Group(rank=2, world=4, local_rank=2).device("auto")
