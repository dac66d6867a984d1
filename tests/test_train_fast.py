"""surgeon train without full logits, fitted to memory, with packed examples kept apart.

    PYTHONPATH=.:plugins/surgeon-train python -m pytest -q tests/test_train_fast.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from surgeon_train import DataError, TrainOptions, memory, step, train_files
from surgeon_train.data import IGNORE, pack
from surgeon_train.loss import HeadCapture, chunked_ce_sum
from surgeon_train.sources import load_records, parse_columns

from surgeon.commands.split import SplitOptions, split
from surgeon.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
FAST = dict(lr=1e-2, seq_len=64, batch_size=4, warmup_steps=1, steps=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _close(a: Path, b: Path) -> None:
    """Trained factors equal up to rounding (AdamW divides by √v, which amplifies it at tiny gradients)."""
    ta, tb = _tensors(a / "adapter_model.safetensors"), _tensors(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap, bias", [(None, False), (None, True), (3.0, True)])
def test_chunked_loss_equals_full_cross_entropy(softcap, bias):
    """Σ CE from chunks (7 rows, so several) = F.cross_entropy on all logits, and so are the
    gradients with respect to the hidden states, the head weight and its bias (fp32 rounding)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    b = torch.randn(50, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, 50, (40,), generator=g)
    ours = chunked_ce_sum(h, w, b, t, softcap, chunk=7)
    ours.backward(torch.tensor(0.5))
    got = [x.grad.clone() for x in (h, w, b) if x is not None]
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    z = F.linear(h, w, b)
    z = torch.tanh(z / softcap) * softcap if softcap else z
    ref = F.cross_entropy(z, t, reduction="sum")
    (0.5 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, r in zip(got, [x.grad for x in (h, w, b) if x is not None]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama_split(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fast") / "llama-milora"
    split(str(tiny["tiny-llama"]), out, SplitOptions(method="milora", rank=4))
    return out


@pytest.fixture(scope="module")
def reference(llama_split, tmp_path_factory) -> Path:
    """The old way: full logits, the whole batch in one pass."""
    out = tmp_path_factory.mktemp("ref") / "full"
    train_files(llama_split, DATA, out, TrainOptions(loss="full", micro_batch=4, **FAST))
    return out


def _losses(out: Path) -> list[float]:
    return [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" not in x]


def test_loss_without_logits_and_micro_batches_match_full_logits(llama_split, reference, tmp_path):
    """The chunked loss on the labelled positions, one row per pass: the same loss curve and the
    same trained factors as full logits over the whole batch."""
    s = train_files(llama_split, DATA, tmp_path / "o", TrainOptions(loss="chunked", micro_batch=1, **FAST))
    assert s["setup"]["loss"] == "chunked" and s["micro_batch"] == 1 and s["setup"]["document_mask"]
    assert _losses(tmp_path / "o") == pytest.approx(_losses(reference), rel=1e-5)
    _close(tmp_path / "o", reference)


def test_memory_plan_picks_micro_batch_and_checkpointing(llama_split, reference, tmp_path, monkeypatch):
    row = 100 * 2**20
    monkeypatch.setattr(memory, "saved_bytes", lambda model, run: row)
    ws = 3 * 128 * 2**20

    def free_for(rows):  # the budget in which exactly `rows` rows (+ half a row) fit
        return int((memory.MARGIN + ws + (rows + 0.5) * memory.SLACK * row) / memory.FRACTION["cpu"])

    monkeypatch.setattr(memory, "available_bytes", lambda device: free_for(2))
    starts = []
    s = train_files(llama_split, DATA, tmp_path / "o", TrainOptions(**FAST), callback=lambda e, i: e == "start" and starts.append(i))
    assert s["micro_batch"] == 2 and starts[0]["micro_batch"] == 2 and not s["grad_checkpointing"]
    _close(tmp_path / "o", reference)  # 2 × 2 rows = 1 × 4 rows

    plenty = free_for(100)  # on the CPU 1024 tokens a pass are enough; on CUDA the whole batch when it fits
    assert memory.plan(8, row, row, ws, plenty, torch.device("cpu"), None, 1024).micro_batch == 1
    assert memory.plan(8, row, row, ws, plenty, torch.device("cpu"), None, 256).micro_batch == 4
    assert memory.plan(8, row, row, ws, int(plenty * memory.FRACTION["cpu"] / memory.FRACTION["cuda"]), torch.device("cuda"), None, 1024).micro_batch == 8
    p = memory.plan(8, row, row // 10, ws, free_for(0), torch.device("cpu"), None, 64)  # one row does not fit: checkpointing
    assert p.checkpointing and p.micro_batch >= 1
    with pytest.raises(memory.TrainMemoryError, match=r"--seq-len 64 needs about .* lower --seq-len"):
        memory.plan(8, row, row, ws, free_for(0), torch.device("cpu"), False, 64)


def test_out_of_memory_halves_the_micro_batch(llama_split, reference, tmp_path, monkeypatch):
    real = step.Runner.ce_sum

    def ce_sum(self, rows):
        if len(rows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, rows)

    monkeypatch.setattr(step.Runner, "ce_sum", ce_sum)
    s = train_files(llama_split, DATA, tmp_path / "o", TrainOptions(micro_batch=4, **FAST))
    assert s["micro_batch"] == 1
    events = [x for x in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) if x.get("event") == "out_of_memory"]
    assert [e["micro_batch"] for e in events] == [2, 1] and "Tried to allocate" in events[0]["error"]
    _close(tmp_path / "o", reference)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_packed_example_equals_the_example_alone(tiny, model):
    """fp32: example B packed after example A in one row gives B's logits as B alone does; without
    the restarting position ids it does not (so the check has teeth)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny[model], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 300, (11,), generator=g).tolist(), torch.randint(3, 300, (13,), generator=g).tolist()
    p = pack([(a, [IGNORE] + a[1:]), (b, [IGNORE] + b[1:])], 32, 1)
    assert p.position_ids[0].tolist() == list(range(11)) + list(range(13)) + list(range(8))
    assert step.packing_supported(m)
    with torch.no_grad():
        packed = m(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits[0, 11:24]
        alone = m(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        leaky = m(input_ids=p.input_ids, use_cache=False).logits[0, 11:24]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3


def test_positions_restart_at_rows_and_examples():
    p = pack([(list(range(5, 15)), [IGNORE] + list(range(6, 15))), ([7, 8, 9], [IGNORE, 8, 9])], 4, 0)
    assert p.position_ids.flatten().tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1, 0, 0, 1, 2]  # rows of 4: 10 tokens, 3 tokens, 3 pads


def test_softcap_and_scale_heads(tmp_path):
    """Gemma 2's final logit soft-capping is applied (verified against the model's own logits and
    giving the full-logit loss); a head whose logits differ from what the config says is refused."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 12))
    cap = HeadCapture(m)
    assert cap.head.softcap == 0.5
    cap.verify(ids[:1], step.autocast(torch.device("cpu")))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    with cap:
        m(input_ids=ids, use_cache=False)
        ours = cap.ce_sum(labels, "chunked")
    ref = F.cross_entropy(m(input_ids=ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=1), dtype=torch.float32)
    llama.config.logit_scale = 2.0  # a scale this architecture does not apply
    with pytest.raises(UsageError, match="--loss full"):
        HeadCapture(llama).verify(ids[:1], step.autocast(torch.device("cpu")))


def test_data_through_datasets(tmp_path, monkeypatch):
    """parquet, a JSON array and a mapped JSONL give the same records as the JSONL file; without
    the datasets library JSONL still works and the others say what to install."""
    import pandas as pd

    recs = [r for _, r in load_records(DATA)]
    pd.DataFrame({"question": [r["prompt"] for r in recs], "answer": [r["completion"] for r in recs]}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"q": r["prompt"], "a": r["completion"]}) + "\n" for r in recs))
    cols = parse_columns("prompt=question,completion=answer")
    assert [r for _, r in load_records(tmp_path / "d.parquet", columns=cols)] == recs
    assert [r for _, r in load_records(tmp_path / "d.json")] == recs
    assert [r for _, r in load_records(tmp_path / "m.jsonl", columns={"prompt": "q", "completion": "a"})] == recs
    with pytest.raises(DataError, match="no column 'query'"):
        load_records(tmp_path / "d.parquet", columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(DataError, match="row 1: keys"):
        load_records(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="FIELD=COLUMN"):
        parse_columns("prompt:question")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    assert len(load_records(DATA)) == len(recs)
    with pytest.raises(DataError, match=r"pip install 'surgeon-train\[datasets\]'"):
        load_records(tmp_path / "d.parquet")


def test_cli_shows_the_micro_batch_and_refuses_cuda_only_losses(llama_split, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli import build_app

    args = ["train", str(llama_split), "--data", str(DATA), "--steps", "1", "--seq-len", "32", "--batch-size", "4"]
    r = CliRunner().invoke(build_app(), args + ["--micro-batch", "2", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "micro 2" in r.output  # on the progress bar
    r = CliRunner().invoke(build_app(), args + ["--loss", "liger", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "CUDA only" in r.output and "--loss chunked" in r.output
