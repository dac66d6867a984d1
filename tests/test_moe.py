"""moe (MiLoRA mixture): untrained == original, gates routed once per prompt and cached, cached ==
recomputed tokens, training moves the loss, absorb refuses / folds fixed gates exactly.

    PYTHONPATH=$PWD python -m pytest tests/test_moe.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import logits
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.commands.absorb import AbsorbOptions, absorb
from surgeon.commands.split import SplitOptions, split
from surgeon.errors import UsageError
from surgeon.methods.moe_runtime import (
    LB_WEIGHT,
    RATIONAL_DEN,
    RATIONAL_NUM,
    Router,
    load_balancing_loss,
)
from surgeon.runtime import load_split

PROMPTS = ["The quick brown fox", "Question: what is two plus two? Answer:", "One, two, three, four, five"]


@pytest.fixture(scope="module")
def moe_llama(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "llama-moe"
    split(str(tiny["tiny-llama"]), out, SplitOptions(method="moe", rank=4))
    return out


def _routers(sm):
    return sm.model.surgeon_routing.routers


def _train_like(sm, seed=0, std=0.5):
    """Stand-in for training: random expert B (the untrained B is 0, which would hide any gate error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in sm.modules.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def _ids(path, texts):
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_untrained_forward_equals_original(tiny, tmp_path, name):
    out = tmp_path / "moe"
    m = split(str(tiny[name]), out, SplitOptions(method="moe", rank=4))
    assert m["method_options"] == {"moe_top_k": 2, "moe_pooling": "attention"} and m["peft_adapter"] is False
    # the residual is W to the bit, and each expert's A spans the r minor right singular vectors (float64 SVD)
    ref = AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32).eval()
    with safe_open(out / "surgeon.factors.safetensors", "pt") as f:
        for module, lay in list(m["layers"].items())[:3]:
            w = ref.get_submodule(module).weight.detach()
            w = (w.T if lay["transposed"] else w).double()  # (out, in)
            _, _, vh = torch.linalg.svd(w, full_matrices=False)
            a = f.get_tensor(f"{module}.lora_A").double()  # (r, in)
            assert torch.equal(f.get_tensor(f"{module}.lora_B"), torch.zeros(lay["shape"][0], 4))
            assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
            assert torch.linalg.matrix_norm(a - a @ vh[-4:].T @ vh[-4:]) < 1e-5  # same subspace
    sm = load_split(out)
    batch = _ids(tiny[name], PROMPTS)
    with torch.no_grad():
        got = sm.model(**batch).logits
        want = ref(**batch).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())
    assert all(r.gates is not None and (r.gates != 0).sum(1).eq(2).all() for r in _routers(sm).values())


def test_untrained_smollm2_equals_original(smollm2, tmp_path):
    # all seven linears of three blocks (first, middle, last): an all-linear split of the 30 blocks
    # takes ~20 s of solves on two CPU cores for the same check (bench_moe_latency.py does it)
    out = tmp_path / "smol-moe"
    m = split(str(smollm2), out, SplitOptions(method="moe", rank=4, spectra=False, target=[r"model\.layers\.(0|15|29)\..*"]))
    assert list(m["blocks"]) == [f"model.layers.{i}" for i in (0, 15, 29)] and all(len(b["experts"]) == 7 for b in m["blocks"].values())
    sm = load_split(out, trainable=False)
    ids = AutoTokenizer.from_pretrained(str(smollm2))("The capital of France is", return_tensors="pt")["input_ids"]
    calls = []
    for r in _routers(sm).values():
        r.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        got = sm.model(ids).logits
        gen = sm.model.generate(ids, max_new_tokens=3, do_sample=False)
    want = logits(smollm2, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    assert gen.shape[1] == ids.shape[1] + 3 and int(gen[0, ids.shape[1]]) == int(want[0, -1].argmax())
    assert len(calls) == 3 + 3  # one forward + one generate: each router ran once per prompt


def test_gates_computed_once_from_prompt(moe_llama, tiny):
    sm = load_split(moe_llama, trainable=False)
    routers = _routers(sm)
    calls = {b: 0 for b in routers}
    for b, r in routers.items():
        r.register_forward_hook(lambda mod, a, o, b=b: calls.__setitem__(b, calls[b] + 1))
    ids = _ids(moe_llama, PROMPTS[:1])["input_ids"]
    with torch.no_grad():
        out = sm.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    assert all(c == 1 for c in calls.values()), calls  # 6 decoding steps, one routing per block
    # the cached gates are the router of each block's INPUT over the prompt, recomputed here in float64
    ref = AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"], dtype=torch.float32)
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states  # hs[i] enters block i
    for i, (b, r) in enumerate(routers.items()):
        p = hs[i][0].double().mean(0)  # query 0 at init: attention pooling == mean pooling, (d,)
        z = p / p.square().mean().add(1e-6).sqrt()
        a0, a1, a2, a3 = RATIONAL_NUM
        act = (a0 + a1 * z + a2 * z**2 + a3 * z**3) / (1 + (RATIONAL_DEN[0] * z + RATIONAL_DEN[1] * z**2).abs())
        probs = torch.softmax(act @ r.weight.detach().double().T + r.bias.detach().double(), -1)  # (E,)
        want = probs * torch.zeros_like(probs).scatter(0, probs.topk(2).indices, 1.0)
        assert torch.allclose(r.gates[0].double(), want, atol=1e-6), (b, r.gates, want)
    first = {b: r.gates.clone() for b, r in routers.items()}
    with torch.no_grad():
        sm.model.generate(_ids(moe_llama, PROMPTS[1:2])["input_ids"], max_new_tokens=4, do_sample=False)
    assert all(c == 2 for c in calls.values())  # a new prompt: routed again, once
    assert any(not torch.equal(first[b], r.gates) for b, r in routers.items())


def test_cached_gates_give_same_tokens_as_recomputing(moe_llama):
    sm = load_split(moe_llama, trainable=False)
    _train_like(sm)
    routing, routers = sm.model.surgeon_routing, _routers(sm)
    calls = []
    for r in routers.values():
        r.register_forward_hook(lambda *a: calls.append(1))
    batch = _ids(moe_llama, PROMPTS)  # left-padded batch of three prompts
    n = 6

    def gen(mode, use_cache):
        routing.mode = mode
        calls.clear()
        with torch.no_grad():
            out = sm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache)
        return out, len(calls)

    cached, c_cached = gen("cached", True)
    per_step, c_step = gen("per_step", True)  # router rerun every step from the kept prompt states
    fresh, c_fresh = gen("per_step", False)  # no KV cache: every step recomputes the prompt's states too
    assert c_cached == len(routers) and c_step == c_fresh == len(routers) * n
    assert torch.equal(cached, per_step) and torch.equal(cached, fresh)
    routing.fix({b: [1.0 / 7] * 7 for b in routers})  # other gates change the text: the check has teeth
    with torch.no_grad():
        other = sm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert not torch.equal(cached, other)


