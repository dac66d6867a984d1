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
from safetensors.torch import load_file

from surgeon.commands.absorb import AbsorbOptions, absorb, export_lora
from surgeon.commands.split import FACTORS, INIT_FACTORS, SplitOptions, split
from surgeon.methods.base import MethodConfig
from surgeon.methods.nusa import null_ranks

R = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if not f.name.startswith(("adapter_", "surgeon.")):
            out.update(load_file(str(f)))
    return out


def factors(split_dir: Path, name: str = FACTORS) -> dict[str, torch.Tensor]:
    return load_file(str(Path(split_dir) / name))


def clip_inputs(n: int = 4, seed: int = 0, vocab: int = 300, eos: int | None = None):
    """Random token ids (ending in `eos` where given: CLIP pools the text at the first EOS, and a row
    without one pools position 0, where attention sees one token and q/k get no gradient) and pixels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, 7), generator=g)
    if eos is not None:
        ids[:, -1] = eos
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
    cfg = MethodConfig(R, 2.0, True, null_energy=opts.get("null_energy"), null_rank=opts.get("null_rank"))
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

    from surgeon.format import Checkpoint
    from surgeon.format.source import resolve
    from surgeon.model.selection import select_targets

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
    eos = json.loads((src / "config.json").read_text())["text_config"]["eos_token_id"]
    ids, px = clip_inputs(8, seed=1, eos=eos)
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


# ---------------------------------------------------------------------------------------------
# Two sequential tasks, NuSA-CL against plain LoRA at equal rank.
#
# A random fixture has no relation between its weights and any data, so "what the model already
# does" is not carried by its principal subspaces and no null-space method can protect it. The
# test first gives the vision tower what pretraining gives a real model: each targeted layer, in
# forward order, keeps its singular values but takes as right singular vectors the principal axes
# of its inputs on a "pretraining" image family D0 (so activations concentrate in the principal
# row space, as in trained networks). Tasks A and B are regressions (a random linear readout of the
# latent coefficients added to the features) on two new image families, learned one after the other
# with the continual loop (split → train → absorb → split the merged model → train → absorb) and,
# as the baseline, with a fresh PEFT LoRA per task merged after each (merge_and_unload); same rank,
# same steps, Adam (lr 0.1 on NuSA's cores, 0.01 on LoRA's factors, each arm's working rate).
VISION = r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"


def image_features(model, px):
    return model.visual_projection(model.vision_model(pixel_values=px).pooler_output)  # (n, 24)


def _vision_linears(model) -> list[str]:
    import re

    rx = re.compile(VISION)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(n)]


@torch.no_grad()
def align_to_data(model, x_cal) -> None:
    """W = U diag(σ) Qᵀ, Q the principal axes of the layer's inputs on x_cal (forward order)."""
    for name in _vision_linears(model):
        mod = model.get_submodule(name)
        seen = []
        hook = mod.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
        image_features(model, x_cal)
        hook.remove()
        x = seen[0].double()  # (tokens, in)
        _, q = torch.linalg.eigh(x.T @ x)  # (in, in), ascending variance
        u, s, _ = torch.linalg.svd(mod.weight.double(), full_matrices=False)  # (out, k), (k,)
        mod.weight.copy_((u * s) @ q.flip(1)[:, : s.numel()].T)  # (out, k)(k, in)


def _family_data(seed: int):
    """Image families: D0 (12 basis images, the "pretraining" data), A and B (6 new basis images each)."""
    g = torch.Generator().manual_seed(seed)
    bases = {"d0": torch.randn(12, 3, 16, 16, generator=g), "a": torch.randn(6, 3, 16, 16, generator=g), "b": torch.randn(6, 3, 16, 16, generator=g)}

    def draw(n, fam):
        basis = bases[fam]
        c = torch.randn(n, basis.shape[0], generator=g)  # latent coefficients
        x = torch.einsum("nb,bchw->nchw", c, basis) / basis.shape[0] ** 0.5 + 0.05 * torch.randn(n, 3, 16, 16, generator=g)
        return x, c

    return g, draw


