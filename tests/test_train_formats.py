"""Training data in the five formats instruction data ships in, with the loss mask checked on token ids (issue 23).

    PYTHONPATH=.:plugins/surgeon-train python -m pytest -q tests/test_train_formats.py
"""

from __future__ import annotations

import json

import pytest
from cliutil import one_error_line, run
from surgeon_train import DataError, TrainOptions, train_files
from surgeon_train.data import IGNORE, tokenize
from surgeon_train.sources import load_records
from transformers import AutoTokenizer

from surgeon.commands.split import SplitOptions, split

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
Q1, A1, Q2, A2 = "What is the capital of Zorblax?", "Quenthar.", "Who founded it?", "Admiral Velis Orrun."
RECORDS = {
    "text": {"text": f"{Q1} {A1}"},
    "prompt-completion": {"prompt": Q1, "completion": A1},
    "alpaca": {"instruction": "Answer the question.", "input": Q1, "output": A1},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                              {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                   {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
}


@pytest.fixture(scope="module")
def chat_split(tiny, tmp_path_factory):
    """A tiny-llama split whose tokenizer has a ChatML template."""
    d = tmp_path_factory.mktemp("fmt") / "split"
    split(str(tiny["tiny-llama"]), d, SplitOptions(method="milora", rank=4))
    (d / "chat_template.jinja").write_text(CHATML)
    return d


def _spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive positions that carry loss, as token ids."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                out.append(cur)
            cur = []
        else:
            assert lab == i  # a label is always the token itself (the shift happens in the loss)
            cur.append(i)
    return out + ([cur] if cur else [])


def _encode(tmp_path, name: str, rec: dict, tok, chat: bool = True):
    f = tmp_path / f"{name}.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    return tokenize(load_records(f), tok, chat, str(f))[0]


@pytest.mark.parametrize("chat", [True, False])
def test_loss_mask_of_every_format_on_token_ids(chat_split, tmp_path, chat):
    tok = AutoTokenizer.from_pretrained(chat_split)
    assert tok.chat_template
    eos = tok.decode([tok.eos_token_id])
    end = "<|im_end|>\n" if chat else eos
    want = {
        "text": None,  # every token but the first
        "prompt-completion": [A1 + end],
        "alpaca": [A1 + end],
        "messages": [A1 + end, A2 + end],  # both assistant turns, neither user turn nor the system prompt
        "sharegpt": [A1 + end, A2 + end],
    }
    for name, rec in RECORDS.items():
        ids, labels = _encode(tmp_path, name, rec, tok, chat)
        assert len(ids) == len(labels) and labels[0] == IGNORE
        if want[name] is None:
            assert labels[1:] == ids[1:]
            continue
        got = [tok.decode(s) for s in _spans(ids, labels)]
        assert got == want[name], name
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
        assert Q1 in masked and A1 not in masked
        if name == "alpaca":
            assert "Answer the question." in masked


@pytest.mark.parametrize("name", list(RECORDS))
def test_train_runs_on_every_format(chat_split, tmp_path, name):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(RECORDS[name]) + "\n" for _ in range(4)))
    s = train_files(chat_split, f, tmp_path / "out", TrainOptions(steps=1, seq_len=64, batch_size=8, lr=1e-3))
    assert s["steps_done"] == 1 and s["final_loss"] > 0


def test_unknown_keys_name_the_formats_and_columns(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as e:
        load_records(f)
    msg = str(e.value)
    assert "['answer', 'question']" in msg and "--columns" in msg and "messages" in msg and "instruction" in msg
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant turn"):
        load_records(f)


def test_few_steps_say_so(chat_split, tmp_path):
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n" for i in range(10)))
    r = run("train", chat_split, "--data", data, "--out", tmp_path / "t", "--seq-len", "128", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "only 1 optimizer step;" in r.output and "--steps" in r.output
    r = run("train", chat_split, "--data", data, "--out", tmp_path / "t2", "--seq-len", "64", "--steps", "2")
    assert r.exit_code == 0 and "warning:" not in r.output


def test_train_error_for_alpaca_like_keys_is_one_line(chat_split, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "response": "a"}) + "\n")
    assert "--columns" in one_error_line(run("train", chat_split, "--data", f, "--out", tmp_path / "o"))


def test_start_up_steps_are_reported_before_the_first_step(chat_split, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(RECORDS["messages"]) + "\n" for _ in range(4)))
    events = []
    train_files(chat_split, f, tmp_path / "out", TrainOptions(steps=1, seq_len=64, batch_size=2), callback=lambda e, i: events.append((e, i)))
    phases = [i["name"] for e, i in events if e == "phase"]
    assert [e for e, _ in events][: len(phases)] == ["phase"] * len(phases)  # all before "start"
    assert phases[0].startswith("reading and packing") and phases[1].startswith("loading") and "memory" in phases[2]


def test_format_can_be_forced(chat_split, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ignored", "prompt": Q1, "completion": A1}) + "\n")
    assert load_records(f)[0][1] == {"text": "ignored"}  # detected: text comes first
    assert load_records(f, fmt="prompt-completion")[0][1] == {"prompt": Q1, "completion": A1}
    with pytest.raises(DataError, match="no 'instruction'"):
        load_records(f, fmt="alpaca")
    r = run("train", chat_split, "--data", f, "--out", tmp_path / "o", "--format", "chat")
    assert r.exit_code == 2 and "--format 'chat'" in one_error_line(r) and "messages" in r.output
    r = run("train", chat_split, "--data", f, "--out", tmp_path / "o", "--format", "prompt-completion", "--steps", "1", "--seq-len", "32")
    assert r.exit_code == 0, r.output


def test_a_template_that_is_not_prefix_stable_learns_the_last_answer(chat_split, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_split)
    tok.chat_template = "turns={{ messages|length }}\n" + CHATML  # the header changes with every turn added
    ids, labels = _encode(tmp_path, "m", RECORDS["messages"], tok)
    eos = tok.decode([tok.eos_token_id])
    assert [tok.decode(s) for s in _spans(ids, labels)] == [A2 + eos]


@pytest.mark.real_model
def test_smollm2_chat_template_masks_all_but_the_assistant_turns(smollm2, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids, labels = _encode(tmp_path, "m", RECORDS["messages"], tok)
    assert [tok.decode(s) for s in _spans(ids, labels)] == [A1 + "<|im_end|>\n", A2 + "<|im_end|>\n"]
    ids, labels = _encode(tmp_path, "s", RECORDS["sharegpt"], tok)  # no system turn: the template adds its own, masked
    assert [tok.decode(s) for s in _spans(ids, labels)] == [A1 + "<|im_end|>\n", A2 + "<|im_end|>\n"]
    assert "SmolLM" in tok.decode(ids)