@pytest.mark.parametrize("pooling", ["attention", "mean", "last"])
def test_padding_does_not_change_gates(moe_llama, pooling):
    sm = load_split(moe_llama, trainable=False)
    for r in _routers(sm).values():
        r.pooling = pooling
        with torch.no_grad():
            r.query.normal_(0, 1)
    batch = _ids(moe_llama, PROMPTS)
    with torch.no_grad():
        sm.model(**batch)
        padded = {b: r.gates[0].clone() for b, r in _routers(sm).items()}
        sm.model(_ids(moe_llama, PROMPTS[:1])["input_ids"])
    for b, r in _routers(sm).items():
        assert torch.allclose(padded[b], r.gates[0], atol=1e-5), (pooling, b)


def test_load_balancing_loss_by_hand():
    r = Router({"router.query": torch.zeros(3), "router.num": torch.tensor(RATIONAL_NUM), "router.den": torch.tensor(RATIONAL_DEN),
                "router.weight": torch.zeros(4, 3), "router.bias": torch.zeros(4)}, top_k=2, pooling="mean")
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    routed = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    r.set_gates(probs * routed, probs, routed)
    # f = (.5, .5, .5, .5), P = (.25, .25, .25, .25): 4 · Σ f·P = 2
    assert math.isclose(float(load_balancing_loss([r])), LB_WEIGHT * 2.0, rel_tol=1e-6)
    routed2 = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]])
    r.set_gates(probs * routed2, probs, routed2)  # both prompts on experts 0, 1: f = (1, 1, 0, 0), P = (.25, .25, ..)
    assert math.isclose(float(load_balancing_loss([r])), LB_WEIGHT * 4 * 0.5, rel_tol=1e-6)


def test_training_moves_loss_down(moe_llama):
    torch.manual_seed(0)
    sm = load_split(moe_llama)
    routers = _routers(sm)
    router_params = {id(p) for r in routers.values() for p in r.parameters()}
    params = sm.trainable_parameters()
    assert router_params <= {id(p) for p in params}
    before = {b: r.weight.detach().clone() for b, r in routers.items()}
    batch = _ids(moe_llama, ["The quick brown fox jumps over the lazy dog.", "Singular values decay; the minor components carry little energy."])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(12):
        task = sm.model(**batch, labels=labels).loss
        reg = sm.extra_loss()
        assert reg is not None and reg.requires_grad
        (task + reg).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(task.detach()))
    # the tiny model starts at a near-uniform prediction (loss ≈ ln 320 = 5.77)
    assert losses[-1] < losses[0] - 0.1 and min(losses[-3:]) < min(losses[:3]), losses
    assert all(not torch.equal(before[b], r.weight.detach()) for b, r in routers.items())
    sm.model(**batch, labels=labels).loss.backward()  # the TASK loss alone reaches every router now
    assert all(float(r.weight.grad.norm()) > 0 and float(r.query.grad.norm()) > 0 for r in routers.values())


