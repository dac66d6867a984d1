"""--quantize nf4|fp4: 4-bit residuals in bitsandbytes' pre-quantized format, LoftQ alternation,
the runtime on the 4-bit base (CPU), training and absorb.

transformers' own loader of a pre-quantized folder is wrong on CPU (transformers 5.x + bitsandbytes
0.50.2, README "4-bit residuals"), so these tests read the files with bitsandbytes itself
(Params4bit.from_prequantized, dequantize_4bit) and run surgeon's runtime; the transformers + PEFT
path is checked on CUDA by bench/quant_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import logits
from safetensors.torch import load_file

from surgeon.commands.absorb import AbsorbOptions, absorb
from surgeon.commands.split import SplitOptions, split
from surgeon.errors import UsageError
from surgeon.format import quant
from surgeon.runtime import load_split

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "tiny_instruct.jsonl"
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def tensors_of(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def plain_nf4_logits(src, ids, quant_type="nf4"):
    """The original model with every block linear replaced by deq(Q(W)): plain QLoRA's base."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                q, st = bnbf.quantize_4bit(mod.weight.data, blocksize=64, quant_type=quant_type)
                mod.weight.data = bnbf.dequantize_4bit(q, st)
    return logits(m, ids)


@pytest.fixture(scope="module")
def qsplit(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "pissa-nf4"
    m = split(str(tiny["tiny-llama"]), out, SplitOptions(method="pissa", rank=4, quantize="nf4", quantize_iters=2))
    return out, m


def test_files_are_bitsandbytes_prequantized_and_the_manifest_errors_are_what_they_reconstruct(qsplit, tiny):
    out, m = qsplit
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is False and qc["bnb_4bit_quant_storage"] == "uint8"
    assert {"lm_head", "model.embed_tokens"} <= set(qc["llm_int8_skip_modules"])  # transformers would convert them otherwise
    res, src = tensors_of(out), tensors_of(tiny["tiny-llama"])
    adapter = load_file(out / "adapter_model.safetensors")
    for module, lay in m["layers"].items():
        w = f"{module}.weight"
        group = {k: v for k, v in res.items() if k == w or k.startswith(w + ".")}
        assert set(group) == {w, f"{w}.absmax", f"{w}.quant_map", f"{w}.quant_state.bitsandbytes__nf4"}
        # transformers' Bnb4bitDeserialize does exactly this with the group
        p = bnb.nn.Params4bit.from_prequantized(group[w], {k[len(w) + 1 :]: v for k, v in group.items() if k != w}, device="cpu")
        assert p.quant_state.shape == torch.Size(lay["shape"]) and p.quant_state.blocksize == 64
        deq = bnbf.dequantize_4bit(p.data, p.quant_state).double()  # (out, in)
        a, b = adapter[f"base_model.model.{module}.lora_A.weight"].double(), adapter[f"base_model.model.{module}.lora_B.weight"].double()
        W = src[w].double()
        err = float(torch.linalg.matrix_norm(W - (deq + lay["scale"] * b @ a)) / torch.linalg.matrix_norm(W))
        assert err == pytest.approx(lay["quant_error"], rel=1e-9) and lay["reconstruction_error"] == lay["quant_error"]
        assert lay["quant_error"] < lay["quant_error_plain"]
        assert lay["quant_error"] == min(lay["quant_error_iters"]) and len(lay["quant_error_iters"]) == 3
    q = m["quantization"]
    assert q["layers_better_than_plain"] == len(m["layers"]) and q["mean_quant_error"] < q["mean_quant_error_plain"]
    assert q["iterating_helps"] and q["mean_error_per_iter"][-1] < q["mean_error_per_iter"][0]


def test_runtime_on_the_4bit_base_is_closer_to_the_original_than_plain_nf4(qsplit, tiny):
    out, _ = qsplit
    ref = logits(tiny["tiny-llama"], IDS)
    sm = load_split(out, trainable=False)
    assert sum(type(mod).__name__ == "QuantLinear" for mod in sm.model.modules()) == 14
    got = logits(sm.model, IDS)
    plain = plain_nf4_logits(tiny["tiny-llama"], IDS)
    assert float((got - ref).abs().max()) < 0.5 * float((plain - ref).abs().max())
    assert float((got - ref).abs().mean()) < 0.5 * float((plain - ref).abs().mean())


def test_absorb_default_gives_the_original_back_and_residual_dequantizes(qsplit, tiny, tmp_path):
    out, _ = qsplit
    m = absorb(out, tmp_path / "orig")
    assert m["base"] == "original" and m["layers_changed"] == 0
    src, got = tensors_of(tiny["tiny-llama"]), tensors_of(tmp_path / "orig")
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    absorb(out, tmp_path / "res", AbsorbOptions(base="residual"))
    assert "quantization_config" not in json.loads((tmp_path / "res" / "config.json").read_text())
    assert set(tensors_of(tmp_path / "res")) == set(src)  # plain float tensors, the source's names
    merged = logits(tmp_path / "res", IDS)
    runtime = logits(load_split(out, trainable=False).model, IDS)
    assert torch.allclose(merged, runtime, atol=1e-5, rtol=0)


def test_surgeon_train_on_the_4bit_base_learns_and_absorbs(qsplit, tmp_path):
    from surgeon_train import TrainOptions, evaluate, train_files
    from surgeon_train.data import load_packed
    from transformers import AutoTokenizer

    out, _ = qsplit
    trained = tmp_path / "trained"
    loss0 = evaluate(load_split(out).model, load_packed(DATA, AutoTokenizer.from_pretrained(out), 64))[0]
    s = train_files(out, DATA, trained, TrainOptions(steps=6, lr=1e-2, seq_len=64, batch_size=4, warmup_steps=1), eval_data=DATA)
    assert s["eval_loss"] < loss0
    codes0, codes1 = tensors_of(out), tensors_of(trained)
    assert all(torch.equal(codes0[k], codes1[k]) for k in codes0)  # the 4-bit base is frozen
    sm = load_split(trained, trainable=False)
    m = absorb(trained, tmp_path / "merged", AbsorbOptions(base="residual"))
    assert m["layers"] == 14
    assert torch.allclose(logits(tmp_path / "merged", IDS), logits(sm.model, IDS), atol=1e-4, rtol=0)
    # default: the trained change on the ORIGINAL weights, no 4-bit error: = the original + the exported LoRA in PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgeon.commands.absorb import export_lora

    m = absorb(trained, tmp_path / "on-original")
    assert m["base"] == "original" and m["layers_changed"] == 14
    export_lora(trained, tmp_path / "lora")
    src = json.loads((out / "surgeon.json").read_text())["source"]["model"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), tmp_path / "lora")
    assert torch.allclose(logits(tmp_path / "on-original", IDS), logits(peft, IDS), atol=1e-4, rtol=0)


