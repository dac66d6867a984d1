"""Issue 24, the streamed calibration collector: every targeted linear's input covariance, the model run one
block at a time, equals the one plain forward hooks collect on the whole model loaded by transformers.

    PYTHONPATH=.:plugins/surgeon-train python -m pytest -q tests/test_calibration_collect.py

SmolLM2 (real weights): q/k/v/o/gate/up/down of all 30 layers, relative error ≤ 1e-5 (float32 forward,
padded batches), q/k/v (and gate/up) one tensor object; at most one block's parameters materialised while
a block runs. Tiny random checkpoints (tests/archmodels.py): Llama, Mistral, Qwen3, Gemma 3 and Llava
(multimodal: the language model's blocks; vision tower and projector listed as skipped), Mixtral and
Qwen2-MoE (fused experts collected per expert over their routed tokens, against a reference computed from
the loaded model's own routing). load_calibration_data: every record form, the token cap, the built-in
sample, one-line errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from archmodels import ARCHS, Zoo

from surgeon.errors import SurgeonError, UsageError
from surgeon.format import Checkpoint
from surgeon.format.source import resolve
from surgeon.model import load_names
from surgeon.model.calibdata import _hash
from surgeon.model.calibration import (
    BlockCovariances,
    CalibrationData,
    load_calibration_data,
    make_batches,
)
from surgeon.model.selection import select_targets

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
TEXTS = ["The capital of France is Paris, which lies on the river Seine.",
         "Water boils at 100 degrees Celsius at sea level; on a high mountain it boils at a lower temperature.",
         "Photosynthesis turns light into chemical energy.",
         "Q: How many legs does a spider have? A: Eight."]


def _data(ids: list[torch.Tensor]) -> CalibrationData:
    return CalibrationData(ids, _hash(ids), sum(len(i) for i in ids), "test")


def _targets(folder: Path) -> tuple[Checkpoint, dict[str, str]]:
    src = resolve(str(folder), None, None, False)
    ckpt, cfg = src.checkpoint(), src.config()
    names, _ = load_names(cfg, ckpt.tensors)
    chosen = select_targets(ckpt.tensors, ["all-linear"], cfg.get("model_type"), names)
    return ckpt, {t.module: t.tensor for t in chosen.values()}


def _reference(model, ids: list[torch.Tensor], modules, peft: bool = False) -> tuple[dict, dict]:
    """Plain forward pre-hooks on the whole model, one sample per forward (no padding); fused experts: the
    tokens the model's own router sends to each expert (the experts module's top_k_index), down_proj's
    input recomputed as act(gate)·up from the loaded parameter."""
    cov, tok = {}, {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        if peft:
            x = x / x.max().abs()
        cov[name] = cov.get(name, 0) + x.T @ x
        tok[name] = tok.get(name, 0) + x.shape[0]

    def experts(name):
        def pre(mod, args):
            x, routed = args[0], args[1]  # (n, hidden), (n, k)
            for e in range(mod.gate_up_proj.shape[0]):
                xe = x[(routed == e).any(-1)]
                add(f"{name}.gate_up_proj.{e}", xe)
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                add(f"{name}.down_proj.{e}", mod.act_fn(gate) * up)
        return pre

    for name, mod in model.named_modules():
        if name in modules:
            mod.register_forward_pre_hook(lambda m, a, n=name: add(n, a[0]))
        if isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) and mod.gate_up_proj.ndim == 3:
            mod.register_forward_pre_hook(experts(name))
    model.eval()
    with torch.no_grad():
        for i in ids:
            model(input_ids=i[None])
    if peft:
        cov = {n: c / len(ids) for n, c in cov.items()}
    return cov, tok


def _compare(bc: BlockCovariances, ref: dict, tok: dict) -> float:
    """The worst relative error over every collected covariance (the expert parts under their parameter)."""
    worst = 0.0
    for block in bc.blocks():
        for m in block:
            assert bc.available(m), (m, bc.skipped.get(m))
            key = m if m in ref else m.rsplit(".", 1)[0]  # "<param>.<expert>.<part>" -> "<param>.<expert>"
            c, r = bc.covariance(m), ref[key]
            assert c.dtype == torch.float64 and c.shape == r.shape
            assert bc.tokens(m) == tok[key], m
            worst = max(worst, float((c - r).norm() / r.norm()) if r.norm() > 0 else float(c.norm()))
    return worst


# ---------------------------------------------------------------- SmolLM2, real weights


@pytest.fixture(scope="module")
def smol(smollm2):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    ids = [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]
    ckpt, targets = _targets(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    return smollm2, ckpt, targets, ids, model


@pytest.mark.real_model
def test_smollm2_covariances_equal_whole_model_hooks(smol):
    folder, ckpt, targets, ids, model = smol
    assert len(targets) == 30 * 7
    ref, tok = _reference(model, ids, targets)
    bc = BlockCovariances(folder, ckpt, targets, _data(ids), CPU, batch_tokens=64)  # padded batches of 2-3 samples
    assert not bc.skipped and len(bc.blocks()) == 30
    assert _compare(bc, ref, tok) <= 1e-5
    for i in (0, 17, 29):
        a = f"model.layers.{i}"
        assert bc.covariance(f"{a}.self_attn.q_proj") is bc.covariance(f"{a}.self_attn.k_proj") is bc.covariance(f"{a}.self_attn.v_proj")
        assert bc.covariance(f"{a}.mlp.gate_proj") is bc.covariance(f"{a}.mlp.up_proj")
        assert bc.covariance(f"{a}.self_attn.o_proj") is not bc.covariance(f"{a}.mlp.down_proj")


@pytest.mark.real_model
def test_smollm2_peft_corda_covariance(smol):
    """peft=True: PEFT's CorDA hook (one record per forward, input / |max(input)|, sum / records)."""
    folder, ckpt, targets, ids, model = smol
    some = {m: k for m, k in targets.items() if ".layers.0." in m or ".layers.5." in m}
    ref, tok = _reference(model, ids, some, peft=True)
    bc = BlockCovariances(folder, ckpt, some, _data(ids), CPU, peft=True)
    assert _compare(bc, ref, tok) <= 1e-5


