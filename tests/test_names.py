"""Checkpoint names → the names transformers loads (surgeon/model), targets on those names, and the
load check after every write (issue 22)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.errors import LoadCheckError, UsageError
from surgeon.model import load_names
from surgeon.model.check import check_adapter
from surgeon.pipeline import SplitOptions, split
from surgeon.source import resolve

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, head_dim=8)
IDS = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def _save(folder, model):
    torch.manual_seed(0)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers as T

    root = tmp_path_factory.mktemp("arch")
    torch.manual_seed(0)
    tc = T.Gemma3TextConfig(**SMALL)
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
    gemma = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4))
    mixtral = T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2))
    return {"gemma3": _save(root / "gemma3", gemma), "mixtral": _save(root / "mixtral", mixtral)}


def _names(folder):
    src = resolve(str(folder))
    return load_names(src.config(), src.checkpoint().tensors)[0]


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_checkpoint_keys_map_to_the_loaded_parameters(models):
    g = _names(models["gemma3"])
    assert g.places["language_model.model.layers.0.mlp.down_proj.weight"].param == "model.language_model.layers.0.mlp.down_proj.weight"
    assert g.places["vision_tower.encoder.layers.1.mlp.fc1.weight"].param == "model.vision_tower.encoder.layers.1.mlp.fc1.weight"
    assert not g.unmapped
    m = _names(models["mixtral"]).places
    w3 = m["model.layers.1.block_sparse_moe.experts.5.w3.weight"]  # fused: expert 5, second half of gate_up_proj
    assert (w3.param, w3.shape, w3.expert, w3.part, w3.parts) == ("model.layers.1.mlp.experts.gate_up_proj", (8, 128, 32), 5, 1, 2)
    assert m["model.layers.0.block_sparse_moe.gate.weight"].param == "model.layers.0.mlp.gate.weight"


def test_gemma3_multimodal_split_loads_the_original_logits(models, tmp_path):
    """Before: the adapter named language_model.model.layers.N..., the loaded modules are
    model.language_model.layers.N...: no language-model factor was applied (Δ 0.19 on a max of 0.47)."""
    from transformers import Gemma3ForConditionalGeneration

    out = tmp_path / "g"
    m = split(str(models["gemma3"]), out, SplitOptions(method="pissa", rank=4))
    assert "model.language_model.layers.0.self_attn.q_proj" in m["layers"]
    assert any(k.startswith("base_model.model.model.language_model.layers.0.") for k in load_file(out / "adapter_model.safetensors"))
    ref = _logits(Gemma3ForConditionalGeneration.from_pretrained(models["gemma3"], dtype=torch.float32))
    got = _logits(Gemma3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32))
    assert (got - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())


def test_all_linear_is_what_peft_takes_on_the_loaded_model(models):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    from surgeon.targets import select_targets

    src = resolve(str(models["gemma3"]))
    ours = {t.module for t in select_targets(src.checkpoint().tensors, ["all-linear"], "gemma3", _names(models["gemma3"])).values()}
    pm = get_peft_model(Gemma3ForConditionalGeneration.from_pretrained(models["gemma3"]), LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default") for n, _ in pm.named_modules() if n.endswith(".lora_A.default")}
    assert ours == theirs and "lm_head" not in ours


@pytest.mark.parametrize("target, word", [(["embed_tokens"], "embedding"), (["input_layernorm"], "not a linear layer"),
                                          (["gate"], "not a linear layer"), (["gate_up_proj"], "3-D parameter")])
def test_an_explicit_target_that_is_not_a_linear_layer_is_one_usage_line(models, tmp_path, target, word):
    with pytest.raises(UsageError, match=word) as e:
        split(str(models["mixtral"]), tmp_path / "o", SplitOptions(rank=2, target=target))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_the_router_stays_dense_under_all_linear_and_is_listed(models, tmp_path):
    """An 8-expert Mixtral's router is 8 x hidden: --rank 8 refused the whole split before."""
    m = split(str(models["mixtral"]), tmp_path / "o", SplitOptions(rank=8))
    assert m["summary"]["layers"] > 0
    assert all(".gate" not in k for k in m["layers"])


def test_a_mis_named_adapter_is_refused_by_the_load_check(models, tmp_path):
    out = tmp_path / "g"
    m = split(str(models["gemma3"]), out, SplitOptions(method="milora", rank=4))
    names = _names(models["gemma3"])
    check_adapter(names.model, out, "adapter_config.json", "adapter_model.safetensors", list(m["layers"]))  # as written: binds
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    sd = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sorted(sd) if ".layers.1.self_attn.q_proj." in k and "language_model" in k)
    sd[key.replace(".q_proj.", ".query.")] = sd.pop(key)
    save_file(sd, bad / "adapter_model.safetensors")
    with pytest.raises(LoadCheckError, match="q_proj") as e:
        check_adapter(names.model, bad, "adapter_config.json", "adapter_model.safetensors", list(m["layers"]))
    assert "\n" not in str(e.value)
    sd = load_file(out / "adapter_model.safetensors")  # a factor of the wrong shape
    key = next(k for k in sorted(sd) if k.endswith("lora_A.weight"))
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, bad / "adapter_model.safetensors")
    with pytest.raises(LoadCheckError, match="size mismatch"):
        check_adapter(names.model, bad, "adapter_config.json", "adapter_model.safetensors", list(m["layers"]))
    json.loads((out / "surgeon.json").read_text())