def test_fp4_double_quant_on_conv1d(tiny, tmp_path):
    """GPT-2 stores Conv1D weights (in, out); the codes quantize (out, in), as transformers does."""
    out = tmp_path / "gpt2-fp4"
    m = split(str(tiny["tiny-gpt2"]), out, SplitOptions(method="pissa", rank=4, quantize="fp4", double_quant=True))
    res = tensors_of(out)
    module, lay = next(iter(m["layers"].items()))
    assert lay["transposed"] and res[f"{module}.weight.absmax"].dtype == torch.uint8 and f"{module}.weight.nested_absmax" in res
    meta = json.loads(bytes(res[f"{module}.weight.quant_state.bitsandbytes__fp4"].numpy()).decode())
    assert meta["shape"] == lay["shape"] and meta["nested_blocksize"] == 256
    ref = logits(tiny["tiny-gpt2"], IDS)
    got = logits(load_split(out, trainable=False).model, IDS)
    assert float((got - ref).abs().max()) < 0.5 * float(ref.abs().max()) and m["quantization"]["mean_quant_error"] < m["quantization"]["mean_quant_error_plain"]
    absorb(out, tmp_path / "res", AbsorbOptions(base="residual"))
    assert torch.allclose(logits(tmp_path / "res", IDS), got, atol=1e-5, rtol=0)


def test_minor_methods_quantize_without_gain_and_refuse_iterations(tiny, tmp_path):
    m = split(str(tiny["tiny-llama"]), tmp_path / "milora", SplitOptions(method="milora", rank=4, quantize="nf4", target=["q_proj"]))
    for lay in m["layers"].values():  # the r minor components cannot hold the error of quantizing the principal part
        assert lay["quant_error"] > 0.9 * lay["quant_error_plain"]
    with pytest.raises(UsageError, match="only principal factors"):
        split(str(tiny["tiny-llama"]), tmp_path / "x", SplitOptions(method="milora", rank=4, quantize="nf4", quantize_iters=2))
    with pytest.raises(UsageError, match="nf4 or fp4"):
        split(str(tiny["tiny-llama"]), tmp_path / "x", SplitOptions(method="pissa", rank=4, quantize="int3"))
    with pytest.raises(UsageError, match="go with --quantize"):
        split(str(tiny["tiny-llama"]), tmp_path / "x", SplitOptions(method="pissa", rank=4, quantize_iters=2))
    assert not (tmp_path / "x").exists()


def test_planned_json_room_holds_any_offset():
    spec = quant.QuantSpec(double_quant=True)
    for offset in (0.0, 1e-300, -2.2250738585072014e-308, 123456.78901234567):
        text = json.dumps(quant._meta(spec, (4096, 11008), "BF16", offset))
        assert len(text) <= quant._meta_len(spec, (4096, 11008), "BF16")
