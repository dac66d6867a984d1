"""Checkpoint names → the names transformers loads (surgeon/model), targets on those names, and the
load check after every write (issue 22)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.commands.split import SplitOptions, split
from surgeon.errors import LoadCheckError, UsageError
from surgeon.format.source import resolve
from surgeon.model import load_names
from surgeon.model.check import check_adapter

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
    ds = {k: v for k, v in SMALL.items() if k != "head_dim"}
    deepseek = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**{**ds, "num_key_value_heads": 4}, moe_intermediate_size=32,
                                                         n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                                         topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8))
    return {"gemma3": _save(root / "gemma3", gemma), "mixtral": _save(root / "mixtral", mixtral), "deepseek": _save(root / "deepseek", deepseek)}


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

    from surgeon.model.selection import select_targets

    src = resolve(str(models["gemma3"]))
    ours = {t.module for t in select_targets(src.checkpoint().tensors, ["all-linear"], "gemma3", _names(models["gemma3"])).values()}
    pm = get_peft_model(Gemma3ForConditionalGeneration.from_pretrained(models["gemma3"]), LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default") for n, _ in pm.named_modules() if n.endswith(".lora_A.default")}
    # but the out_proj of an nn.MultiheadAttention (SigLIP's pooling head), whose weight MHA reads without calling
    # the layer: a LoRA there never runs, so surgeon leaves it dense (surgeon.model.targets.read_directly)
    direct = {"model.vision_tower.head.attention.out_proj"}
    assert ours == theirs - direct and direct <= theirs and "lm_head" not in ours


@pytest.mark.parametrize("target, word", [(["embed_tokens"], "embedding"), (["input_layernorm"], "not a linear layer"),
                                          (["gate"], "not a linear layer"), (["model.layers.0.block_sparse_moe.gate"], "no linear weight")])
def test_an_explicit_target_that_is_not_a_linear_layer_is_one_usage_line(models, tmp_path, target, word):
    with pytest.raises(UsageError, match=word) as e:
        split(str(models["mixtral"]), tmp_path / "o", SplitOptions(rank=2, target=target))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_the_router_stays_dense_under_all_linear_and_is_listed(models, tmp_path):
    """An 8-expert Mixtral's router is 8 x hidden: --rank 8 refused the whole split before."""
    m = split(str(models["mixtral"]), tmp_path / "o", SplitOptions(rank=8))
    assert m["summary"]["layers"] > 0
    assert not any(k.endswith("mlp.gate") for k in m["layers"])
    assert sorted(m["dense"]) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


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


def test_fused_layout_is_peft_s_and_round_trips():
    """assemble/piece against PEFT's own reading of a ParamWrapper pair: ΔW_e = B_e,p A_e,p in block p."""
    from surgeon.model.moe import assemble, piece

    g = torch.Generator().manual_seed(0)
    experts, parts, r, out_f, in_f = 3, 2, 2, 5, 4
    pieces = {(e, p): {"lora_A": torch.randn(r, in_f, generator=g), "lora_B": torch.randn(out_f, r, generator=g)}
              for e in range(experts) for p in range(parts)}
    fused = assemble(pieces, experts, parts)
    a = fused["lora_A"].reshape(experts, -1, in_f)  # as peft's ParamWrapper.get_delta_weight reshapes them
    b = fused["lora_B"].reshape(parts * out_f, -1, experts)
    delta = torch.einsum("o r e, e r i -> e o i", b, a)
    for (e, p), f in pieces.items():
        assert torch.allclose(delta[e, p * out_f:(p + 1) * out_f], f["lora_B"] @ f["lora_A"], atol=1e-6)
        back = piece(fused, e, p, parts, experts)
        assert torch.equal(back["lora_A"], f["lora_A"]) and torch.equal(back["lora_B"], f["lora_B"])


