"""KaSA (issue 4): truncation, untrained forward, regulariser, PEFT exports, absorb.

    PYTHONPATH=$PWD python -m pytest tests/test_kasa.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import logits
from safetensors import safe_open
from safetensors.torch import load_file

from surgeon.commands.absorb import AbsorbOptions, SplitDir, absorb, export_lora
from surgeon.commands.export.kasa import export_kasa
from surgeon.commands.split import INIT_FACTORS, SplitOptions, split
from surgeon.errors import UsageError
from surgeon.methods import MethodConfig, get_method
from surgeon.methods.kasa import KasaLinear, init_factors, kasa_regularizer, layer_seed
from surgeon.runtime import load_residual_model, load_split

R = 4
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]])


def _weights_stream(folder: Path):
    from surgeon.format.source import resolve

    ckpt = resolve(str(folder)).checkpoint()
    return ckpt.stream(list(ckpt.tensors))


def _train_like(split_dir: Path, out: Path, seed: int = 1) -> Path:
    """Stand-in for training: every factor moved to seeded random values, saved by the runtime."""
    sm = load_split(split_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in sm.modules.values():
            mod.lora_B.copy_(0.05 * torch.randn(mod.lora_B.shape, generator=g))
            mod.lora_A.add_(0.05 * torch.randn(mod.lora_A.shape, generator=g))
            mod.lora_diag.copy_(torch.randn(mod.lora_diag.shape, generator=g))
    return sm.save(out)


def _runtime_logits(split_dir: Path) -> torch.Tensor:
    sm = load_split(split_dir, trainable=False)
    return logits(sm.model, IDS)


def _runtime_logits_untrained(split_dir: Path) -> torch.Tensor:
    return logits(load_residual_model(split_dir), IDS)


@pytest.fixture(scope="module")
def llama_split(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kasa") / "llama-kasa"
    split(str(tiny["tiny-llama"]), out, SplitOptions(method="kasa", rank=R, seed=3))
    return out


@pytest.fixture(scope="module")
def llama_trained(llama_split, tmp_path_factory) -> Path:
    return _train_like(llama_split, tmp_path_factory.mktemp("kasa") / "llama-kasa-trained")


# --- truncation ------------------------------------------------------------------------------


def test_truncation_removes_exactly_the_r_smallest(tiny, llama_split):
    orig = {i.name: t for i, t in _weights_stream(tiny["tiny-llama"])}
    res = {i.name: t for i, t in _weights_stream(llama_split)}
    man = json.loads((llama_split / "surgeon.json").read_text())
    shapes = set()
    for module, lay in man["layers"].items():
        w = orig[f"{module}.weight"].double()  # (out, in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # float64 reference
        ref = w - (u[:, -R:] * s[-R:]) @ vh[-R:]  # (out, in)
        got = res[f"{module}.weight"].double()
        # the residual is stored in fp32: equal to the float64 reference up to that rounding
        assert float((got - ref).abs().max()) <= 5e-8 * float(s[0]), module
        # its spectrum is the original's without the r smallest values (those become ~0)
        s_res = torch.linalg.svdvals(got)
        torch.testing.assert_close(s_res[:-R], s[:-R], atol=1e-6 * float(s[0]), rtol=0)
        assert float(s_res[-R:].max()) < 1e-6 * float(s[0]) < float(s[-R])
        torch.testing.assert_close(torch.tensor(lay["truncated_sigma"], dtype=torch.float64), s[-R:], atol=1e-12, rtol=1e-9)
        shapes.add("tall" if w.shape[0] > w.shape[1] else "wide" if w.shape[0] < w.shape[1] else "square")
    assert shapes == {"tall", "wide", "square"}  # k = min(out, in) on every kind of shape


def test_split_math_float64_exact():
    """Method.split alone, no cast: W = W_world + minor part to float64 rounding."""
    from surgeon.linalg import decompose, get_backend

    g = torch.Generator().manual_seed(0)
    for shape in [(24, 40), (40, 24)]:
        w = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, shape[1], dtype=torch.float64))
        t = decompose(w, R, "minor", get_backend("cpu", "torch"), solver="svd")
        res = get_method("kasa").split(w, t, MethodConfig(R, float(R), module="m"))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        assert float((res.residual - (u[:, :-R] * s[:-R]) @ vh[:-R]).abs().max()) < 1e-13
        assert res.factors["lora_B"].abs().max() == 0  # B = 0: ΔW = 0 at the start
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform(a=√5) on (r, in)
        assert 0.5 * bound < float(res.factors["lora_A"].abs().max()) <= bound


def test_truncation_matches_peft(tiny, llama_split):
    """PEFT's own KaSA truncation (float32 SVD on the original weights) as the reference."""
    from peft import KasaConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    man = json.loads((llama_split / "surgeon.json").read_text())
    m = AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"], dtype=torch.float32)
    pm = get_peft_model(m, LoraConfig(r=R, lora_alpha=R, target_modules=man["target_modules"], kasa_config=KasaConfig()))
    res = {i.name: t for i, t in _weights_stream(llama_split)}
    for module in man["layers"]:
        peft_w = pm.base_model.model.get_submodule(module).base_layer.weight.detach()
        ours = res[f"{module}.weight"]
        scale = float(torch.linalg.matrix_norm(ours, ord=2))
        assert float((peft_w - ours).abs().max()) < 1e-6 * scale, module


