"""`surgeon check` block by block (surgeon/runtime/streamed.py): the logits of the original and of the
split, computed with one decoder block materialised at a time, are bit-identical to those of the
whole loaded model (the path check took before) on every kind of architecture and method; at most
one block plus the modules outside the blocks is ever materialised; a model the block runner cannot
load is checked whole, with the same numbers.

    python -m pytest -q tests/test_check_streamed.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from archmodels import Zoo
from safetensors.torch import load_file, save_file

import surgeon.commands.check as chk
from surgeon.commands.split import SplitOptions, split
from surgeon.methods.folder import SplitDir
from surgeon.model.blockrun import BlockRunner
from surgeon.runtime import load_split
from surgeon.runtime import streamed as S

# (architecture, method): Conv1D (gpt2), fused MoE experts (mixtral, deepseek_v3), routers with per-prompt
# state (moe), multimodal with sliding/full attention per block (gemma3) and M-RoPE (qwen2_vl), KaSA's gates
CASES = [("llama", "kasa"), ("gpt2", "milora"), ("mixtral", "milora"), ("deepseek_v3", "pissa"), ("qwen2_moe", "moe"),
         ("gemma3", "nusa"), ("qwen2_vl", "milora")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _windows():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (1, 12), generator=g), torch.randint(3, 300, (1, 7), generator=g)]


def _split(zoo, tmp_path, arch, method):
    out = tmp_path / f"{arch}-{method}"
    split(str(zoo.path(arch)), out, SplitOptions(method=method, rank=2, dtype="float32"))
    return SplitDir(out)


@pytest.mark.parametrize("arch,method", CASES)
def test_streamed_logits_are_bit_identical_to_the_whole_model(zoo, tmp_path, arch, method):
    sd = _split(zoo, tmp_path, arch, method)
    windows = _windows()
    ckpt, conf = chk.verified_original(sd)
    whole_ref = chk._logits(chk._load_whole(ckpt, conf), windows)
    whole_got = chk._logits(load_split(sd.path, dtype=torch.float32, trainable=False).model, windows)
    ref = S.original_logits(S.original_runner(conf, ckpt), windows)
    got = S.split_logits(*S.split_runner(sd), windows)
    for a, b in [*zip(whole_ref, ref), *zip(whole_got, got)]:
        assert a.shape == b.shape and a.shape[-1] == conf.get("vocab_size", a.shape[-1])
        assert torch.equal(a, b)
    assert max(float(r.abs().max()) for r in ref) > 1.0  # real logits, not zeros


def _track(monkeypatch):
    """Record, after every materialisation, the checkpoint values (parameters) materialised at once."""
    peak = {"values": 0, "total": 0, "working": 0}
    real = BlockRunner.materialise

    def materialise(self, module):
        real(self, module)
        live = sum(p.numel() for m in self.model.modules() if id(m) in self._names for p in m._parameters.values()
                   if p is not None and not p.is_meta)
        peak["values"] = max(peak["values"], live)
        peak["total"] = sum(i.numel for i in self.ckpt.tensors.values())
        peak["working"] = self.working_numel()

    monkeypatch.setattr(BlockRunner, "materialise", materialise)
    return peak


def test_check_holds_one_block_and_the_outside_modules_at_a_time(zoo, tmp_path, monkeypatch):
    sd = _split(zoo, tmp_path, "mixtral", "milora")  # 2 blocks, fused experts
    monkeypatch.setattr(chk, "load_model_from", lambda *a, **k: pytest.fail("loaded the whole model"))
    peak = _track(monkeypatch)
    r = chk.check(sd.path, data=None, tokens=40)
    assert r["tokens"] == 39 and r["top1_agreement"] == 1.0
    assert 0 < peak["values"] <= peak["working"] < peak["total"]


def test_a_model_the_block_runner_cannot_load_is_checked_whole_with_the_same_numbers(zoo, tmp_path, monkeypatch):
    sd = _split(zoo, tmp_path, "llama", "kasa")
    streamed = chk.check(sd.path, tokens=40)
    monkeypatch.setattr(BlockRunner, "streamable", lambda self: False)
    monkeypatch.setattr(BlockRunner, "materialise", lambda *a, **k: pytest.fail("ran block by block"))
    whole = chk.check(sd.path, tokens=40)
    ran = whole.pop("ran"), streamed.pop("ran")
    assert whole == streamed and streamed["perplexity_ratio"] != 1.0
    assert ran[0]["original"].startswith("whole model (a checkpoint tensor") and ran[1] == {"original": "block by block", "split": "block by block"}


def test_the_mixture_routes_each_window_as_its_own_prompt(zoo, tmp_path):
    """The routers keep per-prompt state; windows of different lengths run block-major, so the state of
    the last window captured must not route the others (their masks would not even fit)."""
    sd = _split(zoo, tmp_path, "qwen2_moe", "moe")
    g = torch.Generator().manual_seed(1)
    state = load_file(sd.factors_file)  # the experts given weight (B = 0 at split time), as training would
    save_file({k: v + 0.3 * torch.randn(v.shape, generator=g) if "lora_B" in k else v for k, v in state.items()},
              str(sd.factors_file), metadata={"format": "pt"})
    windows = [torch.randint(3, 300, (1, n), generator=g) for n in (12, 5, 9)]
    whole = chk._logits(load_split(sd.path, dtype=torch.float32, trainable=False).model, windows)
    got = S.split_logits(*S.split_runner(sd), windows)
    ckpt, conf = chk.verified_original(sd)
    ref = S.original_logits(S.original_runner(conf, ckpt), windows)
    assert all(torch.equal(a, b) for a, b in zip(whole, got))
    assert min(float((a - b).abs().max()) for a, b in zip(ref, got)) > 1e-3  # the experts act
    assert sd.manifest["method"] == "moe"


def test_a_model_that_changes_the_states_between_blocks_is_checked_whole(zoo, tmp_path, monkeypatch):
    """Code a model runs between its blocks is not run block by block: when capture sees the states change
    on the way from one block to the next, check loads the model whole (the right numbers), and says so."""
    sd = _split(zoo, tmp_path, "llama", "milora")
    real = BlockRunner.capture

    def capture(self, batches):
        out = real(self, batches)
        self.changes_between_blocks = True  # as a model that scales the states between blocks would show
        return out

    monkeypatch.setattr(BlockRunner, "capture", capture)
    r = chk.check(sd.path, tokens=40)
    assert r["ran"]["original"].startswith("whole model (LlamaForCausalLM changes the hidden states between its blocks")
    assert r["ran"]["split"].startswith("whole model (") and r["top1_agreement"] == 1.0


def test_capture_sees_states_changed_between_blocks():
    """The catchers compare what each receives with what the one before returned (every architecture of
    tests/archmodels.py that runs block by block passes its states on unchanged, Falcon included)."""
    from surgeon.model.blockrun import _Catcher

    passed = {"out": None, "changed": False}
    c0, c1 = (_Catcher(torch.nn.Identity(), i, False, [], [], passed) for i in (0, 1))
    x = torch.ones(1, 2, 3)
    c1(c0(x))
    c1(c0(x)[0])  # Falcon takes outputs[0] of blocks that return tuples: the catcher's tensor, indexed
    assert not passed["changed"]
    c1(2 * c0(x))
    assert passed["changed"]


def test_calibrate_refuses_a_model_that_changes_the_states_between_blocks(tmp_path, monkeypatch):
    """--calibrate feeds each block what the block before returned; a model that changes the states
    on the way would get covariances of the wrong inputs: refused, and no output is left."""
    from surgeon.errors import UsageError

    real = BlockRunner.capture

    def capture(self, batches):
        out = real(self, batches)
        self.changes_between_blocks = True
        return out

    monkeypatch.setattr(BlockRunner, "capture", capture)
    tiny = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"
    with pytest.raises(UsageError, match="changes the hidden states between its blocks"):
        split(str(tiny), tmp_path / "cal", SplitOptions(method="milora", rank=2, calibrate="default", calibrate_tokens=64))
    assert not (tmp_path / "cal").exists()
