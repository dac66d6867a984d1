"""Issue 25's measures (protocol v2), kept per item so the report can bootstrap them.

  gen_nll     per window (WINDOW tokens, never across two documents) mean next-token NLL on the
              general text (bench/eval/general/general_text.jsonl, ≈ 61k SmolLM2 tokens, 44 documents):
              forgetting = the mean over windows of (run − untrained), a paired log-perplexity change
  chat_nll    per probe, mean NLL of its reference answer in the chat format (user question →
              assistant answer): forgetting on chat-formatted general prompts
  probe_bits  per probe, 1 when the greedy answer holds one of the probe's keywords (probes.tsv)
  test/val    per task: accuracy, loss, and (test) one character per item, "1" correct / "0" not,
              so that arms compare item by item; "forced": how many items one teacher-forced pass
              settled (greedy decoding would write exactly the completion and stop), the others generated

    ev = Evaluator2(model_dir, "cuda", make_tasks(..., version="v2"), seq_len=256, gen_batch=256)
    ev.measure(model, ["add", "reverse", "lookup"], ("val", "test"))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.eval import tasks as T
from bench.eval.measure import Evaluator, autocast

GENERAL = Path(__file__).with_name("general")
WINDOW = 256


def general_docs() -> list[dict]:
    return [json.loads(x) for x in (GENERAL / "general_text.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def probes() -> list[tuple[str, tuple[str, ...], str]]:
    """(question, keywords, reference answer) of bench/eval/general/probes.tsv."""
    out = []
    for line in (GENERAL / "probes.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            q, kw, ans = line.split("\t")
            out.append((q, tuple(k.strip().lower() for k in kw.split(",")), ans))
    return out


def keyword_hit(answer: str, keys: tuple[str, ...]) -> bool:
    words = T.normalize(answer).replace(",", " ").replace(".", " ").split()
    return any(k in words for k in keys)


def windows(tok, docs: list[dict], width: int = WINDOW, max_tokens: int | None = None) -> torch.Tensor:
    """(N, width) token windows, each inside one document (a document's tail shorter than width is dropped)."""
    rows, n = [], 0
    for d in docs:
        ids = tok(d["text"], add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - width + 1, width):
            if max_tokens is not None and n + width > max_tokens:
                return torch.tensor(rows)
            rows.append(ids[i : i + width])
            n += width
    return torch.tensor(rows)


# generation-config fields that change which token greedy decoding picks (their "off" values)
GREEDY_CHANGERS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []),
                   "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []), "min_new_tokens": (None, 0), "min_length": (None, 0),
                   "sequence_bias": (None, {}), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                   "exponential_decay_length_penalty": (None,), "encoder_no_repeat_ngram_size": (None, 0)}


def greedy_changed(gc) -> bool:
    """Whether `generate` under this generation config picks other tokens than a plain argmax."""
    return any(getattr(gc, k, None) not in off for k, off in GREEDY_CHANGERS.items())