# --- runtime ---------------------------------------------------------------------------------


def test_untrained_forward_equals_truncated_base(tiny, llama_split):
    base = logits(load_residual_model(llama_split), IDS)
    sm = load_split(llama_split)
    assert all(isinstance(m, KasaLinear) for m in sm.modules.values())
    assert torch.equal(logits(sm.model, IDS), base)  # B = 0 exactly
    # and the truncation did change the model (a little: the minor part holds little energy)
    orig = logits(tiny["tiny-llama"], IDS)
    assert 0 < float((orig - base).abs().max()) < 1e-2


def test_seeded_init_is_reproducible(tiny, llama_split, tmp_path):
    again = tmp_path / "again"
    split(str(tiny["tiny-llama"]), again, SplitOptions(method="kasa", rank=R, seed=3, target=["q_proj"]))
    other = tmp_path / "other"
    split(str(tiny["tiny-llama"]), other, SplitOptions(method="kasa", rank=R, seed=4, target=["q_proj"]))
    a, b, c = (load_file(str(p / "surgeon.factors.safetensors")) for p in (llama_split, again, other))
    keys = sorted(b)
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    assert not torch.equal(a[keys[0]], c[keys[0]]) and keys[0].endswith("lora_A")
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert not torch.equal(a[f"{q0}.lora_A"], a[f"{q1}.lora_A"])  # same shape, own per-layer seed
    ref = init_factors(64, 64, R, layer_seed(3, q0))
    assert torch.equal(a[f"{q0}.lora_A"], ref["lora_A"]) and torch.equal(a[f"{q0}.lora_diag"], ref["lora_diag"])
    assert torch.equal(load_file(str(llama_split / INIT_FACTORS))[f"{q0}.lora_A"], ref["lora_A"])


# --- regulariser -----------------------------------------------------------------------------


