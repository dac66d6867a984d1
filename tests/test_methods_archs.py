"""The methods that are not plain LoRA (KaSA, NuSA, the mixture) on every family of architecture
(tests/archmodels.py): the split loads into surgeon's runtime with the inputs the model needs (images
included), an untrained NuSA or mixture reproduces the original exactly, a trained KaSA or NuSA runtime
agrees with its absorbed checkpoint and with vanilla PEFT on its exported LoRA, and the mixture routes only in the blocks the prompt runs through
(a multimodal model's text decoder, at its width), refusing encoder-decoders before any work.

    python -m pytest -q tests/test_methods_archs.py
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from archmodels import ARCHS, Zoo, forward
from cliutil import one_error_line, run
from peft import PeftModel

from surgeon.commands.absorb import AbsorbOptions, absorb, export_lora
from surgeon.commands.export.kasa import export_kasa
from surgeon.commands.split import SplitOptions, split
from surgeon.errors import UsageError
from surgeon.methods.folder import SplitDir
from surgeon.runtime import load_residual_model, load_split

FAMILIES = ["gpt2", "bert", "t5", "whisper", "mixtral", "deepseek_v3", "gemma3", "llava", "qwen2_vl", "gemma3-hub"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _auto(name):
    return getattr(transformers, ARCHS[name].auto)


def _split(zoo, tmp_path, name, method, **kw):
    out = tmp_path / f"{name}-{method}"
    split(str(zoo.path(name)), out, SplitOptions(method=method, rank=2, dtype="float32", **kw))
    return out


def _runtime(path, name, trainable=False):
    return load_split(path, dtype=torch.float32, trainable=trainable, model_cls=_auto(name))


def _trained(path, name, tmp_path, seed=0):
    """The split with every trainable factor moved (as training would), saved as a split folder."""
    sm = _runtime(path, name, trainable=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sm.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return sm, sm.save(tmp_path / f"{path.name}-trained")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["kasa", "nusa"])
def test_a_trained_split_runs_on_every_family_and_agrees_with_its_absorbed_checkpoint_and_peft_export(zoo, tmp_path, name, method):
    """runtime = absorbed checkpoint = vanilla PEFT on the exported LoRA (KaSA's on the split's truncated
    residual, its base_model; NuSA's on the original); the exported adapter names the model's task type."""
    arch = ARCHS[name]
    split_dir = _split(zoo, tmp_path, name, method)
    sm, trained = _trained(split_dir, name, tmp_path)
    got = forward(sm.model, arch, sm.model.config)
    absorb(trained, tmp_path / "merged")
    merged = _auto(name).from_pretrained(tmp_path / "merged", dtype=torch.float32)
    want = forward(merged, arch, merged.config)
    orig = _auto(name).from_pretrained(zoo.path(name), dtype=torch.float32)
    before = forward(orig, arch, orig.config)
    tol = 2e-5 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol, name
    assert float((got - before).abs().max()) > 1e-3  # the factors act
    export_lora(trained, tmp_path / "lora")
    base = load_residual_model(split_dir, torch.float32, _auto(name)) if method == "kasa" else orig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, tmp_path / "lora")
    assert float((forward(pm, arch, pm.config) - got).abs().max()) <= tol, name


@pytest.mark.parametrize("name", ["gpt2", "bert", "mixtral", "gemma3", "llava", "qwen2_vl", "gemma3-hub"])
def test_an_untrained_nusa_or_mixture_is_the_original_exactly(zoo, tmp_path, name):
    arch = ARCHS[name]
    orig = _auto(name).from_pretrained(zoo.path(name), dtype=torch.float32)
    want = forward(orig, arch, orig.config)
    for method in ("nusa", "moe"):
        sm = _runtime(_split(zoo, tmp_path, name, method), name)
        assert torch.equal(forward(sm.model, arch, sm.model.config), want), method


@pytest.mark.parametrize("name", ["gemma3", "llava", "qwen2_vl", "gemma3-hub"])
def test_the_mixture_routes_in_the_text_decoder_of_a_multimodal_model(zoo, tmp_path, name):
    arch = ARCHS[name]
    path = _split(zoo, tmp_path, name, "moe")
    blocks = SplitDir(path).manifest["blocks"]
    conf = _auto(name).from_pretrained(zoo.path(name)).config
    assert blocks and all(b.startswith("model.language_model.layers.") for b in blocks)  # none in the vision tower
    assert {info["hidden"] for info in blocks.values()} == {conf.text_config.hidden_size}
    sm, _ = _trained(path, name, tmp_path)  # experts and routers given weight: every block routes the prompt, images included
    out = forward(sm.model, arch, sm.model.config)
    assert torch.isfinite(out).all()
    assert all(r.gates is not None for r in sm.blocks.values())


def test_the_mixture_refuses_an_encoder_decoder_and_a_vision_target_in_one_line(zoo, tmp_path):
    for name in ("t5", "whisper"):
        with pytest.raises(UsageError, match="encoder-decoder"):
            _split(zoo, tmp_path, name, "moe")
        assert not (tmp_path / f"{name}-moe").exists()
    out = one_error_line(run("split", zoo.path("llava"), "--method", "moe", "--rank", "2", "--target", "q_proj", "--out", tmp_path / "o"))
    assert "vision_tower" in out and "leave it out of --target" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,method", [("t5", "milora"), ("whisper", "kasa"), ("bert", "nusa")])
def test_train_refuses_a_model_the_next_token_loss_cannot_train_before_reading_anything(zoo, tmp_path, name, method):
    """An encoder-decoder or an encoder used to crash mid-run (T5: a traceback from its forward; BERT: asked
    for --loss full, then crashed on the missing logits); now one line, exit 2, before data or output."""
    split_dir = _split(zoo, tmp_path, name, method)
    res = run("train", split_dir, "--data", tmp_path / "absent.jsonl", "--out", tmp_path / "trained", "--steps", "1")
    out = one_error_line(res)
    assert res.exit_code == 2 and "causal language models" in out and "load_split" in out
    assert ("encoder-decoder" in out) == (name != "bert")
    assert not (tmp_path / "trained").exists()


@pytest.mark.parametrize("name", ["t5", "bert"])
def test_check_refuses_a_model_without_next_token_predictions_in_one_line(zoo, tmp_path, name):
    """check compares next-token predictions: an encoder-decoder or an encoder has none of its own
    forward (it used to end in "this is a surgeon bug" from the block runner, or a traceback before)."""
    res = run("check", _split(zoo, tmp_path, name, "milora"), "--tokens", "16")
    out = one_error_line(res)
    assert res.exit_code == 2 and "next-token predictions" in out and "load_split" in out


@pytest.mark.parametrize("name", ["llama", "bert", "whisper", "gemma3"])
def test_export_to_peft_kasa_loads_on_the_original_with_the_models_task_type(zoo, tmp_path, name):
    """PEFT's own KaSA on the original model (it truncates in float32 itself) equals the trained runtime up
    to that float32 SVD; BERT and Whisper used to get CAUSAL_LM and fail in PeftModel.from_pretrained."""
    arch = ARCHS[name]
    sm, trained = _trained(_split(zoo, tmp_path, name, "kasa"), name, tmp_path)
    got = forward(sm.model, arch, sm.model.config)
    export_kasa(trained, tmp_path / "peft-kasa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(_auto(name).from_pretrained(zoo.path(name), dtype=torch.float32), tmp_path / "peft-kasa")
    assert float((forward(pm, arch, pm.config) - got).abs().max()) <= 1e-5 * float(got.abs().max()) * 10


def test_export_to_peft_kasa_refuses_what_peft_would_move_onto_the_experts(zoo, tmp_path):
    """DeepSeek-V3's dense down_proj: PEFT's MoE conversion moves the name onto the fused experts, where
    its KaSA does not run; the export used to exit 0 with an adapter PEFT then refused to load."""
    split_dir = _split(zoo, tmp_path, "deepseek_v3", "kasa")
    out = one_error_line(run("export", split_dir, "--to", "kasa", "--out", tmp_path / "k"))
    assert "--to lora" in out and "down_proj" in out
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("name", ["bert", "deepseek_v3", "gemma3"])
def test_the_trained_mixture_with_fixed_gates_equals_its_absorbed_checkpoint(zoo, tmp_path, name):
    arch = ARCHS[name]
    _, trained = _trained(_split(zoo, tmp_path, name, "moe"), name, tmp_path)
    sm = _runtime(trained, name)
    g = torch.Generator().manual_seed(1)
    gates = {b: torch.rand(r.n_experts, generator=g).tolist() for b, r in sm.blocks.items()}
    (tmp_path / "gates.json").write_text(json.dumps(gates))
    sm.model.surgeon_routing.fix(gates)
    got = forward(sm.model, arch, sm.model.config)
    absorb(trained, tmp_path / "merged", AbsorbOptions(fixed_gates=tmp_path / "gates.json"))
    merged = _auto(name).from_pretrained(tmp_path / "merged", dtype=torch.float32)
    want = forward(merged, arch, merged.config)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gemma3", "llava", "qwen2_vl"])
def test_a_4bit_split_loads_on_every_family_and_equals_its_merge_into_the_dequantized_residual(zoo, tmp_path, name):
    """surgeon's own 4-bit loader used to read the residual by checkpoint name: Mixtral's per-expert weights,
    Gemma 3's and Llava's legacy prefixes and Qwen2-VL's vision weights went missing ("the split is
    incomplete"), and SigLIP's pooling head (nn.MultiheadAttention reads out_proj.weight itself) met the
    codes. The runtime now equals the dense model absorbed into the dequantized residual."""
    pytest.importorskip("bitsandbytes")
    arch = ARCHS[name]
    path = tmp_path / "q"
    split(str(zoo.path(name)), path, SplitOptions(method="pissa", rank=4, quantize="nf4", dtype="float32"))
    sm = _runtime(path, name)
    got = forward(sm.model, arch, sm.model.config)
    absorb(path, tmp_path / "merged", AbsorbOptions(base="residual"))
    merged = _auto(name).from_pretrained(tmp_path / "merged", dtype=torch.float32)
    want = forward(merged, arch, merged.config)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_calibrate_cuts_samples_to_a_short_context_and_the_split_stays_exact(zoo, tmp_path):
    """GPT-2's context is config.json's n_positions (64 here): the built-in calibration samples (cut to 512
    tokens) ran past its position table ("IndexError: index out of range") before the first block."""
    from surgeon.model.skeleton import context_length

    assert context_length({"n_positions": 64}) == 64 and context_length({"text_config": {"max_position_embeddings": 9}}) == 9
    assert context_length({}) is None
    arch = ARCHS["gpt2"]
    split(str(zoo.path("gpt2")), tmp_path / "c", SplitOptions(method="milora", rank=2, dtype="float32", calibrate="default", calibrate_tokens=256))
    sm = _runtime(tmp_path / "c", "gpt2")
    orig = _auto("gpt2").from_pretrained(zoo.path("gpt2"), dtype=torch.float32)
    want = forward(orig, arch, orig.config)
    assert float((forward(sm.model, arch, sm.model.config) - want).abs().max()) <= 2e-5 * float(want.abs().max())
    assert SplitDir(tmp_path / "c").manifest["calibration"]["tokens"] > 64  # several samples, each within the context