def _train(model, params, x, y, lr, steps) -> tuple[float, float]:
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        first = (image_features(model, x) - y).square().mean().item()
    for _ in range(steps):
        loss = (image_features(model, x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, (image_features(model, x) - y).square().mean().item()


def sequential_tasks(fixture: Path, work: Path, seed: int = 0, steps: int = 60, rank: int = R) -> dict:
    """Both arms on the same aligned model, data and targets; returns the measured numbers."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel

    from surgeon.runtime import load_split

    torch.manual_seed(seed)
    g, draw = _family_data(seed)
    m0 = CLIPModel.from_pretrained(fixture).eval()
    align_to_data(m0, draw(256, "d0")[0])
    m0.save_pretrained(work / "m0")
    (xa, ca), (xb, cb), (x0, _) = draw(64, "a"), draw(64, "b"), draw(32, "d0")
    with torch.no_grad():
        fa, fb, f0 = image_features(m0, xa), image_features(m0, xb), image_features(m0, x0)
    sc = float(fa.std())
    ya = fa + 0.5 * sc * ca @ torch.randn(6, fa.shape[1], generator=g) / 6**0.5  # task A: a linear readout of A's latents
    yb = fb + 0.5 * sc * cb @ torch.randn(6, fb.shape[1], generator=g) / 6**0.5  # task B: the same for B
    out: dict = {}

    def nusa_task(src: Path, x, y, tag: str) -> tuple[Path, tuple[float, float]]:
        split(str(src), work / f"split{tag}", SplitOptions(method="nusa", rank=rank, target=[VISION]))
        sm = load_split(work / f"split{tag}")
        losses = _train(sm.model, sm.trainable_parameters(), x, y, 0.1, steps)
        sm.save(work / f"trained{tag}")
        absorb(work / f"trained{tag}", work / f"merged{tag}")
        return work / f"merged{tag}", losses

    def lora_task(model, x, y):
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=VISION))
        losses = _train(pm, [p for p in pm.parameters() if p.requires_grad], x, y, 0.01, steps)
        return pm.merge_and_unload().eval(), losses

    p1, out["nusa_A"] = nusa_task(work / "m0", xa, ya, "A")
    p2, out["nusa_B"] = nusa_task(p1, xb, yb, "B")
    n1, n2 = CLIPModel.from_pretrained(p1).eval(), CLIPModel.from_pretrained(p2).eval()
    l1, out["lora_A"] = lora_task(CLIPModel.from_pretrained(work / "m0"), xa, ya)
    w_l1 = {k: v.clone() for k, v in l1.state_dict().items()}
    with torch.no_grad():
        la1 = image_features(l1, xa)
    l2, out["lora_B"] = lora_task(l1, xb, yb)
    with torch.no_grad():
        for arm, (m1, m2), a1 in (("nusa", (n1, n2), image_features(n1, xa)), ("lora", (None, l2), la1)):
            a2 = image_features(m2, xa)
            out[f"{arm}_drift_A"] = float((a2 - a1).norm() / a1.norm())  # task A's outputs moved by task B
            out[f"{arm}_loss_A_after_B"] = float((a2 - ya).square().mean())
            out[f"{arm}_drift_D0"] = float((image_features(m2, x0) - f0).norm() / f0.norm())
        # weight space: how much task B's update overlaps task A's, ‖ΔB ΔAᵀ‖ + ‖ΔBᵀ ΔA‖ relative
        w0, wn1, wn2, wl2 = m0.state_dict(), n1.state_dict(), n2.state_dict(), l2.state_dict()
        for arm, (wa, wb) in (("nusa", (wn1, wn2)), ("lora", (w_l1, wl2))):
            worst = 0.0
            for name in _vision_linears(m0):
                k = name + ".weight"
                da, db = (wa[k] - w0[k]).double(), (wb[k] - wa[k]).double()  # (out, in) each
                rel = (float((db @ da.T).norm()) + float((db.T @ da).norm())) / float(da.norm() * db.norm())
                worst = max(worst, rel)
            out[f"{arm}_overlap"] = worst
    return out


def test_two_sequential_tasks_vs_lora(tiny, tmp_path):
    """Asserted: both arms learn both tasks at equal rank; task B's NuSA update leaves task A's merged
    update alone (relative ‖ΔB ΔAᵀ‖ + ‖ΔBᵀ ΔA‖ < 1%: the merged ΔA became principal, so the next
    null space avoids it), where LoRA's overlaps it by > 30%.

    Measured, NOT asserted: the model outputs on task A's inputs move about as much with NuSA as with
    LoRA (drift ≈ 0.4–0.5 vs 0.3–0.5 of the output norm over seeds 0–4), and the pretraining-family
    outputs move less with NuSA in 3 of 5 seeds only: task A's inputs carry energy in the directions
    that become task B's null space, and NuSA protects only inputs in the current principal subspace.
    The numbers are printed (pytest -s) and reported with the method (see the NuSA report)."""
    res = sequential_tasks(tiny["tiny-clip"], tmp_path, seed=0)
    print({k: (tuple(round(x, 4) for x in v) if isinstance(v, tuple) else round(v, 4)) for k, v in res.items()})
    for arm in ("nusa", "lora"):
        for task in ("A", "B"):
            first, last = res[f"{arm}_{task}"]
            assert last <= 0.75 * first, (arm, task, first, last)
    assert res["nusa_overlap"] < 0.01 and res["lora_overlap"] > 0.3
    assert res["lora_overlap"] > 50 * res["nusa_overlap"]