def test_regularizer_zero_for_orthonormal_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    q_in, _ = torch.linalg.qr(torch.randn(48, R, generator=g, dtype=torch.float64))  # (in, r)
    q_out, _ = torch.linalg.qr(torch.randn(40, R, generator=g, dtype=torch.float64))  # (out, r)
    a, b = q_in.mT.float(), q_out.float()  # A Aᵀ = I, BᵀB = I
    zero = torch.zeros(R)
    assert float(kasa_regularizer(a, b, zero, 1e-4, 1e-3)) < 1e-9
    d = torch.randn(R, generator=g)
    torch.testing.assert_close(kasa_regularizer(a, b, d, 1e-4, 1e-3), 1e-4 * d.square().sum(), rtol=1e-5, atol=1e-10)
    # B = 0 (the initial state): ‖−I‖_F = √r for B; A Kaiming-uniform is far from orthonormal
    a0 = init_factors(40, 48, R, 0)["lora_A"]
    val = float(kasa_regularizer(a0, torch.zeros(40, R), zero, 1e-4, 1e-3))
    ga = (a0.double() @ a0.double().mT) - torch.eye(R, dtype=torch.float64)
    assert val == pytest.approx(1e-3 * (math.sqrt(R) + float(torch.linalg.matrix_norm(ga))), rel=1e-5)
    assert float(kasa_regularizer(2 * a, b, zero, 1e-4, 1e-3)) == pytest.approx(1e-3 * 3 * math.sqrt(R), rel=1e-5)


def test_regularizer_gradient():
    """Autograd vs finite differences (float64 gradcheck) and vs the closed form."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(R, 9, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, R, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(R, generator=g, dtype=torch.float64, requires_grad=True)
    beta, gamma = 0.3, 0.7  # large, so every term shows in the gradient
    assert torch.autograd.gradcheck(lambda a, b, d: kasa_regularizer(a, b, d, beta, gamma, dtype=torch.float64), (a, b, d))
    # closed form: ∂‖AAᵀ−I‖/∂A = 2(AAᵀ−I)A/‖AAᵀ−I‖, ∂‖BᵀB−I‖/∂B = 2B(BᵀB−I)/‖BᵀB−I‖, ∂Σd²/∂d = 2d
    eye = torch.eye(R, dtype=torch.float64)
    with torch.no_grad():
        ea, eb = a @ a.mT - eye, b.mT @ b - eye
        ga = gamma * 2 * ea @ a / torch.linalg.matrix_norm(ea)
        gb = gamma * 2 * b @ eb / torch.linalg.matrix_norm(eb)
        gd = beta * 2 * d
    loss = kasa_regularizer(a.float(), b.float(), d.float(), beta, gamma)  # the training path: float32
    loss.backward()
    for got, want in ((a.grad, ga), (b.grad, gb), (d.grad, gd)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_extra_loss_matches_peft_kasa_loss(tiny, llama_trained):
    """SplitModel.extra_loss() == PEFT's _get_kasa_loss on the same factors (summed over layers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sm = load_split(llama_trained)
    loss = sm.extra_loss()
    assert loss.requires_grad and float(loss.detach()) > 0
    kasa_dir = llama_trained.parent / "peft-kasa-for-loss"
    export_kasa(llama_trained, kasa_dir, overwrite=True)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"], dtype=torch.float32), kasa_dir)
    torch.testing.assert_close(loss.detach(), pm.base_model._get_kasa_loss().detach(), rtol=1e-6, atol=0)
    # the trainer's step: task loss + extra loss reaches every factor
    out = sm.model(IDS, labels=IDS)
    (out.loss + loss).backward()
    mod = next(iter(sm.modules.values()))
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in (mod.lora_A, mod.lora_B, mod.lora_diag))
    assert all(p.grad is None for p in mod.base.parameters())


# --- exports and absorb ------------------------------------------------------------------------