@pytest.mark.real_model
def test_smollm2_one_block_in_memory(smol):
    """While block i runs, the only non-meta parameters of the model are block i's; after, none are left; the
    process's resident memory stays flat from block to block."""
    folder, ckpt, targets, ids, _ = smol
    bc = BlockCovariances(folder, ckpt, targets, _data(ids), CPU)
    model, layers = bc.run.model, bc.run.layers
    seen, rss = [], []

    def check(i):
        def pre(mod, args, kwargs):
            live = {id(p) for p in model.parameters() if not p.is_meta}
            assert live and live == {id(p) for p in layers[i].parameters()}, f"block {i}: other parameters live"
            seen.append(sum(p.numel() for p in model.parameters() if not p.is_meta))
            rss.append(int(Path("/proc/self/statm").read_text().split()[1]) * 4096)  # resident bytes (Linux)
        return pre

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(check(i), with_kwargs=True)
    for block in bc.blocks():
        for m in block:
            bc.covariance(m)
            bc.release(m)
    block_numel = sum(p.numel() for p in layers[0].parameters())
    assert len(seen) == 30 * 1 and max(seen) == block_numel  # one batch: one call per block
    assert all(p.is_meta for p in model.parameters()) and all(b is None or b.is_meta for b in model.buffers())
    assert not bc._cov  # every covariance released
    # host memory does not grow block after block (glibc kept ~1 block of freed pages per block before
    # blockrun.release_host_memory: +0.9 GiB over SmolLM2's 30 blocks on 3,000 tokens)
    assert max(rss[2:]) - rss[2] < 8 * 4 * block_numel, [r >> 20 for r in rss]


