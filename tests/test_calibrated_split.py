"""`surgeon split --calibrate` on the real SmolLM2: PEFT's own CorDA, exactness, resume, KaSA's perplexity.

    python -m pytest -q tests/test_calibrated_split.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cliutil import one_error_line, run, tree_hashes
from safetensors.torch import load_file

import surgeon.engine.runner as split_runner
from surgeon.commands.split import SplitOptions, split
from surgeon.model.calibration import load_calibration_data
from test_exactness import _tensors, measured_errors

EVAL_TEXT = Path(__file__).resolve().parents[1] / "bench" / "eval" / "general_text.txt"
# a few targets in two blocks far apart (the collector runs every block up to the last one asked for)
FEW = r"model\.layers\.(0|3)\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
CALIB_TEXTS = [  # not the evaluation text: general statements, one record each
    "The river runs through the valley and reaches the sea after many miles of farmland and small towns.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them in the command module.",
    "A good recipe for bread needs flour, water, salt and yeast, and a few hours of patience.",
    "The heart pumps blood through arteries and veins, carrying oxygen to every cell of the body.",
    "Mountains are often formed when tectonic plates collide and push the crust upwards over millions of years.",
    "Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet, which are still performed today.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature high in the mountains.",
    "The library opens at nine in the morning and closes at six, except on Sundays when it is closed.",
    "Electric cars store energy in batteries and use motors instead of engines that burn fuel.",
    "Bees collect nectar from flowers and make honey, pollinating many of the crops that people eat.",
    "The Roman Empire built roads, aqueducts and cities across Europe, North Africa and the Middle East.",
]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in CALIB_TEXTS))
    return p


def _sin(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest sin of the principal angles between the column spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    c = torch.linalg.svdvals(qa.mT @ qb).clamp(max=1.0)
    return float((1 - c.min() ** 2).clamp_min(0).sqrt())


def _peft_corda(model_dir: Path, calib: Path, mode: str, cov_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PEFT 0.21's own CorDA: preprocess_corda over the same tokens, one record per forward, then
    LoraConfig(init_lora_weights="corda"). ({module.A / .B: its lora_A / lora_B}, {module: its covariance})."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM

    data = load_calibration_data(str(calib), model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    corda = CordaConfig(corda_method=mode, covariance_file=str(cov_file))
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=FEW, init_lora_weights="corda", corda_config=corda)
    preprocess_corda(model, cfg, run_model=lambda: [model(ids[None]) for ids in data.input_ids])
    peft_model = get_peft_model(model, cfg)
    out = {}
    for k, v in peft_model.state_dict().items():
        if ".lora_" in k:
            module = k.removeprefix("base_model.model.").split(".lora_")[0]
            out[f"{module}.{k.split('.lora_')[1].split('.')[0]}"] = v.detach().double()
    return out, {m: c.double() for m, c in torch.load(cov_file).items()}


def _peft_recipe_f64(w: torch.Tensor, c: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's collect_eigens_for_layer in float64 (its damping 0.01·mean(diag C) passes at once here):
    U (out, 8) and the rows V_WCᵀ = Vh (C + λI)⁻¹ (8, in) of the 8 chosen components."""
    fixed = c + 0.01 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    sel = slice(0, 8) if mode == "ipm" else slice(-8, None)
    return u[:, sel], torch.linalg.solve(fixed, vh[sel].mT).mT