def test_export_lora_on_truncated_base_loads_in_peft(llama_trained, tmp_path):
    conf = export_lora(llama_trained, tmp_path / "lora")
    assert conf["r"] == R and conf["base_model_name_or_path"] == str(llama_trained.resolve())
    want = _runtime_logits(llama_trained)
    got = logits(llama_trained, IDS, adapter=tmp_path / "lora")  # vanilla PEFT LoRA on the split folder
    assert float((want - _runtime_logits_untrained(llama_trained)).abs().max()) > 1e-2  # the factors do something
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_export_peft_kasa_on_original_base(tiny, llama_trained, tmp_path):
    conf = export_kasa(llama_trained, tmp_path / "kasa")
    assert conf["kasa_config"] == {"beta": 1e-4, "gamma": 1e-3}
    assert conf["base_model_name_or_path"] == str(tiny["tiny-llama"])
    with safe_open(tmp_path / "kasa" / "adapter_model.safetensors", "pt") as f:
        assert sum(k.endswith(".lora_diag") for k in f.keys()) == len(json.loads((llama_trained / "surgeon.json").read_text())["layers"])
    got = logits(tiny["tiny-llama"], IDS, adapter=tmp_path / "kasa")  # PEFT truncates the ORIGINAL itself
    want = _runtime_logits(llama_trained)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-6)


def test_absorb_default_equals_runtime_forward(llama_trained, tmp_path):
    m = absorb(llama_trained, tmp_path / "merged")
    assert m["base"] == "residual"  # KaSA: the truncated base even though the original is there
    torch.testing.assert_close(logits(tmp_path / "merged", IDS), _runtime_logits(llama_trained), rtol=0, atol=2e-6)


def test_absorb_original_readds_truncated_components(tiny, llama_split, llama_trained, tmp_path):
    m = absorb(llama_trained, tmp_path / "orig", AbsorbOptions(base="original"))
    assert m["base"] == "original"
    orig = {i.name: t for i, t in _weights_stream(tiny["tiny-llama"])}
    merged = {i.name: t for i, t in _weights_stream(tmp_path / "orig")}
    sd = SplitDir(llama_trained)
    with safe_open(sd.factors_file, "pt") as f:
        for module in sd.manifest["layers"]:
            want = orig[f"{module}.weight"].double() + sd.method.delta(sd.factors(f, module), sd.cfg)  # W + ΔW
            assert float((merged[f"{module}.weight"].double() - want).abs().max()) < 1e-6
    # untrained + original gives the source back bit for bit
    absorb(llama_split, tmp_path / "same", AbsorbOptions(base="original"))
    same = {i.name: t for i, t in _weights_stream(tmp_path / "same")}
    assert all(torch.equal(same[k], orig[k]) for k in orig)


# --- other architectures, CLI --------------------------------------------------------------------


def test_gpt2_conv1d(tiny, tmp_path):
    out = tmp_path / "gpt2"
    split(str(tiny["tiny-gpt2"]), out, SplitOptions(method="kasa", rank=R))
    assert torch.equal(_runtime_logits(out), logits(load_residual_model(out), IDS))
    trained = _train_like(out, tmp_path / "gpt2-t")
    export_lora(trained, tmp_path / "lora")
    want = _runtime_logits(trained)
    torch.testing.assert_close(logits(trained, IDS, adapter=tmp_path / "lora"), want, rtol=0, atol=2e-6)
    absorb(trained, tmp_path / "merged")
    torch.testing.assert_close(logits(tmp_path / "merged", IDS), want, rtol=0, atol=2e-6)
    with pytest.raises(UsageError, match="Conv1D"):
        export_kasa(trained, tmp_path / "kasa")


def test_qwen2_bf16_residual(tiny, tmp_path):
    out = tmp_path / "qwen2"
    split(str(tiny["tiny-qwen2"]), out, SplitOptions(method="kasa", rank=R, target=["q_proj", "v_proj"]))
    trained = _train_like(out, tmp_path / "qwen2-t")
    want = _runtime_logits(trained)
    absorb(trained, tmp_path / "merged")
    # the merged weights are bf16 like the residual: equal to the runtime up to that rounding
    assert float((logits(tmp_path / "merged", IDS) - want).abs().max()) < 2e-2 * float(want.abs().max())