# ---------------------------------------------------------------- the architecture matrix's tiny checkpoints


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("calib-zoo"))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma3", "llava", "mixtral", "qwen2_moe"])
def test_architectures_equal_whole_model_hooks(zoo, arch):
    folder = zoo.path(arch)
    ckpt, targets = _targets(folder)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 300, (n,), generator=g) for n in (7, 12, 5, 12)]
    model = getattr(transformers, ARCHS[arch].auto).from_pretrained(folder, dtype=torch.float32)
    ref, tok = _reference(model, ids, targets)
    bc = BlockCovariances(folder, ckpt, targets, _data(ids), CPU, batch_tokens=32)
    assert _compare(bc, ref, tok) <= 1e-5
    collected = [m for b in bc.blocks() for m in b]
    layers = [m for m in targets if ".layers." in m and "vision" not in m]
    assert sorted(collected) == sorted(layers)  # every decoder-block linear, fused experts included
    if ARCHS[arch].family == "multimodal":  # vision tower, projector: outside the language model's blocks
        assert set(bc.skipped) == set(targets) - set(layers) and bc.skipped
        assert all("outside the decoder blocks" in why for why in bc.skipped.values())
    else:
        assert not bc.skipped
    experts = [m for m in collected if ".experts." in m]
    assert bool(experts) == (ARCHS[arch].family == "moe")
    for m in experts:
        if m.endswith(".0") and "gate_up_proj" in m:  # gate and up of one expert: one tensor
            assert bc.covariance(m) is bc.covariance(m[:-1] + "1")