class Evaluator2(Evaluator):
    def __init__(self, model_dir: Path, device: str, data: dict, seq_len: int, gen_batch: int = 256, n_probes: int | None = None,
                 gen_tokens: int | None = None, nll_batch: int = 8, force: bool = True):
        super().__init__(model_dir, device, data, seq_len, 512, gen_batch, n_probes=0)
        # settle rows by a teacher-forced pass first (answers), on CUDA: there decoding is a launch-bound step per
        # token and the pass one forward; on the CPU the pass costs what the prompt's prefill costs, about all
        # of generating a short answer (bench/eval/bench_forced.py), so every row is generated
        self.force = force and device.startswith("cuda")
        # a settled token must beat the runner-up by this much: a bf16 forward and bf16 decoding with a KV cache
        # round differently, so a near-tie could go either way (float32: a tie only)
        self.margin = 1.0 if device.startswith("cuda") else 1e-4
        self.probe_set = probes()[:n_probes]
        self.gen_windows = windows(self.tok, general_docs(), WINDOW, gen_tokens)
        self.nll_batch = nll_batch

    @torch.no_grad()
    def window_nll(self, model) -> list[float]:
        out = []
        for i in range(0, len(self.gen_windows), self.nll_batch):
            x = self.gen_windows[i : i + self.nll_batch].to(self.device)
            with autocast(self.device):
                logits = model(input_ids=x).logits
            ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")  # (B, W-1)
            out += ce.mean(1).tolist()
        return out

    def _chat(self, q: str, a: str | None) -> str:
        if getattr(self.tok, "chat_template", None):
            msgs = [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a is not None else [])
            return self.tok.apply_chat_template(msgs, add_generation_prompt=a is None, tokenize=False)
        return q + "\n" + (a or "")

    @torch.no_grad()
    def chat_nll(self, model) -> list[float]:
        """Per probe: mean NLL of the reference answer's tokens after the chat-formatted question."""
        out = []
        for i in range(0, len(self.probe_set), self.nll_batch * 4):
            rows, masks = [], []
            for q, _, a in self.probe_set[i : i + self.nll_batch * 4]:
                p = self.tok(self._chat(q, None), add_special_tokens=False)["input_ids"]
                full = p + self.tok(a, add_special_tokens=False)["input_ids"]
                rows.append(full)
                masks.append([0] * len(p) + [1] * (len(full) - len(p)))
            w = max(map(len, rows))
            pad = self.tok.pad_token_id
            x = torch.tensor([r + [pad] * (w - len(r)) for r in rows], device=self.device)
            m = torch.tensor([k + [0] * (w - len(k)) for k in masks], device=self.device, dtype=torch.float32)
            with autocast(self.device):
                logits = model(input_ids=x, attention_mask=(torch.arange(w, device=self.device)[None] < torch.tensor([len(r) for r in rows], device=self.device)[:, None]).long()).logits
            ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none") * m[:, 1:]
            out += (ce.sum(1) / m[:, 1:].sum(1)).tolist()
        return out

    def tasks(self, model, names, split: str = "test", keep_answers: int = 3) -> dict:
        r = {}
        for n in names:
            rows = self.data[n][split]
            ans, forced = self.answers(model, rows, self.max_new[n])
            bits = "".join("1" if T.exact(a, x["completion"]) else "0" for a, x in zip(ans, rows))
            r[n] = {"acc": bits.count("1") / len(rows), "loss": self.loss(model, self.packed[(n, split)]), "n": len(rows),
                    "answers": ans[:keep_answers], "forced": forced}
            if split == "test":
                r[n]["bits"] = bits
        return r

    def answers(self, model, rows: list[dict], max_new: int) -> tuple[list[str], int]:
        """Greedy answers to every row, and how many a teacher-forced pass settled: a row whose forced
        argmax reproduces its completion's tokens and then a stop token is what greedy decoding would
        write (the same logits, position by position), so only the other rows are generated."""
        ids = self.forced(model, rows, max_new) if self.force else [None] * len(rows)
        todo = [i for i, k in enumerate(ids) if k is None]
        gen = self.generate(model, [rows[i]["prompt"] for i in todo], max_new) if todo else []
        ans = [self.tok.decode(k, skip_special_tokens=True).strip() if k is not None else "" for k in ids]  # as generate decodes
        for i, a in zip(todo, gen):
            ans[i] = a
        return ans, len(rows) - len(todo)

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids exactly as `generate` feeds them (Evaluator.encode)."""
        return self.encode([prompt])["input_ids"][0]

    @torch.no_grad()
    def forced(self, model, rows: list[dict], max_new: int) -> list[list[int] | None]:
        """Per row: the ids greedy decoding would write, when they are its completion's tokens and a stop
        token, each chosen by at least `margin` over the runner-up (None otherwise: the row is generated).
        Nothing is settled when the model has no stop token or its generation config changes greedy
        choices (repetition penalty, banned or suppressed tokens, a minimum length: generate applies
        them, a plain argmax does not)."""
        gc = model.generation_config
        stop = set(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]) - {None}
        if not stop or greedy_changed(gc):
            return [None] * len(rows)
        out: list[list[int] | None] = []
        for i in range(0, len(rows), self.gen_batch):
            chunk = rows[i : i + self.gen_batch]
            prompts = [self._prompt_ids(x["prompt"]) for x in chunk]
            comps = [self.tok(x["completion"], add_special_tokens=False)["input_ids"] for x in chunk]
            first, top, ids = self._top2(model, prompts, comps)
            for j, (p, c) in enumerate(zip(prompts, comps)):
                span = slice(len(p) - 1 - first, len(p) + len(c) - first)  # the predictions of every completion token, then of the one after
                got, gap = ids[j, span, 0].tolist(), top[j, span, 0] - top[j, span, 1]
                ok = got[:-1] == c and got[-1] in stop and len(c) < max_new and bool((gap > self.margin).all())
                out.append(c + got[-1:] if ok else None)
        return out

    def _top2(self, model, prompts: list[list[int]], comps: list[list[int]]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(first, top-2 logits (B, w - first, 2) float32, their ids) from position `first` on, of one forward
        over prompt + completion padded on the right (every row at positions 0.., as generate's left padding
        with position ids from the mask); the mixture's routers pool the prompt only (Routing.prompt_mask)."""
        seqs = [p + c for p, c in zip(prompts, comps)]
        w = max(map(len, seqs))
        x = torch.tensor([q + [self.tok.pad_token_id] * (w - len(q)) for q in seqs], device=self.device)
        mask = (torch.arange(w)[None] < torch.tensor([len(q) for q in seqs])[:, None]).long().to(self.device)
        first = min(map(len, prompts)) - 1  # the head runs from the first position any row's answer needs
        routing = getattr(model, "surgeon_routing", None)
        if routing is not None:
            routing.prompt_mask = torch.arange(w)[None] < torch.tensor([len(p) for p in prompts])[:, None]
        try:
            with autocast(self.device):
                logits = model(input_ids=x, attention_mask=mask, use_cache=False, logits_to_keep=torch.arange(first, w, device=self.device)).logits
            top = logits.float().topk(2, dim=-1)
        finally:
            if routing is not None:
                routing.prompt_mask = None
        return first, top.values.cpu(), top.indices.cpu()


    def measure(self, model, names, splits=("test",)) -> dict:
        model.eval()
        r = {s: self.tasks(model, names, s) for s in splits}
        ans = self.generate(model, [q for q, _, _ in self.probe_set], 24)
        r["probe_bits"] = "".join("1" if keyword_hit(a, k) else "0" for a, (_, k, _) in zip(ans, self.probe_set))
        r["probe_answers"] = ans[:10]
        r["gen_nll"] = [round(x, 5) for x in self.window_nll(model)]
        r["chat_nll"] = [round(x, 5) for x in self.chat_nll(model)]
        return r
