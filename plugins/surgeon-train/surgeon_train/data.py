"""Training data: JSONL → token ids with a loss mask → rows packed to --seq-len.

    {"text": "..."}                              loss on every token (but the first of each example)
    {"prompt": "...", "completion": "..."}       loss on the completion only
    {"messages": [{"role", "content"}, ...]}     chat: loss on the assistant turns only
    {"instruction", "input", "output"}           alpaca: a prompt-completion pair (loss on the output)
    {"conversations": [{"from", "value"}, ...]}  sharegpt: chat, as messages

The format is detected from each record's keys (surgeon/records.py, shared with `surgeon check`).
Chat records go through the tokenizer's chat template: the conversation is rendered once, and each
assistant turn's tokens are found as the difference between the rendering up to that turn and the
rendering before it with the generation prompt, so the loss covers exactly what the assistant says
(and the template's end-of-turn tokens). Without a template, turns are joined by newlines and each
assistant turn ends with EOS.

Prompt/completion pairs go through the tokenizer's chat template when it has one (the prompt as the
user turn with the generation prompt, the completion as the assistant turn), as TRL's SFTTrainer
does for conversational prompt-completion data; otherwise prompt + completion + EOS. Packing follows
transformers' run_clm.py `group_texts` (concatenate everything, cut into rows of seq_len) with two
changes: the last partial row is padded (loss-masked) instead of dropped, so a small set is not lost,
and the first token of every example carries no loss, so no example learns to predict its neighbour.

Examples are kept apart inside a row by position ids that restart at 0 at every example (and at every
row, so a long example cut across rows restarts too and no position reaches --seq-len): transformers
(≥ 4.53, masking_utils.find_packed_sequence_indices) turns position ids that restart into a
block-diagonal causal mask when no attention mask is given, for its eager, sdpa and flex attention,
and its flash-attention path reads them as varlen boundaries. A packed example therefore gives the
same logits as the example alone (tests/test_train_fast.py checks it).

--data also takes a local .json/.parquet/.csv file or folder, or a Hugging Face dataset id, through
the `datasets` library (surgeon_train.sources; `pip install 'surgeon-train[datasets]'`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from surgeon.format.datafiles import load_jsonl
from surgeon.format.records import FORMAT_HINT, DataError

IGNORE = -100  # the label of a position without loss (torch's cross_entropy ignore_index)
__all__ = ["IGNORE", "FORMAT_HINT", "DataError", "Packed", "load_jsonl", "load_packed", "pack", "tokenize"]


def _ids(enc) -> list[int]:
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)


def tokenize(records: list[tuple[int, dict]], tok, chat_template: bool = True, source: str = "data") -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per record; labels are IGNORE where no loss is taken."""
    use_chat = chat_template and bool(getattr(tok, "chat_template", None))
    eos = tok.eos_token_id
    out = []
    for lineno, r in records:
        if "messages" in r:
            ids, labels = _chat(tok, r["messages"], use_chat, eos)
        else:
            if "text" in r:
                ids = _ids(tok(r["text"], add_special_tokens=True))
                if eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)
                n_prompt = 1  # the first token has nothing to be predicted from within its example
            else:
                ids, n_prompt = _pair(tok, r["prompt"], r["completion"], use_chat, eos)
            labels = [IGNORE] * n_prompt + ids[n_prompt:]
        if all(x == IGNORE for x in labels[1:]):
            raise DataError(f"{source}, line {lineno}: the example has no token to learn after tokenisation.")
        labels[0] = IGNORE  # the first token has nothing to be predicted from within its example
        out.append((ids, labels))
    return out


