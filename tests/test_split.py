"""split → PEFT load → absorb → export, for every LoRA-shaped method on every fixture architecture."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgeon.commands.absorb import AbsorbOptions, absorb, export_lora
from surgeon.commands.split import SplitOptions, split
from surgeon.format import Checkpoint
from surgeon.methods import names

LORA_METHODS = ["milora", "pissa"]
ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def splits(tiny, tmp_path_factory):
    """Every (method, arch) split once, float32 residual so PEFT reproduces the logits tightly."""
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for method in LORA_METHODS:
        for arch in ARCHS:
            d = root / f"{method}-{arch}"
            split(str(tiny[arch]), d, SplitOptions(method=method, rank=4, alpha=8, dtype="float32", shard_size="100KB"))
            out[method, arch] = d
    return out


def test_registry_has_the_lora_methods():
    assert set(LORA_METHODS) <= set(names())


@pytest.mark.parametrize("method", LORA_METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_reconstruction_and_copy_through(splits, tiny, method, arch):
    d = splits[method, arch]
    m = json.loads((d / "surgeon.json").read_text())
    assert m["method"] == method and m["rank"] == 4 and m["scale"] == 2.0
    assert m["summary"]["worst_reconstruction_error"] < 1e-6
    src = tensors_of(tiny[arch])
    res = tensors_of(d)
    assert set(res) == set(src)  # tensor names unchanged
    with safe_open(d / "adapter_model.safetensors", "pt") as f:
        for module, lay in m["layers"].items():
            w = src[f"{module}.weight"].double()
            w = w.T if lay["transposed"] else w  # (out, in)
            a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").double()  # (r, in)
            b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").double()  # (out, r)
            r = res[f"{module}.weight"].double()
            r = r.T if lay["transposed"] else r
            err = torch.linalg.matrix_norm(w - (r + m["scale"] * b @ a)) / torch.linalg.matrix_norm(w)
            assert float(err) == pytest.approx(lay["reconstruction_error"], rel=1e-3, abs=1e-12)
            assert float(err) < 1e-6
            # the factors hold exactly the wanted singular triplets
            s = torch.linalg.svdvals(w)
            want = s[-4:] if method == "milora" else s[:4]
            got = torch.linalg.svdvals(m["scale"] * b @ a)[:4]
            assert torch.allclose(got, want, rtol=1e-5)
    for name, t in src.items():  # untargeted tensors come through untouched (dtype cast aside)
        if name.removesuffix(".weight") not in m["layers"]:
            assert torch.equal(res[name], t.float())


def test_conv1d_layers_are_transposed_and_marked_for_peft(splits):
    d = splits["milora", "tiny-gpt2"]
    m = json.loads((d / "surgeon.json").read_text())
    assert m["transposed"] and all(lay["transposed"] for lay in m["layers"].values())
    assert json.loads((d / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert set(m["target_modules"]) == {"c_attn", "c_proj", "c_fc"}


def test_all_linear_never_targets_embeddings_norms_or_head(splits):
    m = json.loads((splits["pissa", "tiny-llama"] / "surgeon.json").read_text())
    assert len(m["layers"]) == 2 * 7
    assert not any(("embed" in k or "lm_head" in k or "norm" in k) for k in m["layers"])


@pytest.mark.parametrize("method", LORA_METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_vanilla_peft_reproduces_the_original_logits(splits, tiny, method, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = splits[method, arch]
    ref = logits(tiny[arch], IDS)
    # exactly the user's line: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out)
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), d), IDS)
    assert torch.allclose(got, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("method", LORA_METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_absorb_untrained_gives_back_the_original_bit_for_bit(splits, tiny, tmp_path, method, arch):
    d = splits[method, arch]
    m = absorb(d, tmp_path / "merged", AbsorbOptions())
    assert m["base"] == "original" and m["layers_changed"] == 0
    src, out = tensors_of(tiny[arch]), tensors_of(tmp_path / "merged")
    assert set(src) == set(out)
    for k in src:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads((tiny[arch] / "config.json").read_text())


def _train(d: Path, dest: Path, seed: int = 0) -> Path:
    """Stand-in for training: copy the split and perturb every factor."""
    import shutil

    shutil.copytree(d, dest)
    g = torch.Generator().manual_seed(seed)
    f = load_file(dest / "adapter_model.safetensors")
    f = {k: v + 0.05 * torch.randn(v.shape, generator=g) * v.abs().mean() for k, v in f.items()}
    save_file(f, dest / "adapter_model.safetensors")
    return dest


@pytest.mark.parametrize("arch", ARCHS)
def test_absorb_after_training_matches_peft_merge_and_unload(splits, tmp_path, arch):
    from peft import PeftModel

    from surgeon.runtime import load_residual_model

    trained = _train(splits["milora", arch], tmp_path / "trained")
    absorb(trained, tmp_path / "merged", AbsorbOptions())  # original + s(B'A' − B₀A₀)
    absorb(trained, tmp_path / "merged-res", AbsorbOptions(base="residual"))  # residual + s·B'A'
    peft_merged = PeftModel.from_pretrained(load_residual_model(trained), trained).merge_and_unload()
    sd = peft_merged.state_dict()
    for merged in ("merged", "merged-res"):
        ours = tensors_of(tmp_path / merged)
        for k, v in ours.items():
            if k in sd:  # merged into a bf16 original: equal up to one bf16 rounding
                tol = 2**-8 if v.dtype == torch.bfloat16 else 1e-5
                assert torch.allclose(v.float(), sd[k].float(), atol=tol * 0.1, rtol=tol), (merged, k)
    ours, theirs = logits(tmp_path / "merged", IDS), logits(peft_merged, IDS)
    bf16 = arch == "tiny-qwen2"  # a bf16 checkpoint merges into bf16 weights
    assert torch.allclose(ours, theirs, atol=(1e-2 if bf16 else 1e-5) * float(theirs.abs().max()))


@pytest.mark.parametrize("method", LORA_METHODS)
def test_export_lora_on_the_original_base_matches_the_trained_split(splits, tiny, tmp_path, method):
    from peft import PeftModel

    from surgeon.runtime import load_residual_model

    trained = _train(splits[method, "tiny-llama"], tmp_path / "trained")
    conf = export_lora(trained, tmp_path / "lora")
    assert conf["r"] == 8 and conf["lora_alpha"] == 16  # rank 2r, scale kept
    on_original = logits(tiny["tiny-llama"], IDS, adapter=tmp_path / "lora")
    on_residual = logits(PeftModel.from_pretrained(load_residual_model(trained), trained), IDS)
    assert torch.allclose(on_original, on_residual, atol=1e-4)


def test_bf16_source_keeps_its_dtype_and_peft_is_within_bf16_rounding(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = tmp_path / "bf16"
    m = split(str(tiny["tiny-qwen2"]), d, SplitOptions(rank=4))
    assert all(t.dtype == "BF16" for t in Checkpoint.open(sorted(d.glob("model*.safetensors"))).tensors.values())
    assert 1e-4 < m["summary"]["worst_reconstruction_error"] < 1e-2  # bf16 rounding of the residual
    ref = logits(AutoModelForCausalLM.from_pretrained(tiny["tiny-qwen2"], dtype=torch.float32), IDS)
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), d), IDS)
    assert float((got - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_dtype_option_converts_base_and_config(tiny, tmp_path):
    d = tmp_path / "bf"
    split(str(tiny["tiny-llama"]), d, SplitOptions(rank=4, dtype="bfloat16"))
    conf = json.loads((d / "config.json").read_text())
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"
    assert {i.dtype for i in Checkpoint.open(sorted(d.glob("model*.safetensors"))).tensors.values()} == {"BF16"}
    with safe_open(d / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_input_is_never_modified(tiny, tmp_path):
    before = tree_hash(tiny["tiny-llama"])
    split(str(tiny["tiny-llama"]), tmp_path / "o", SplitOptions(rank=4))
    absorb(tmp_path / "o", tmp_path / "a")
    assert tree_hash(tiny["tiny-llama"]) == before


def test_target_names_and_regex(tiny, tmp_path):
    m = split(str(tiny["tiny-llama"]), tmp_path / "n", SplitOptions(rank=4, target=["q_proj", "v_proj"]))
    assert sorted({k.rsplit(".", 1)[1] for k in m["layers"]}) == ["q_proj", "v_proj"]
    assert m["target_modules"] == ["q_proj", "v_proj"]
    m = split(str(tiny["tiny-llama"]), tmp_path / "r", SplitOptions(rank=4, target=[r"model\.layers\.0\..*proj"]))
    assert len(m["layers"]) == 7 and all(".layers.0." in k for k in m["layers"])
    assert sorted(m["target_modules"]) == sorted(m["layers"])  # full names: suffixes would match layer 1 too
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "r", dtype=torch.float32), tmp_path / "r"), IDS)
    assert torch.allclose(got, logits(tiny["tiny-llama"], IDS), atol=1e-4)


def test_single_file_with_config(tiny, tmp_path):
    f = tiny["tiny-qwen2"] / "model.safetensors"
    m = split(str(f), tmp_path / "o", SplitOptions(rank=2, config=tiny["tiny-qwen2"] / "config.json"))
    assert m["summary"]["layers"] == 14
    assert (tmp_path / "o" / "config.json").exists() and (tmp_path / "o" / "tokenizer.json").exists()


def test_all_linear_skips_embeddings_inside_blocks():
    """T5 keeps an Embedding (relative_attention_bias) inside its blocks; PEFT's all-linear skips it."""
    from pathlib import Path

    from surgeon.format.reader import TensorInfo
    from surgeon.model.selection import select_targets

    names = {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8),
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 8),
             "encoder.block.0.layer.1.DenseReluDense.wi.weight": (16, 8)}
    t = {n: TensorInfo(n, "F32", s, Path("x"), 0, 4) for n, s in names.items()}
    assert sorted(select_targets(t, None, "t5")) == sorted(n for n in names if "relative" not in n)


def test_spectra_are_opt_in_and_computed_from_the_source_on_demand(tiny, tmp_path):
    import re

    from surgeon.commands.spectra import spectra
    from surgeon.format.splitdir import SPECTRA
    from surgeon.methods.folder import SplitDir

    kept = tmp_path / "kept"
    split(str(tiny["tiny-llama"]), kept, SplitOptions(rank=4, spectra=True))
    split(str(tiny["tiny-llama"]), tmp_path / "lean", SplitOptions(rank=4))  # the default stores none
    assert (kept / SPECTRA).exists() and not (tmp_path / "lean" / SPECTRA).exists()
    stored = dict(spectra(SplitDir(kept), re.compile(".*")))
    computed = dict(spectra(SplitDir(tmp_path / "lean"), re.compile(".*"), device="cpu"))
    assert stored.keys() == computed.keys() and len(stored) == 14
    for m, s in stored.items():
        assert torch.allclose(computed[m], s, rtol=1e-9, atol=1e-12 * float(s[0])), m
