"""NuSA-CL (surgeon/methods/nusa.py): null-space bases checked against a float64 SVD, the principal-
input bound after training + absorb, the PEFT export, the CLI continual loop, CLIP targets, and two
sequential tasks against plain LoRA at equal rank.

    PYTHONPATH=$PWD python -m pytest tests/test_nusa.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surgeon.absorb import AbsorbOptions, absorb, export_lora
from surgeon.methods.nusa import null_ranks
from surgeon.methods.base import MethodConfig
from surgeon.pipeline import FACTORS, INIT_FACTORS, SplitOptions, split

R = 8


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if not f.name.startswith(("adapter_", "surgeon.")):
            out.update(load_file(str(f)))
    return out


def factors(split_dir: Path, name: str = FACTORS) -> dict[str, torch.Tensor]:
    return load_file(str(Path(split_dir) / name))


def clip_inputs(n: int = 4, seed: int = 0, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, 7), generator=g)
    px = torch.randn(n, 3, 16, 16, generator=g)
    return ids, px


def clip_out(model, ids, px):
    out = model(input_ids=ids, pixel_values=px)
    return torch.cat([out.text_embeds, out.image_embeds], 1)  # (n, 2·proj)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(null_energy=0.99999), dict(null_rank=3, spectra=False)],
    ids=["rho=0.95", "rho=0.99999", "null-rank=3,no-spectra"],
)
def test_null_bases_match_float64_svd(tiny, tmp_path, opts):
    """Every layer: p, n, e as a float64 SVD gives them; A, B span its e smallest directions;
    ‖W a_i‖ = σ_i and Σ‖W a_i‖² ≤ (1 − ρ)‖W‖_F² (the energy promise); padding is zero; residual = W."""
    src = tiny["tiny-clip"]
    out = tmp_path / "s"
    man = split(str(src), out, SplitOptions(method="nusa", rank=R, **opts))
    rho = opts.get("null_energy", None if "null_rank" in opts else 0.95)
    assert man["null_energy"] == rho and man["null_rank"] == opts.get("null_rank")
    assert man["use_rslora"] and man["alpha"] == 2.0 and man["scale"] == pytest.approx(2 / R**0.5)
    orig, res, fac = weights(src), weights(out), factors(out)
    assert (out / INIT_FACTORS).exists()
    cfg = MethodConfig(R, 2.0, True, opts.get("null_energy"), opts.get("null_rank"))
    seen_e = set()
    for module, lay in man["layers"].items():
        w = orig[module + ".weight"].double()  # (out, in)
        assert torch.equal(res[module + ".weight"], orig[module + ".weight"])  # base unchanged
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # float64 reference
        p, n, e = null_ranks(s, cfg)
        if rho is not None:  # the definition, spelled out independently
            cum = (s.square().cumsum(0) / s.square().sum()).tolist()
            assert p == next(i + 1 for i, c in enumerate(cum) if c >= rho)
        assert (lay["principal_rank"], lay["null_rank"], lay["effective_rank"]) == (p, n, e)
        seen_e.add(e)
        a, b, m = fac[module + ".nusa_A"].double(), fac[module + ".nusa_B"].double(), fac[module + ".nusa_M"]
        assert a.shape == (R, w.shape[1]) and b.shape == (w.shape[0], R) and m.shape == (R, R)
        assert not m.any() and not a[e:].any() and not b[:, e:].any()
        k, tol = s.numel(), 1e-6 * float(s[0])
        # ‖W a_i‖ equals the float64 σ of the e smallest directions, and so does ‖b_iᵀ W‖
        assert torch.allclose((w @ a[:e].T).norm(dim=0), s[k - e :], atol=tol)  # (out, e) → (e,)
        assert torch.allclose((b[:, :e].T @ w).norm(dim=1), s[k - e :], atol=tol)  # (e, in) → (e,)
        # same subspaces as the SVD's (projectors), orthonormal to fp32 rounding
        assert torch.allclose(a[:e].T @ a[:e], vh[k - e :].T @ vh[k - e :], atol=1e-5)
        assert torch.allclose(b[:, :e] @ b[:, :e].T, u[:, k - e :] @ u[:, k - e :].T, atol=1e-5)
        energy = float((w @ a.T).square().sum()) / float(w.square().sum())
        assert energy == pytest.approx(float(s[k - e :].square().sum() / s.square().sum()), rel=1e-4, abs=1e-12)
        assert energy == pytest.approx(lay["factor_energy"], rel=1e-4, abs=1e-12)
        if rho is not None:
            assert energy <= 1 - rho
    if "null_energy" in opts or "null_rank" in opts:
        assert min(seen_e) < R  # zero padding exercised


def test_clip_targets_follow_peft_all_linear(tiny):
    """all-linear on CLIPModel: q/k/v/out_proj and fc1/fc2 of both towers plus the two projection
    heads, exactly the set PEFT's own all-linear wraps; never the patch or position embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel

    from surgeon.io import Checkpoint
    from surgeon.source import resolve
    from surgeon.targets import select_targets

    src = resolve(str(tiny["tiny-clip"]))
    ckpt: Checkpoint = src.checkpoint()
    ours = {t.module for t in select_targets(ckpt.tensors, ["all-linear"], "clip").values()}
    model = CLIPModel.from_pretrained(tiny["tiny-clip"])
    peft = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default") for n, _ in peft.named_modules() if n.endswith(".lora_A.default")}
    assert ours == theirs
    leaves = {m.rsplit(".", 1)[-1] for m in ours}
    assert leaves == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection", "visual_projection"}
    assert sum(m.startswith("vision_model.") for m in ours) == sum(m.startswith("text_model.") for m in ours) == 12


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_clip(tiny, tmp_path_factory):
    """tiny-clip split with nusa (all-linear, r = 8), a few Adam steps on random data, saved."""
    from transformers import CLIPModel

    from surgeon.runtime import load_split

    tmp = tmp_path_factory.mktemp("nusa-train")
    src = tiny["tiny-clip"]
    split(str(src), tmp / "split", SplitOptions(method="nusa", rank=R))
    sm = load_split(tmp / "split")  # architectures: ["CLIPModel"]
    assert isinstance(sm.model, CLIPModel)
    ids, px = clip_inputs(8, seed=1)
    orig = CLIPModel.from_pretrained(src).eval()
    with torch.no_grad():
        y0 = clip_out(orig, ids, px)
        assert torch.equal(clip_out(sm.model.eval(), ids, px), y0)  # untrained: the original model exactly
    params = sm.trainable_parameters()
    assert len(params) == len(sm.modules) and all(p.shape == (R, R) for p in params)  # only the cores M
    frozen = {n: (m.nusa_A.clone(), m.nusa_B.clone()) for n, m in sm.modules.items()}
    target = y0 + torch.randn(y0.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(12):
        loss = (clip_out(sm.model, ids, px) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(m.nusa_A, frozen[n][0]) and torch.equal(m.nusa_B, frozen[n][1]) for n, m in sm.modules.items())
    sm.save(tmp / "trained")
    with torch.no_grad():
        y1 = clip_out(sm.model.eval(), ids, px)
    return {"src": src, "split": tmp / "split", "trained": tmp / "trained", "tmp": tmp, "inputs": (ids, px), "y1": y1}


def test_absorb_keeps_principal_inputs(trained_clip):
    """After training + absorb: per layer, inputs x in the principal row space span(V_1..p) of the
    original W change by ‖(W' − W)x‖ ≤ 1e-6·(‖W'−W‖₂ + ‖W‖₂)·‖x‖ (A x = 0 up to the fp32 rounding
    of A, plus the rounding of the merged fp32 weight), while inputs in the stored null basis change by
    ≥ 5% of ‖W'−W‖₂. Both absorb bases agree, and the merged model computes what the runtime did."""
    from transformers import CLIPModel

    t = trained_clip
    m_orig = absorb(t["trained"], t["tmp"] / "merged", AbsorbOptions(base="original"))
    m_res = absorb(t["trained"], t["tmp"] / "merged-res", AbsorbOptions(base="residual"))
    assert m_orig["base"] == "original" and m_orig["layers_changed"] == m_orig["layers"] == 26 and m_res["base"] == "residual"
    orig, merged, merged_res = weights(t["src"]), weights(t["tmp"] / "merged"), weights(t["tmp"] / "merged-res")
    assert merged.keys() == orig.keys()
    fac = factors(t["trained"])
    lay = json.loads((t["split"] / "surgeon.json").read_text())["layers"]
    g = torch.Generator().manual_seed(3)
    worst_ratio = 0.0
    for module, info in lay.items():
        key = module + ".weight"
        assert torch.equal(merged[key], merged_res[key])  # residual = W, so the two bases coincide
        w = orig[key].double()
        dw = merged[key].double() - w  # (out, in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        p, e = info["principal_rank"], info["effective_rank"]
        norm_dw, norm_w = float(torch.linalg.matrix_norm(dw, 2)), float(s[0])
        assert norm_dw > 1e-4 * norm_w  # the task moved this layer
        x_p = vh[:p].T @ torch.randn(p, 16, generator=g, dtype=torch.float64)  # (in, 16) in span(V_1..p)
        x_p /= x_p.norm(dim=0)
        change_p = float((dw @ x_p).norm(dim=0).max())  # (out, 16) → worst column
        bound = 1e-6 * (norm_dw + norm_w)
        assert change_p <= bound, (module, change_p, bound)
        a = fac[module + ".nusa_A"].double()[:e]  # (e, in)
        x_n = a.T @ torch.randn(e, 16, generator=g, dtype=torch.float64)  # (in, 16) in the null basis
        x_n /= x_n.norm(dim=0)
        change_n = float((dw @ x_n).norm(dim=0).mean())
        assert change_n >= 0.05 * norm_dw, (module, change_n, norm_dw)
        worst_ratio = max(worst_ratio, change_p / change_n)
    assert worst_ratio < 1e-4
    merged_model = CLIPModel.from_pretrained(t["tmp"] / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(clip_out(merged_model, *t["inputs"]), t["y1"], atol=1e-5)


def test_export_lora_form_loads_in_peft(trained_clip):
    """export --to lora: lora_B = B, lora_A = (M − M₀)A, r and alpha of the split with rsLoRA, on the
    ORIGINAL CLIPModel in vanilla PEFT, gives the merged model's outputs."""
    from peft import PeftModel
    from transformers import CLIPModel

    t = trained_clip
    conf = export_lora(t["trained"], t["tmp"] / "lora")
    assert conf["r"] == R and conf["lora_alpha"] == 2.0 and conf["use_rslora"] and conf["task_type"] is None
    peft = PeftModel.from_pretrained(CLIPModel.from_pretrained(t["src"]), t["tmp"] / "lora").eval()
    with torch.no_grad():
        assert torch.allclose(clip_out(peft, *t["inputs"]), t["y1"], atol=1e-5)


def test_cli_continual_loop(trained_clip):
    """The task loop through the CLI: absorb the trained task, split the merged model for the next
    task; its bases are the null space of the MERGED weights. Option errors name the fix."""
    from typer.testing import CliRunner

    from surgeon.cli.commands import app

    t, run = trained_clip, CliRunner()
    merged, nxt = t["tmp"] / "cli-merged", t["tmp"] / "cli-next"
    r = run.invoke(app, ["absorb", str(t["trained"]), "--out", str(merged), "--quiet"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["split", str(merged), "--method", "nusa", "--rank", str(R), "--null-energy", "0.95", "--out", str(nxt), "--quiet"])
    assert r.exit_code == 0, r.output
    w1, fac = weights(merged), factors(nxt)
    lay = json.loads((nxt / "surgeon.json").read_text())["layers"]
    for module, info in lay.items():
        w = w1[module + ".weight"].double()
        s = torch.linalg.svdvals(w)  # (k,)
        e = info["effective_rank"]
        a = fac[module + ".nusa_A"].double()[:e]
        assert torch.allclose((w @ a.T).norm(dim=0), s[-e:], atol=1e-6 * float(s[0]))  # minor of the merged W
    r = run.invoke(app, ["split", str(merged), "--method", "milora", "--rank", "4", "--null-energy", "0.9", "--out", str(t["tmp"] / "x")])
    assert r.exit_code == 2 and "--null-energy is an option of --method nusa" in r.output
    r = run.invoke(app, ["split", str(merged), "--method", "nusa", "--rank", "4", "--null-energy", "1.5", "--out", str(t["tmp"] / "y")])
    assert r.exit_code == 2 and "strictly between 0 and 1" in r.output