@pytest.mark.parametrize("method,mode,limit,held,limit64", [("pissa", "ipm", 1e-3, "proj", 1e-5), ("milora", "kpm", 1e-2, "v_proj", 1e-3)])
def test_same_subspaces_as_peft_corda(smollm2, calib_file, tmp_path, method, mode, limit, held, limit64, one_thread):
    """Done-when of issue 24, on 6 layers (q, v, down of blocks 0 and 3), r = 8, PEFT's covariance
    settings (--calibrate-peft). Against PEFT's own CorDA: lora_B's column space within `limit` on
    the layers named by `held`. PEFT works in float32, which limits it in two places:
      * lora_A = Vᵀ C̃⁻¹ through a float32 inverse of a C̃ of condition ~1e4 (eps32·κ ≈ 3e-3), so
        PEFT's own A rows are compared within 1e-2 (ipm);
      * kpm: the minor singular vectors of W·C̃ from a float32 SVD are resolved only where the gap at
        r is above eps32·σ₁: q_proj (gap 7e-9·σ₁) and down_proj (3e-7·σ₁, 9e-7·σ₁) are not (PEFT's
        own result is off by 0.03 to 0.99 from the exact one there); v_proj (1e-6·σ₁, 7e-6·σ₁) is.
    On EVERY layer both factors are compared with PEFT's recipe run in float64 on PEFT's own
    covariance (its damping, its SVD, its V C̃⁻¹) within `limit64`: any gap to PEFT is PEFT's rounding.
    (kpm: 1e-3, as PEFT's covariance, accumulated in float32, differs from ours by ~1e-7 relative,
    which moves a minor subspace with a gap of 1e-8·σ₁ by ~1e-4.)"""
    out = tmp_path / "split"
    m = split(str(smollm2), out, SplitOptions(method=method, rank=8, target=[FEW], calibrate=str(calib_file),
                                              calibrate_mode=mode, calibrate_peft=True))
    assert m["calibration"]["mode"] == mode and m["calibration"]["peft_settings"] is True
    ours, weights = load_file(out / "adapter_model.safetensors"), load_file(smollm2 / "model.safetensors")
    ref, covs = _peft_corda(smollm2, calib_file, mode, tmp_path / "cov.pt")
    assert len(m["layers"]) == 6
    sin_b, sin_a, sin64 = {}, {}, {}
    for module in m["layers"]:
        b, a = ours[f"base_model.model.{module}.lora_B.weight"], ours[f"base_model.model.{module}.lora_A.weight"]
        u64, vh64 = _peft_recipe_f64(weights[f"{module}.weight"].double(), covs[module], mode)
        sin64[module] = max(_sin(b, u64), _sin(a.mT, vh64.mT))
        if held in module:
            sin_b[module] = _sin(b, ref[f"{module}.B"])
            sin_a[module] = _sin(a.mT, ref[f"{module}.A"].mT)
    assert sin_b and max(sin_b.values()) <= limit, sin_b
    assert max(sin_a.values()) <= 1e-2, sin_a
    assert max(sin64.values()) <= limit64, sin64
    print(f"{mode}: max sin vs PEFT B {max(sin_b.values()):.1e} A {max(sin_a.values()):.1e} ({len(sin_b)} layers); vs PEFT's recipe in float64 {max(sin64.values()):.1e} (6 layers)")


@pytest.mark.parametrize("method", ["milora", "pissa", "kasa", "nusa"])
def test_calibrated_split_is_exact_and_absorbs_bit_exact(smollm2, calib_file, tmp_path, method, one_thread):
    out = tmp_path / "split"
    m = split(str(smollm2), out, SplitOptions(method=method, rank=8, target=[FEW], calibrate=str(calib_file)))
    got = measured_errors(smollm2, out)  # ‖W − (W_res + delta(initial factors))‖/‖W‖ from the files
    for module, lay in m["layers"].items():
        cal = lay["calibration"]
        assert cal["mode"] == ("ipm" if method == "pissa" else "kpm") and 0 <= cal["output_share"] <= 1
        if method == "kasa":  # the truncation is what it removes; its own target is exact
            assert lay["target_error"] < 1e-6
        else:
            assert got[module] < 1e-6 and lay["reconstruction_error"] == pytest.approx(got[module], rel=1e-6, abs=1e-12)
    base = ["--base", "original"] if method == "kasa" else []  # KaSA's default absorb keeps its truncation
    res = run("absorb", out, "--out", tmp_path / "merged", "--quiet", *base)
    assert res.exit_code == 0, res.output
    want, merged = _tensors(smollm2, "model*.safetensors"), _tensors(tmp_path / "merged", "model*.safetensors")
    differ = [k for k in want if not torch.equal(merged[k].view(torch.uint8), want[k].view(torch.uint8))]
    assert not differ, differ[:4]


def test_kill_and_resume_gives_the_same_bytes(smollm2, calib_file, tmp_path, monkeypatch, one_thread):
    opts = dict(method="kasa", rank=8, target=[FEW], calibrate=str(calib_file), workers=1, commit_seconds=0)
    clean = tmp_path / "clean"
    split(str(smollm2), clean, SplitOptions(**opts))
    real, calls = split_runner.split_one, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(split_runner, "split_one", flaky)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        split(str(smollm2), out, SplitOptions(**opts))
    monkeypatch.setattr(split_runner, "split_one", real)
    m = split(str(smollm2), out, SplitOptions(**opts))
    assert m["run"]["resumed_tensors"] >= 3
    skip = frozenset({"surgeon.run.json"})
    assert tree_hashes(out, skip) == tree_hashes(clean, skip)