# ---------------------------------------------------------------- load_calibration_data


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.real_model
def test_data_forms_and_cap(smollm2, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    text = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    d = load_calibration_data(str(text), smollm2)
    assert [s.tolist() for s in d.input_ids] == [tok(t)["input_ids"] for t in TEXTS]
    assert d.tokens == sum(len(s) for s in d.input_ids) and d.source == str(text) and len(d.sha256) == 64
    assert load_calibration_data(str(text), smollm2).sha256 == d.sha256  # reproducible
    pair = {"prompt": "Name a primary colour.", "completion": "Red."}
    chat = {"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]}
    p = load_calibration_data(str(_jsonl(tmp_path / "p.jsonl", [pair])), smollm2)
    c = load_calibration_data(str(_jsonl(tmp_path / "c.jsonl", [chat])), smollm2)
    rendered = tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert p.input_ids[0].tolist() == c.input_ids[0].tolist() == list(rendered)  # through the chat template
    capped = load_calibration_data(str(text), smollm2, max_tokens=20, max_len=8)
    assert [len(s) for s in capped.input_ids] == [8, 8, 4] and capped.tokens == 20
    assert capped.sha256 != d.sha256


@pytest.mark.real_model
def test_default_sample(smollm2):
    d = load_calibration_data("default", smollm2, max_len=100000, max_tokens=10**9)
    assert d.source == "default" and 40 <= len(d.input_ids) <= 80 and 8000 <= d.tokens <= 15000
    small = load_calibration_data("default", smollm2, max_tokens=1000)
    assert small.tokens == 1000


@pytest.mark.real_model
@pytest.mark.parametrize("case", ["missing", "empty", "bad-json"])
def test_data_errors_one_line(smollm2, tmp_path, case):
    f = tmp_path / "d.jsonl"
    if case == "empty":
        f.write_text("\n")
    elif case == "bad-json":
        f.write_text('{"text": "a"\n')
    with pytest.raises(UsageError) as e:
        load_calibration_data(str(f), smollm2)
    msg = str(e.value)
    assert "\n" not in msg
    assert "--calibrate" in msg and str(f) in msg
    assert {"missing": "does not exist", "empty": "holds no examples", "bad-json": "line 1"}[case] in msg


@pytest.mark.real_model
def test_data_through_datasets_and_without_it(smollm2, tmp_path, monkeypatch):
    """A .json file goes through `datasets` (the reader `surgeon train --data` uses) and gives the same ids as
    JSONL; without the library, one UsageError naming the extra."""
    rows = [{"text": t} for t in TEXTS]
    want = load_calibration_data(str(_jsonl(tmp_path / "t.jsonl", rows)), smollm2)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    got = load_calibration_data(str(tmp_path / "t.json"), smollm2)
    assert got.sha256 == want.sha256 and got.tokens == want.tokens
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'surgeon\[datasets\]'") as e:
        load_calibration_data(str(tmp_path / "t.json"), smollm2)
    assert "\n" not in str(e.value)


@pytest.mark.real_model
def test_released_block_is_not_recomputed(smol):
    """Covariances come in block order: one released (or of a block already passed) is an error, not a rerun."""
    folder, ckpt, targets, ids, _ = smol
    some = {m: k for m, k in targets.items() if ".layers.0." in m or ".layers.1." in m}
    bc = BlockCovariances(folder, ckpt, some, _data(ids), CPU)
    q0 = "model.layers.0.self_attn.q_proj"
    bc.covariance(q0)
    bc.release(q0)
    assert bc.covariance("model.layers.0.self_attn.k_proj") is not None  # a sharer keeps the tensor alive
    bc.covariance("model.layers.1.mlp.down_proj")
    with pytest.raises(SurgeonError, match="released"):
        bc.covariance(q0)
    with pytest.raises(UsageError, match="not a calibration target"):
        bc.covariance("model.layers.2.mlp.down_proj")


def test_forward_failure_is_one_line(zoo):
    """An error inside transformers' forward (a model the scheme cannot run) is one SurgeonError line, no traceback."""
    folder = zoo.path("llama")
    ckpt, targets = _targets(folder)
    ids = [torch.arange(3, 10)]
    bc = BlockCovariances(folder, ckpt, targets, _data(ids), CPU)

    def boom(*args, **kwargs):
        raise RuntimeError("shape mismatch\nsecond line")

    bc.run.layers[1].mlp.forward = boom
    bc.covariance("model.layers.0.mlp.down_proj")  # block 0 runs fine
    with pytest.raises(SurgeonError) as e:
        bc.covariance("model.layers.1.mlp.down_proj")
    assert str(e.value).startswith("calibration: the forward of LlamaForCausalLM in block 1 failed (RuntimeError: shape mismatch)")
    assert "\n" not in str(e.value)


def test_batches_pad_little_and_keep_every_token():
    ids = [torch.arange(n) + 3 for n in (5, 9, 2, 9, 7, 5)]
    padded = make_batches(_data(ids), batch_tokens=20)
    assert [tuple(b["input_ids"].shape) for b in padded] == [(2, 9), (2, 7), (2, 5)]  # longest first: 2 padding tokens in all
    assert sum(int(b["attention_mask"].sum()) for b in padded) == 37
    exact = make_batches(_data(ids), batch_tokens=20, pad=False)
    assert [tuple(b["input_ids"].shape) for b in exact] == [(2, 9), (1, 7), (2, 5), (1, 2)] and all(bool(b["attention_mask"].all()) for b in exact)
    got = sorted(tuple(r[m.bool()].tolist()) for b in padded for r, m in zip(b["input_ids"], b["attention_mask"]))
    assert got == sorted(tuple(i.tolist()) for i in ids)


@pytest.mark.parametrize("n", [3, 7, 130, 2050])
def test_upper_gram_and_mirror_equal_the_whole_gram(n):
    """The collector's XᵀX: upper block triangle by GEMMs, then mirrored; = Σ batches XᵀX to rounding,
    exactly symmetric, for widths below, at and off the block counts."""
    from surgeon.model.calibhooks import mirror_, upper_gram_

    g = torch.Generator().manual_seed(n)
    batches = [torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -4, n, dtype=torch.float64) for m in (5, 64, 1)]
    acc = torch.zeros(n, n, dtype=torch.float64)
    for x in batches:
        upper_gram_(acc, x)
    mirror_(acc)
    ref = sum(x.T @ x for x in batches)
    assert torch.equal(acc, acc.T)
    assert float((acc - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    assert torch.equal(acc.diagonal(), acc.diagonal().clamp_min(0))  # Σ x_i² stays non-negative
