"""--rank-pattern / --alpha-pattern (PEFT's rank_pattern / alpha_pattern) and split --dry-run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import logits
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from surgeon.cli import build_app
from surgeon.commands.absorb import AbsorbOptions, absorb, export_lora
from surgeon.commands.split import SplitOptions, split
from surgeon.errors import UsageError
from surgeon.methods import names
from surgeon.model import patterns
from surgeon.runtime import load_split

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
RP = [r"mlp\..*=6", r"layers\.0\.self_attn\.q_proj=2"]
AP = ["v_proj=12"]
MODULES = [f"model.layers.{i}.{p}" for i in (0, 1, 10) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("keys", [["q_proj"], [r"mlp\..*", "q_proj"], [r"layers\.1\..*", r"up_proj"], [r"layers\.1\.mlp\.up_proj"], ["proj"], [r".*_proj"]])
def test_pattern_key_is_peft_get_pattern_key(keys):
    from peft.utils.other import get_pattern_key

    for m in MODULES:
        k = patterns.pattern_key(keys, m)
        assert (k if k is not None else m) == get_pattern_key(keys, m), (keys, m)


@pytest.fixture(scope="module")
def pissa(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("patterns") / "pissa"
    m = split(str(tiny["tiny-llama"]), out, SplitOptions(method="pissa", rank=4, rank_pattern=RP, alpha_pattern=AP))
    return out, m


def test_vanilla_peft_builds_the_same_shapes_and_scales(pissa, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, m = pissa
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["rank_pattern"] == {r"mlp\..*": 6, r"layers\.0\.self_attn\.q_proj": 2}
    # the given alpha first, then alpha = rank for each rank pattern (scale 1, surgeon's default)
    assert list(conf["alpha_pattern"].items()) == [("v_proj", 12.0), (r"mlp\..*", 6.0), (r"layers\.0\.self_attn\.q_proj", 2.0)]
    lay = m["layers"]
    assert lay["model.layers.0.self_attn.q_proj"]["rank"] == 2 and lay["model.layers.1.self_attn.q_proj"]["rank"] == 4
    assert lay["model.layers.1.mlp.up_proj"]["rank"] == 6 and lay["model.layers.1.mlp.up_proj"]["scale"] == 1.0
    assert lay["model.layers.0.self_attn.v_proj"]["scale"] == 3.0  # alpha 12 / rank 4
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), out)
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and name.removeprefix("base_model.model.") in lay:
            entry = lay[name.removeprefix("base_model.model.")]
            assert mod.r["default"] == entry["rank"] and mod.scaling["default"] == pytest.approx(entry["scale"])
    ref = logits(tiny["tiny-llama"], IDS)
    assert torch.allclose(logits(peft, IDS), ref, atol=2e-5 * float(ref.abs().max()), rtol=0)


def test_export_doubles_the_patterns_and_peft_reproduces_the_trained_change(pissa, tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = pissa
    trained = tmp_path / "trained"
    shutil.copytree(out, trained)
    f = load_file(trained / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in f.items()}, trained / "adapter_model.safetensors")
    conf = export_lora(trained, tmp_path / "lora")
    assert conf["rank_pattern"] == {r"mlp\..*": 12, r"layers\.0\.self_attn\.q_proj": 4} and conf["alpha_pattern"]["v_proj"] == 24.0
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"], dtype=torch.float32), tmp_path / "lora")
    want = logits(load_split(trained, trainable=False).model, IDS)
    assert torch.allclose(logits(on_original, IDS), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", [m for m in names() if m != "pissa"])
def test_every_method_takes_per_module_ranks(tiny, tmp_path, method):
    """Shapes, manifest, runtime and absorb agree for each module's own rank."""
    out = tmp_path / method
    m = split(str(tiny["tiny-llama"]), out, SplitOptions(method=method, rank=4, rank_pattern=[r"mlp\..*=6"], target=["up_proj", "q_proj"]))
    sm = load_split(out)
    for module, rt in sm.modules.items():
        r = 6 if ".mlp." in module else 4
        assert m["layers"][module]["rank"] == r
        assert all(r in t.shape for t in rt.factors().values())
    if method == "moe":  # prompt-routed: absorb needs --fixed-gates, tested in test_moe.py
        return
    with torch.no_grad():
        for p in sm.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sm.save(tmp_path / "trained")
    absorb(tmp_path / "trained", tmp_path / "merged", AbsorbOptions(base="residual"))
    want = logits(load_split(tmp_path / "trained", trainable=False).model, IDS)
    assert torch.allclose(logits(tmp_path / "merged", IDS), want, atol=1e-4, rtol=0)


def test_bad_patterns_are_refused(tiny, tmp_path):
    cases = [(["mlp=x"], "not an integer"), (["nothing_here=4"], "matches no targeted module"), (["(=4"], "not a valid regular"),
             (["down_proj=64"], "from --rank-pattern"), (["=4"], "REGEX=VALUE")]
    for rp, msg in cases:
        with pytest.raises(UsageError, match=msg):
            split(str(tiny["tiny-llama"]), tmp_path / "x", SplitOptions(method="pissa", rank=4, rank_pattern=rp))
    assert not (tmp_path / "x").exists()


def test_dry_run_writes_nothing_and_predicts_the_split(tiny, tmp_path):
    out = tmp_path / "q"
    args = ["split", str(tiny["tiny-llama"]), "--method", "pissa", "-r", "4", "--rank-pattern", r"mlp\..*=6",
            "--quantize", "nf4", "--quantize-iters", "1", "--shard-size", "100KB", "--out", str(out)]
    r = CliRunner().invoke(build_app(), [*args, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert not out.exists() and not any(tmp_path.iterdir())
    assert plan["layers"] == 14 and plan["quantize"]["iters"] == 1 and plan["fits"] and plan["estimated_seconds"] >= 0
    assert {t["module"]: t["rank"] for t in plan["targets"]}["model.layers.1.mlp.up_proj"] == 6
    human = CliRunner().invoke(build_app(), [*args, "--dry-run"])
    assert human.exit_code == 0 and "trainable parameters" in human.output and "nothing written" in human.output
    assert CliRunner().invoke(build_app(), [*args, "--quiet"]).exit_code == 0
    sizes = {f["file"]: f["bytes"] for f in plan["files"]}
    for name, size in sizes.items():
        if name.endswith(".safetensors"):
            assert (out / name).stat().st_size == size, name
    assert plan["trainable_parameters"] == sum(p.numel() for p in load_split(out).trainable_parameters())
    from surgeon.commands.plan import (
        dry_run,  # moe: per-block routers count too; nusa: its frozen bases do not
    )

    for method in ("moe", "nusa"):
        opts = SplitOptions(method=method, rank=4, rank_pattern=[r"mlp\..*=6"])
        p = dry_run(str(tiny["tiny-llama"]), tmp_path / method, opts)
        split(str(tiny["tiny-llama"]), tmp_path / method, opts)
        assert p["trainable_parameters"] == sum(x.numel() for x in load_split(tmp_path / method).trainable_parameters()), method