def _perplexity(model_dir: Path, n_tokens: int = 1024, window: int = 256) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(EVAL_TEXT.read_text(), return_tensors="pt").input_ids[0][:n_tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.numel() - 1, window):
            chunk = ids[i : i + window + 1][None]
            out = model(chunk[:, :-1], labels=chunk[:, :-1].clone())
            nll += float(out.loss) * (chunk.shape[1] - 2)
            count += chunk.shape[1] - 2
    return math.exp(nll / count)


def test_kasa_calibrated_truncation_keeps_the_perplexity(smollm2, calib_file, tmp_path, one_thread):
    """KaSA r = 8 on every v_proj (the layers where the plain truncation breaks SmolLM2, bench/eval_methods.md):
    calibrated (kpm), the untrained split's perplexity on held-out text stays within 10 %; plain, it does not."""
    plain, cal = tmp_path / "plain", tmp_path / "cal"
    split(str(smollm2), plain, SplitOptions(method="kasa", rank=8, target=["v_proj"]))
    m = split(str(smollm2), cal, SplitOptions(method="kasa", rank=8, target=["v_proj"], calibrate=str(calib_file)))
    base, p_plain, p_cal = _perplexity(smollm2), _perplexity(plain), _perplexity(cal)
    print(f"perplexity: original {base:.2f}, kasa r=8 v_proj plain {p_plain:.1f}, calibrated {p_cal:.2f}")
    assert p_cal <= 1.10 * base, (base, p_cal, p_plain)
    assert p_plain > 2 * base, (base, p_cal, p_plain)
    assert m["calibration"]["output_share_max"] < 1e-3 and "Calibrated (kpm" in (cal / "README.md").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--method", "moe", "--calibrate", "default"], "not available for --method moe"),
    (["--calibrate", "default", "--calibrate-mode", "best"], "--calibrate-mode 'best' unknown"),
    (["--calibrate", "default", "--calibrate-tokens", "0"], "--calibrate-tokens 0 must be"),
    (["--method", "kasa", "--calibrate", "default", "--calibrate-mode", "ipm"], "MOST"),
    (["--calibrate-mode", "kpm"], "only applies with --calibrate"),
    (["--calibrate", "default", "--quantize", "nf4", "--method", "pissa"], "cannot be combined"),
])
def test_usage_errors_are_one_line(tiny, tmp_path, args, needle):
    res = run("split", tiny["tiny-llama"], "--rank", "2", "--out", tmp_path / "o", *args)
    assert res.exit_code == 2 and needle in one_error_line(res)
    assert not (tmp_path / "o").exists()


def test_library_call_refuses_as_the_cli(tiny, tmp_path):
    from surgeon.errors import UsageError

    with pytest.raises(UsageError, match="not available for --method moe"):
        split(str(tiny["tiny-llama"]), tmp_path / "o", SplitOptions(method="moe", rank=2, calibrate="default"))


def test_kasa_export_to_peft_kasa_is_refused_after_calibration(smollm2, calib_file, tmp_path, one_thread):
    out = tmp_path / "split"
    split(str(smollm2), out, SplitOptions(method="kasa", rank=8, target=[r"model\.layers\.0\.self_attn\.v_proj"], calibrate=str(calib_file)))
    res = run("export", out, "--to", "kasa", "--out", tmp_path / "e")
    assert res.exit_code == 2 and "--to lora" in one_error_line(res)


def test_moe_experts_of_a_fused_checkpoint_are_calibrated_and_exact(tmp_path, one_thread):
    """A Mixtral with fused 3-D experts: every expert matrix gets its own covariance (over its routed
    tokens) and the split stays exact. The tiny model has no tokenizer: a small BPE is trained on the
    built-in sample so that `--calibrate default` has ids inside its vocabulary."""
    from archmodels import Zoo
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    src = Zoo(tmp_path / "zoo").path("mixtral")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    sample = Path(__file__).resolve().parents[1] / "surgeon" / "model" / "calibration_default.jsonl"
    tok.train_from_iterator(sample.read_text().splitlines(), trainers.BpeTrainer(vocab_size=min(vocab, 300), special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(src)
    out = tmp_path / "split"
    m = split(str(src), out, SplitOptions(method="milora", rank=2, calibrate="default", calibrate_tokens=512))
    experts = {k: lay for k, lay in m["layers"].items() if ".experts." in k}
    assert experts and not m["calibration"]["skipped"]
    assert all(lay["calibration"]["mode"] == "kpm" and 0 < lay["calibration"]["output_share"] < 1 for lay in experts.values())
    assert m["summary"]["worst_reconstruction_error"] < 1e-6  # the files' error (tests/test_exactness.py checks that it is)