def test_absorb_refuses_without_fixed_gates(moe_llama, tmp_path):
    with pytest.raises(UsageError, match="cannot be folded into one set of static weights.*--fixed-gates"):
        absorb(moe_llama, tmp_path / "merged")
    from typer.testing import CliRunner

    from surgeon.cli import build_app

    res = CliRunner().invoke(build_app(), ["absorb", str(moe_llama), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # rich wraps lines
    assert "--fixed-gates" in text and "cannot be folded" in text and '{"model.layers.0": [g_1, ..., g_E]}' in text
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m2").exists()
    (tmp_path / "short.json").write_text(json.dumps({"model.layers.0": [0.5] * 6, "model.layers.1": [0.5] * 7}))
    with pytest.raises(UsageError, match="model.layers.0 has 7 experts .*give that many gates"):
        absorb(moe_llama, tmp_path / "merged", AbsorbOptions(fixed_gates=tmp_path / "short.json"))
    (tmp_path / "few.json").write_text(json.dumps({"model.layers.0": [0.5] * 7}))
    with pytest.raises(UsageError, match="no gates for block model.layers.1"):
        absorb(moe_llama, tmp_path / "merged", AbsorbOptions(fixed_gates=tmp_path / "few.json"))



def test_fixed_gates_refused_on_static_split(tiny, tmp_path):
    split(str(tiny["tiny-llama"]), tmp_path / "milora", SplitOptions(method="milora", rank=4, spectra=False))
    (tmp_path / "g.json").write_text("{}")
    with pytest.raises(UsageError, match="--fixed-gates is for splits whose update depends on the prompt"):
        absorb(tmp_path / "milora", tmp_path / "merged", AbsorbOptions(fixed_gates=tmp_path / "g.json"))


def test_fixed_gates_absorb_equals_runtime(moe_llama, tmp_path):
    sm = load_split(moe_llama)
    _train_like(sm, seed=1, std=0.3)
    with torch.no_grad():
        for r in _routers(sm).values():
            r.weight.normal_(0, 1)  # a "trained" router, saved with the experts
    trained = sm.save(tmp_path / "trained")
    blocks = json.loads((trained / "surgeon.json").read_text())["blocks"]
    g = torch.Generator().manual_seed(3)
    gates = {b: [0.0 if j % 3 == 0 else float(torch.rand(1, generator=g)) for j in range(7)] for b in blocks}
    as_json = dict(gates)
    b1 = list(blocks)[1]  # one block by expert names instead of positions
    as_json[b1] = {m.rsplit(".", 1)[-1]: v for m, v in zip(blocks[b1]["experts"], gates[b1])}
    (tmp_path / "gates.json").write_text(json.dumps(as_json))
    ids = _ids(moe_llama, PROMPTS)
    rt = load_split(trained, trainable=False)
    assert torch.equal(rt.modules[blocks[b1]["experts"][0]].lora_B, sm.modules[blocks[b1]["experts"][0]].lora_B.detach())
    rt.model.surgeon_routing.fix(gates)
    with torch.no_grad():
        want = rt.model(**ids).logits
    for base in ("original", "residual"):
        m = absorb(trained, tmp_path / f"merged-{base}", AbsorbOptions(base=base, fixed_gates=tmp_path / "gates.json"))
        # base original skips the experts whose gate is 0 (3 of 7 per block): the original bits are copied
        assert m["fixed_gates"]["gates"] == gates and m["layers_changed"] == (14 if base == "residual" else 8)
        got = _logits(tmp_path / f"merged-{base}", ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (base, float((got - want).abs().max()))

    # calibration prompts: the folded gates are the mean of the runtime's gates over the prompts
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    m = absorb(trained, tmp_path / "merged-calib", AbsorbOptions(fixed_gates=tmp_path / "calib.jsonl"))
    rt.model.surgeon_routing.unfix()
    sums = {b: torch.zeros(7, dtype=torch.float64) for b in blocks}
    with torch.no_grad():
        for p in PROMPTS:
            rt.model(_ids(moe_llama, [p])["input_ids"])
            for b, r in _routers(rt).items():
                sums[b] += r.gates[0].double()
    for b in blocks:
        assert torch.allclose(torch.tensor(m["fixed_gates"]["gates"][b], dtype=torch.float64), sums[b] / 3, atol=1e-7)
    rt.model.surgeon_routing.fix(m["fixed_gates"]["gates"])
    with torch.no_grad():
        want = rt.model(**ids).logits
    got = _logits(tmp_path / "merged-calib", ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


def _logits(path, batch):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).logits


def test_cli_split_top_k_and_pooling(tiny, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli import build_app

    out = tmp_path / "k1"
    res = CliRunner().invoke(build_app(), ["split", str(tiny["tiny-llama"]), "--method", "moe", "--rank", "4", "--top-k", "1",
                                           "--pooling", "last", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "surgeon.json").read_text())["method_options"] == {"moe_top_k": 1, "moe_pooling": "last"}
    sm = load_split(out, trainable=False)
    with torch.no_grad():
        sm.model(**_ids(out, PROMPTS))
    assert all(r.pooling == "last" and (r.gates != 0).sum(1).eq(1).all() for r in _routers(sm).values())
    bad = CliRunner().invoke(build_app(), ["split", str(tiny["tiny-llama"]), "--method", "moe", "--pooling", "max", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "attention, mean, last" in bad.output