def _chat(tok, turns: list[dict], use_chat: bool, eos: int | None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: labels are the ids on the assistant turns, IGNORE elsewhere."""
    if not use_chat:
        return _plain_chat(tok, turns, eos)
    def render(msgs, gen=False):
        return _ids(tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True))
    ids = render(turns)
    labels = [IGNORE] * len(ids)
    for i, t in enumerate(turns):
        if t["role"] != "assistant":
            continue
        before, upto = (render(turns[:i], gen=True) if i else []), render(turns[: i + 1])
        if ids[: len(upto)] != upto or upto[: len(before)] != before:
            # a template that renders earlier turns differently once more follow: the last answer only
            return _pair_ids(tok, turns, eos)
        labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
    return ids, labels


def _pair_ids(tok, turns: list[dict], eos: int | None) -> tuple[list[int], list[int]]:
    """Fallback: everything before the last assistant turn as the prompt, that turn as the completion."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    p = _ids(tok.apply_chat_template(turns[:last], add_generation_prompt=True, tokenize=True, return_dict=True)) if last else []
    c = _ids(tok(turns[last]["content"], add_special_tokens=False))
    ids = p + c + ([eos] if eos is not None else [])
    return ids, [IGNORE] * len(p) + ids[len(p) :]


def _plain_chat(tok, turns: list[dict], eos: int | None) -> tuple[list[int], list[int]]:
    """No chat template: turns joined by newlines, each assistant turn closed by EOS and learned."""
    ids: list[int] = list(_ids(tok("", add_special_tokens=True)))
    labels = [IGNORE] * len(ids)
    for t in turns:
        if t["role"] == "assistant":
            part = _ids(tok(t["content"], add_special_tokens=False)) + ([eos] if eos is not None else [])
            ids, labels = ids + part, labels + part
        else:
            part = _ids(tok(t["content"] + "\n", add_special_tokens=False))
            ids, labels = ids + part, labels + [IGNORE] * len(part)
    return ids, labels


def _pair(tok, prompt: str, completion: str, use_chat: bool, eos: int | None) -> tuple[list[int], int]:
    if use_chat:
        user = [{"role": "user", "content": prompt}]
        p = _ids(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True))
        full = _ids(tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=True, return_dict=True))
        if full[: len(p)] == p:
            return full, len(p)
        # a template that renders the prompt differently once an answer follows: append the answer
        c = _ids(tok(completion, add_special_tokens=False))
        return p + c + ([eos] if eos is not None else []), len(p)
    p = _ids(tok(prompt, add_special_tokens=True))
    c = _ids(tok(completion, add_special_tokens=False))
    return p + c + ([eos] if eos is not None else []), len(p)


@dataclass
class Packed:
    """Rows of packed training data: input_ids and labels, both (rows, seq_len) int64."""

    input_ids: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N, L), IGNORE where no loss
    position_ids: torch.Tensor | None = None  # (N, L), restarting at each example; None: each row is one sequence

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def loss_tokens(self) -> torch.Tensor:
        """(N,) positions per row whose next token carries loss (labels are shifted by one)."""
        return (self.labels[:, 1:] != IGNORE).sum(1)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        if self.position_ids is not None:
            h.update(self.position_ids.numpy().tobytes())
        return h.hexdigest()[:16]


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Packed:
    """Concatenate every example and cut into rows of seq_len; the last row is padded with pad_id
    (labels IGNORE). Padding is on the right of a causal model, so no real token attends to it."""
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: need at least 2 tokens per row.")
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    if not any(x != IGNORE for x in labels[1:]):
        raise DataError("no token of the data carries loss (every completion is empty?).")
    rows = math.ceil(len(ids) / seq_len)
    pad = rows * seq_len - len(ids)
    t_ids = torch.tensor(ids + [pad_id] * pad, dtype=torch.long).view(rows, seq_len)
    t_lab = torch.tensor(labels + [IGNORE] * pad, dtype=torch.long).view(rows, seq_len)
    starts = torch.tensor([0] + [len(e[0]) for e in examples], dtype=torch.long).cumsum(0)  # example starts; the padding is one more
    return Packed(t_ids, t_lab, restart_positions(starts, rows * seq_len, seq_len).view(rows, seq_len))


def restart_positions(starts: torch.Tensor, total: int, seq_len: int) -> torch.Tensor:
    """(total,) positions counting from the last start (an example's first token or a row's)."""
    idx = torch.arange(total)
    is_start = idx % seq_len == 0
    is_start[starts[starts < total]] = True
    last = torch.where(is_start, idx, 0).cummax(0).values  # (total,) index of the last start
    return idx - last


def load_packed(path, tok, seq_len: int, chat_template: bool = True, split: str = "train", columns: dict | None = None, fmt: str | None = None) -> Packed:
    """A JSONL file (or, through `datasets`, another file or a Hub dataset) → packed rows."""
    from surgeon_train.sources import load_records

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return pack(tokenize(load_records(path, split, columns, fmt), tok, chat_template, str(path)), seq_len, pad)