@pytest.mark.parametrize("method", ["milora", "pissa"])
def test_mixtral_experts_are_split_and_load_on_every_path(models, tmp_path, method):
    """Every expert matrix split, written onto the fused parameters as PEFT's target_parameters; the
    default --rank 64 is not refused for the 8-expert router (it stays dense)."""
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    from surgeon.commands.absorb import absorb
    from surgeon.runtime import load_split

    out = tmp_path / "m"
    m = split(str(models["mixtral"]), out, SplitOptions(method=method, rank=4))
    assert sum("fused" in lay for lay in m["layers"].values()) == 2 * 8 * 3  # layers x experts x (w1, w2, w3)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["target_parameters"] == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj",
                                         "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    ref = _logits(MixtralForCausalLM.from_pretrained(models["mixtral"], dtype=torch.float32))
    tol = 1e-5 * ref.abs().max()
    with warnings.catch_warnings(record=True) as caught:  # README's line: no PEFT warning (a rank_pattern for params only warned)
        warnings.simplefilter("always")
        loaded = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not [str(w.message) for w in caught if "peft" in w.filename]
    assert (_logits(loaded) - ref).abs().max() < tol
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=lambda d, names: [n for n in names if n.startswith("adapter_")])
    assert (_logits(PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(bare, dtype=torch.float32), out)) - ref).abs().max() < tol
    assert (_logits(load_split(out).model) - ref).abs().max() < tol
    absorb(out, tmp_path / "merged")
    src, got = load_file(models["mixtral"] / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src)


def test_the_default_rank_splits_an_8_expert_mixtral(models, tmp_path):
    import transformers as T

    wide = tmp_path / "wide"
    torch.manual_seed(0)
    T.MixtralForCausalLM(T.MixtralConfig(**{**SMALL, "hidden_size": 96, "intermediate_size": 128, "head_dim": 24},
                                         num_local_experts=8)).save_pretrained(wide)
    m = split(str(wide), tmp_path / "o", SplitOptions())  # --rank 64; the router is 8 x 96
    assert m["rank"] == 64 and m["summary"]["layers"] > 0


def test_deepseek_dense_mlps_are_not_taken_for_experts(models, tmp_path):
    """PEFT's MoE conversion moves every gate_proj/up_proj/down_proj target onto the fused experts: the dense
    first layer and the shared expert lost their factors on load (Δ 7.6e-3). They go through target_parameters."""
    from transformers import DeepseekV3ForCausalLM

    out = tmp_path / "d"
    split(str(models["deepseek"]), out, SplitOptions(method="pissa", rank=4))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.gate_proj.weight" in conf["target_parameters"]
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in conf["target_parameters"]
    assert not {"gate_proj", "up_proj", "down_proj"} & {m.rsplit(".", 1)[-1] for m in conf["target_modules"]}
    ref = _logits(DeepseekV3ForCausalLM.from_pretrained(models["deepseek"], dtype=torch.float32))
    got = _logits(DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


def test_fused_factor_files_are_checked_against_the_manifest(models, tmp_path):
    """A MoE split's trainable file holds the fused factors (PEFT's layout), its untrained file each expert's
    own: both are checked against surgeon.json, and a factor file from a split of another rank is refused."""
    from surgeon.errors import SplitDirError
    from surgeon.methods.folder import SplitDir

    a, b = tmp_path / "r4", tmp_path / "r2"
    split(str(models["mixtral"]), a, SplitOptions(method="milora", rank=4))
    split(str(models["mixtral"]), b, SplitOptions(method="milora", rank=2))
    sd = SplitDir(a)  # both files match the manifest
    fused = {k: v for k, v in sd.expected_factors(trainable=True).items() if ".experts" in k}
    assert fused and all(v[0] % 8 == 0 for k, v in fused.items() if k.endswith("lora_A.weight"))  # (E·R, in)
    shutil.copy(b / "adapter_model.safetensors", a / "adapter_model.safetensors")
    with pytest.raises(SplitDirError, match="does not belong to this split"):
        SplitDir(a)


@pytest.mark.parametrize("target", [[], ["--target", "q_proj"]])
@pytest.mark.parametrize("shape", ["1-D", "3-D"])
def test_a_linear_weight_stored_as_no_matrix_is_named(tiny, tmp_path, target, shape):
    """Issue 27, finding 11: a 1-D or 3-D tensor named like a target is refused in one line, never skipped."""
    from cliutil import one_error_line, run

    m = tmp_path / "m"
    shutil.copytree(tiny["tiny-llama"], m)
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = next(f for f in m.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name] = tensors[name].flatten() if shape == "1-D" else tensors[name][None]
    save_file(tensors, shard, metadata={"format": "pt"})
    r = run("split", m, "--rank", "2", *target, "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and f"{name} is stored as a {shape} tensor" in one_error_line(r)
    assert not (tmp_path / "o").exists()
