"""What every run is measured with: task exact-match accuracy and loss, general-text perplexity, probes.

One Evaluator per worker process: it holds the tokenizer, the packed data of every task and split,
the perplexity windows and the probe prompts, so each job only loads its model.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

import torch

from bench.eval import probes
from bench.eval import tasks as T


def autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_dtype(device: str) -> torch.dtype:
    """The trainer's: bf16 frozen base on CUDA, float32 on CPU (evaluation sees the model that trained)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def concat(parts):
    from surgeon_train.data import Packed

    return Packed(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]))


class Evaluator:
    def __init__(self, model_dir: Path, device: str, data: dict, seq_len: int, ppl_tokens: int, gen_batch: int = 128, n_probes: int | None = None):
        from surgeon_train.data import Packed, load_packed
        from transformers import AutoTokenizer

        self.device, self.gen_batch, self.data = device, gen_batch, data
        self.probe_q = [q for q, _ in probes.PROBES][:n_probes]
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        if self.tok.pad_token is None:  # the GGUF conversion on the GPU machine keeps no pad token
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        with tempfile.TemporaryDirectory(prefix="eval17-data-") as tmp:
            # every task and split packed on its own (rows never mix tasks: a moe router sees one task per row)
            self.packed = {(n, s): load_packed(T.write_jsonl(rows, Path(tmp) / f"{n}-{s}.jsonl"), self.tok, seq_len)
                           for n, splits in data.items() for s, rows in splits.items() if rows}
        self.max_new = {n: 4 + max(len(self.tok(r["completion"], add_special_tokens=False)["input_ids"])
                                   for s in data[n].values() for r in s) for n in data}
        text, self.text_sha = probes.general_text()
        ids = self.tok(text, add_special_tokens=False)["input_ids"][:ppl_tokens]
        w = min(2 * seq_len, len(ids))
        ids = ids[: len(ids) // w * w]
        t = torch.tensor(ids).view(-1, w)  # (windows, w)
        self.ppl_data, self.ppl_tokens = Packed(t, t.clone()), len(ids)

    def train_data(self, names):
        return concat([self.packed[(n, "train")] for n in names])

    def encode(self, prompts: list[str], **kw):
        """The prompts as the model is fed them: through the chat template when the tokenizer has one (as
        the trainer renders prompts), else as they are with the tokenizer's special tokens."""
        if getattr(self.tok, "chat_template", None):
            chats = [self.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
            return self.tok(chats, add_special_tokens=False, **kw)
        return self.tok(prompts, add_special_tokens=True, **kw)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], max_new: int) -> list[str]:
        out = []
        for i in range(0, len(prompts), self.gen_batch):
            enc = self.encode(prompts[i : i + self.gen_batch], return_tensors="pt", padding=True).to(self.device)
            with autocast(self.device):
                gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=self.tok.pad_token_id)
            n = enc["input_ids"].shape[1]
            out += [self.tok.decode(g[n:], skip_special_tokens=True).strip() for g in gen]
        return out

    def loss(self, model, packed) -> float:
        from surgeon_train.loop import evaluate

        return evaluate(model, packed, 16)[0]

    def tasks(self, model, names, split: str = "test", keep_answers: int = 5) -> dict:
        r = {}
        for n in names:
            rows = self.data[n][split]
            ans = self.generate(model, [x["prompt"] for x in rows], self.max_new[n])
            r[n] = {"acc": sum(T.exact(a, x["completion"]) for a, x in zip(ans, rows)) / len(rows),
                    "lenient": sum(T.lenient(a, x["completion"]) for a, x in zip(ans, rows)) / len(rows),
                    "loss": self.loss(model, self.packed[(n, split)]), "n": len(rows), "answers": ans[:keep_answers]}
        return r

    def ppl(self, model) -> float:
        return math.exp(self.loss(model, self.ppl_data))

    def probes(self, model) -> list[str]:
        return self.generate(model, self.probe_q, 24)

    def measure(self, model, names, splits=("test",)) -> dict:
        model.eval()
        r = {s: self.tasks(model, names, s) for s in splits}
        r["ppl"] = self.ppl(model)
        r["probe_answers"] = self.probes(model)
        r["probe_correct"] = probes.probe_correct(r["probe_answers"])
        return r


def load_split_model(path: Path, device: str):
    from surgeon.runtime import load_split

    return load_split(path, dtype=model_dtype(device), device=device, trainable=False).model


def load_plain_model(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(device)).to(device)


def dump(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