def test_cli_split_seed_and_export(tiny, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli.commands import app

    run = CliRunner()
    r = run.invoke(app, ["split", "--method", "kasa", str(tiny["tiny-llama"]), "-r", "2", "--seed", "7", "--kasa-gamma", "0.01", "-t", "v_proj", "-o", str(tmp_path / "s"), "-q"])
    assert r.exit_code == 0, r.output
    sd = SplitDir(tmp_path / "s")
    assert (sd.cfg.seed, sd.cfg.kasa_gamma, sd.cfg.rank) == (7, 0.01, 2)
    assert load_split(tmp_path / "s").modules["model.layers.0.self_attn.v_proj"].gamma == 0.01
    r = run.invoke(app, ["export", str(tmp_path / "s"), "--to", "kasa", "-o", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k" / "adapter_config.json").read_text())["kasa_config"]["gamma"] == 0.01
    r = run.invoke(app, ["export", str(tmp_path / "s"), "--to", "gguf", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_kasa(smollm2, tmp_path):
    """SmolLM2-135M, layers 0-1 (all seven linear weights each), r = 8: truncation vs float64
    SVD, PEFT KaSA export on the original == surgeon runtime == absorb."""
    out = tmp_path / "smol"
    split(str(smollm2), out, SplitOptions(method="kasa", rank=8, target=[r"model\.layers\.[01]\..*"]))
    man = json.loads((out / "surgeon.json").read_text())
    assert len(man["layers"]) == 14
    orig = {i.name: t for i, t in _weights_stream(smollm2) if i.name.startswith("model.layers.0.")}
    res = {i.name: t for i, t in _weights_stream(out) if i.name.startswith("model.layers.0.")}
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        w = orig[name].double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        ref = w - (u[:, -8:] * s[-8:]) @ vh[-8:]  # (out, in)
        assert float((res[name].double() - ref).abs().max()) <= 5e-8 * float(s[0]), name
    trained = _train_like(out, tmp_path / "smol-t")
    ids = torch.tensor([[1, 504, 3451, 314, 253, 1345, 30, 2]])
    sm = load_split(trained, trainable=False)
    want = logits(sm.model, ids)
    del sm
    export_kasa(trained, tmp_path / "kasa")
    got = logits(smollm2, ids, adapter=tmp_path / "kasa")
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-4 * scale
    absorb(trained, tmp_path / "merged")
    assert float((logits(tmp_path / "merged", ids) - want).abs().max()) < 1e-4 * scale


def test_split_warns_where_the_truncation_removes_real_energy(tiny, tmp_path):
    from surgeon.commands.manifest import truncation_warnings
    from surgeon.methods import get_method

    layers = {"a.v_proj": {"factor_energy": 0.038}, "b.v_proj": {"factor_energy": 0.02}, "c.q_proj": {"factor_energy": 1e-5}}
    (w,) = truncation_warnings(get_method("kasa"), layers)
    assert "3.8% of the spectral energy of a.v_proj" in w and "2 of 3 layers" in w and "measure perplexity" in w
    assert truncation_warnings(get_method("milora"), layers) == []  # nothing is removed from W
    m = split(str(tiny["tiny-llama"]), tmp_path / "s", SplitOptions(method="kasa", rank=2))
    assert "warnings" not in m  # three decades: the 2 smallest components hold ~1e-6 of the energy


@pytest.mark.real_model
def test_smollm2_kasa_on_v_proj_warns(smollm2, tmp_path):
    """The case that broke the model in the CPU evaluation: r = 8 on SmolLM2's flat v_proj spectra."""
    m = split(str(smollm2), tmp_path / "s", SplitOptions(method="kasa", rank=8, target=["v_proj"], spectra=False))
    assert m["warnings"] and "v_proj" in m["warnings"][0] and "of 30 layers" in m["warnings"][0]
    worst = max(lay["factor_energy"] for lay in m["layers"].values())
    assert f"{100 * worst:.2g}%" in m["warnings"][0]
    m = split(str(smollm2), tmp_path / "q", SplitOptions(method="kasa", rank=8, target=["q_proj"], spectra=False))
    assert "warnings" not in m  # q_proj's 8 smallest hold ~3e-7 of its energy
