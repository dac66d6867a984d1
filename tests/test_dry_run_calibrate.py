"""`surgeon split --dry-run --calibrate DATA` reads and tokenizes DATA as the split would and adds the
calibration to the plan: its tokens and samples, its share of the time estimate, and an estimate of
the device memory it adds (hidden states in and out of a block, one block, one block's covariances)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from surgeon.cli import build_app

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"
HIDDEN = json.loads((TINY / "config.json").read_text())["hidden_size"]


def dry(tmp_path, *extra):
    r = CliRunner().invoke(build_app(), ["split", str(TINY), "--method", "kasa", "-r", "4", "--dry-run", "--json",
                                         "--out", str(tmp_path / "o"), *extra], catch_exceptions=False)
    return r, (json.loads(r.stdout) if r.exit_code == 0 else None)


def test_the_plan_counts_the_calibration(tmp_path):
    _, plain = dry(tmp_path)
    assert plain["calibration"] is None
    _, small = dry(tmp_path, "--calibrate", "default", "--calibrate-tokens", "2000")
    _, big = dry(tmp_path, "--calibrate", "default", "--calibrate-tokens", "6000")
    c = small["calibration"]
    assert c["tokens"] == 2000 and c["mode"] == "kpm" and c["source"] == "default" and c["samples"] >= 4  # records of ≤ 512 tokens
    assert c["estimated_seconds"] >= 0 and small["estimated_seconds"] >= c["estimated_seconds"]
    # hidden states in and out of a block, float32 on the CPU: 2 · tokens · hidden · 4 bytes, the rest unchanged
    assert big["calibration"]["device_bytes_estimate"] - c["device_bytes_estimate"] == 2 * 4000 * HIDDEN * 4
    assert not (tmp_path / "o").exists()


def test_bad_calibration_data_fails_the_dry_run_in_one_line(tmp_path):
    r, _ = dry(tmp_path, "--calibrate", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "missing.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_compute_dtype_is_the_block_runners():
    """Half weights run in float32 on the CPU and as they are on a GPU; float32 stays float32 (no device needed)."""
    import torch
    from types import SimpleNamespace

    from surgeon.commands.plan import _compute_dtype

    def job(dtype):
        return SimpleNamespace(ckpt=SimpleNamespace(tensors={"model.layers.0.mlp.up_proj.weight": SimpleNamespace(dtype=dtype)}))

    names = ["model.layers.0.mlp.up_proj.weight"]
    assert _compute_dtype(job("BF16"), names, torch.device("cpu")) == torch.float32
    assert _compute_dtype(job("BF16"), names, torch.device("cuda")) == torch.bfloat16
    assert _compute_dtype(job("F32"), names, torch.device("cuda")) == torch.float32


def test_only_the_blocks_the_calibration_runs_are_counted():
    """A multimodal checkpoint's vision tower never runs in a calibration, nor do blocks after the
    last targeted one: the time estimate counts the text decoder's blocks up to that one."""
    from surgeon.commands.plan import _blocks, _run_blocks

    names = [f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(4)]
    names += [f"language_model.model.layers.{i}.{p}.weight" for i in range(3) for p in ("mlp.up_proj", "self_attn.q_proj")]
    targets = {f"language_model.model.layers.{i}.self_attn.q_proj.weight": None for i in (0, 1)}
    kept = _run_blocks(_blocks(names), _blocks(targets))
    assert sorted(kept) == ["language_model.model.layers.0", "language_model.model.layers.1"]
    assert kept["language_model.model.layers.1"] == ["language_model.model.layers.1.mlp.up_proj.weight",
                                                     "language_model.model.layers.1.self_attn.q_proj.weight"]
