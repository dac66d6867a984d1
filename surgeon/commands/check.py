"""How closely a split (trained or not) follows the model it was split from, measured on text.

    surgeon check split-dir [--data FILE] [--tokens 256] [--json]

1. The original: the source files the manifest records, read only where they are, each tensor checked
   against its content hash from split time; transformers loads them through a view folder (the
   split's config.json without quantization settings, the weight files linked, an index written
   for several shards), so nothing is read outside the recorded files and nothing is written there.
2. The text: a built-in English sample, or --data (JSONL in any format `surgeon train` accepts,
   surgeon/records.py, or a .txt file), tokenized with the split's tokenizer and cut into windows no
   longer than the model's context.
3. Both models run in float32 on the CPU on the same windows, one decoder block at a time
   (surgeon.runtime.streamed): only one block and the modules outside the blocks are in memory at
   once, the original read from its recorded files, the split from its residual with its factors
   attached as load_split attaches them; the logits are bit-identical to those of the whole loaded
   model. A model the block runner cannot load (a checkpoint tensor transformers converts) or run
   (its forward changes the states between blocks, or fails block by block) and a 4-bit residual are
   loaded whole instead; "ran" in the result says which way each model ran, and why. Before a model
   is loaded, what it will hold (the largest block with its read-ahead and the modules outside the
   blocks in float32, or the whole model) plus both sets of logits is compared with the host memory
   that is free (surgeon.runtime.memory): a model that cannot fit is refused with the numbers,
   rather than killed by the kernel halfway through.
4. Reported: top-1 agreement of the next-token predictions, perplexity of each and their ratio
   (split / original), max and mean |Δlogit| over every position and vocabulary entry.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from surgeon.commands.absorb import verified_source
from surgeon.errors import HostMemoryError, SourceChangedError, SplitDirError, SurgeonError, UsageError
from surgeon.format.records import DataError, normalize, plain_text
from surgeon.methods.folder import SplitDir
from surgeon.model.skeleton import context_length, not_causal_lm
from surgeon.runtime import load_model_from, load_split, streamed
from surgeon.runtime.memory import host_available

SAMPLE = """The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to build a \
machine that a person could ride without a horse. The first designs had no pedals: the rider sat between two wheels and \
pushed against the ground with both feet. Later, cranks and pedals were fixed to the front wheel, and makers built that \
wheel larger and larger, because one turn of the pedals then carried the rider further. These tall machines were fast \
but dangerous, and a fall from the high seat could be serious. The safety bicycle solved the problem with two wheels of \
equal size and a chain that drove the rear wheel, so the rider sat low and could put a foot on the ground. Air-filled \
tyres followed a few years later and made the ride far more comfortable on rough roads.

Rivers shape the land they cross. Water that falls as rain gathers in small streams, which join to form larger channels \
and finally a river that carries sand, clay and stones towards the sea. Where the ground is steep, the water moves \
quickly and cuts deep valleys; where the land is flat, it slows down, drops what it carries and winds across wide \
plains. Many cities were founded beside rivers, because the water gave people something to drink, a way to travel and \
trade, and fertile soil for their fields. Floods, however, have always been the price of living so close to the water.

A good recipe for bread needs only four things: flour, water, salt and yeast. The yeast feeds on the sugars in the flour \
and releases gas, which is trapped by the dough and makes it rise. Kneading builds the structure that holds the gas, \
and a long, slow rise gives the bread more flavour. Bakers often say that patience matters more than any special tool, \
since the dough will tell you when it is ready if you learn to watch it closely."""


def check(split_dir: Path, data: Path | None = None, tokens: int = 256) -> dict:
    """Compare the split with its original on text; returns the numbers as a dict (see the docstring)."""
    if tokens < 2:
        raise UsageError(f"--tokens {tokens}: give at least 2 tokens to compare.")
    sd = SplitDir(Path(split_dir))
    why = not_causal_lm(json.loads((sd.path / "config.json").read_text()))
    if why:
        raise UsageError(f"surgeon check compares next-token predictions on text, and {why}; compare its outputs on your own inputs "
                         "with surgeon.runtime.load_split(SPLIT).model against the original.")
    text = SAMPLE if data is None else read_text(Path(data))
    windows = _windows(sd, text, tokens)
    how: dict = {}
    ref = original_logits(sd, windows, how)
    got = split_logits(sd, windows, how)
    return {"split": str(sd.path), "original": str(sd.manifest["source"].get("model")),
            "data": "built-in sample" if data is None else str(data), **compare(ref, got, windows),
            "ran": {"original": how["original"], "split": how["split"]}}


def read_text(path: Path) -> str:
    """A .txt file as it is, or the text of every JSONL record (any format `surgeon train` takes)."""
    if not path.is_file():
        raise DataError(f"--data {path} does not exist (or is not a file); give a .txt or .jsonl file.")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                raise DataError(f"{path}, line {lineno}: not valid JSON; give one JSON object per line.") from None
            texts.append(plain_text(normalize(obj, f"{path}, line {lineno}")))
    return "\n\n".join(texts)


def _windows(sd: SplitDir, text: str, tokens: int) -> list[torch.Tensor]:
    """The first `tokens` ids of `text`, in windows no longer than the model's context: [(1, L)]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sd.path)
    ids = list(tok(text)["input_ids"])[:tokens]
    if len(ids) < 2:
        raise DataError(f"the text gives {len(ids)} token(s); give --data with more text.")
    conf = json.loads((sd.path / "config.json").read_text())
    size = max(2, min(context_length(conf) or 512, 512))
    return [torch.tensor([ids[i : i + size]]) for i in range(0, len(ids), size) if len(ids[i : i + size]) >= 2]


def original_logits(sd: SplitDir, windows: list[torch.Tensor], how: dict) -> list[torch.Tensor]:
    """The source model's logits on `windows`: block by block where it can, else loaded whole; refused
    up front when what it holds at once and both sets of logits cannot fit in free memory. how["original"]
    says which way it ran (and why not block by block)."""
    ckpt, conf = verified_original(sd)
    tokens, vocab, factors = sum(w.shape[1] for w in windows), _vocab(conf), sd.factors_file.stat().st_size
    how["numel"] = sum(info.numel for info in ckpt.tensors.values())
    run, why = _runner(lambda: streamed.original_runner(conf, ckpt))
    if run is not None:
        fits_in_memory(run.working_bytes(), tokens, vocab, extra=factors)
        try:
            how["original"] = "block by block"
            return streamed.original_logits(run, windows)
        except SurgeonError as e:  # a forward the block runner does not reproduce: the whole model gives the right numbers
            why = str(e)
    how["original"] = f"whole model ({why})"
    fits_in_memory(4 * how["numel"], tokens, vocab, extra=factors)
    return _logits(_load_whole(ckpt, conf), windows)


def split_logits(sd: SplitDir, windows: list[torch.Tensor], how: dict) -> list[torch.Tensor]:
    """The split's logits on `windows`: block by block where it can, else loaded whole (a 4-bit residual)."""
    why = "a 4-bit residual"
    if not sd.manifest.get("quantization"):
        got, why = _runner(lambda: streamed.split_runner(sd))
        if got is not None:
            try:
                how["split"] = "block by block"
                return streamed.split_logits(*got, windows)
            except SurgeonError as e:
                why = str(e)
    how["split"] = f"whole model ({why})"
    fits_in_memory(4 * how["numel"], sum(w.shape[1] for w in windows), 0)  # the original's logits are already held
    return _logits(load_split(sd.path, dtype=torch.float32, trainable=False).model, windows)


def _runner(make):
    """(make()'s block runner, or (runner, ...), "") or (None, why) for a model the block runner cannot
    load: no skeleton, no list of blocks, or a checkpoint tensor transformers converts."""
    try:
        got = make()
    except UsageError as e:
        return None, str(e)
    run = got[0] if isinstance(got, tuple) else got
    return (got, "") if run.streamable() else (None, "a checkpoint tensor transformers converts")


def verified_original(sd: SplitDir):
    """(the source's checkpoint, each tensor verified by its content hash; the split's config without
    quantization settings), refused when a source file is gone or changed."""
    if sd.missing_source_files():
        raise SplitDirError(f"the source file {sd.missing_source_files()[0]} recorded in {sd.path} is gone; restore it to check the split against it.")
    if sd.manifest["source"].get("pickled"):
        raise UsageError("check compares against safetensors sources only; this split was made from pickled weights.")
    try:
        ckpt = verified_source(sd)
    except SourceChangedError as e:
        raise SourceChangedError(f"{str(e).split('; ')[0]}; check compares against the original as it was split: restore it.") from None
    hashes = sd.source_hashes()
    for info, _ in ckpt.stream(list(ckpt.tensors), digest=True):
        got = ckpt.digests.pop(info.name)
        if hashes and got != hashes.get(info.name):
            raise SourceChangedError(f"the source tensor {info.name} changed since the split (content hash {got} ≠ {hashes.get(info.name)}); "
                                     "check compares against the original as it was split: restore it.")
    conf = json.loads((sd.path / "config.json").read_text())
    conf.pop("quantization_config", None)
    return ckpt, conf


def _load_whole(ckpt, conf: dict) -> torch.nn.Module:
    """The source model as split, whole, in float32, through transformers: a view folder of the
    verified source files, read where they are."""
    with tempfile.TemporaryDirectory(prefix="surgeon-check-") as view:
        v = Path(view)
        (v / "config.json").write_text(json.dumps(conf))
        shards = sorted({info.file for info in ckpt.tensors.values()})  # the verified source files, read where they are
        view = {"config.json": v / "config.json"}
        if len(shards) == 1:
            view["model.safetensors"] = shards[0].resolve()
        else:
            view |= {f.name: f.resolve() for f in shards}
            index = {"metadata": {}, "weight_map": {n: info.file.name for n, info in ckpt.tensors.items()}}
            (v / "model.safetensors.index.json").write_text(json.dumps(index))
            view["model.safetensors.index.json"] = v / "model.safetensors.index.json"
        return load_model_from(view, torch.float32)


def _vocab(conf: dict) -> int:
    text = conf.get("text_config") if isinstance(conf.get("text_config"), dict) else {}
    return int(conf.get("vocab_size") or text.get("vocab_size") or 0)


def fits_in_memory(nbytes: int, tokens: int, vocab: int, extra: int = 0) -> None:
    """Raise HostMemoryError when `nbytes` of model, two (tokens, vocab) float32 logit sets and `extra`
    bytes cannot fit in the host memory that is free: the lower bound of what check holds."""
    need = nbytes + 2 * 4 * tokens * vocab + extra
    free = host_available()
    if need > free:
        gib = 2**30
        raise HostMemoryError(f"surgeon check runs the model in float32 on the CPU: it needs at least {need / gib:.1f} GiB "
                              f"and {free / gib:.1f} GiB of host memory are free; run it on a machine with more free memory.")


@torch.no_grad()
def _logits(model: torch.nn.Module, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    out = [model(input_ids=w).logits[0].float() for w in windows]  # (L, vocab) each
    del model
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], windows: list[torch.Tensor]) -> dict:
    """Top-1 agreement, perplexities and |Δlogit| of two models' logits on the same windows."""
    agree = n = 0
    nll_ref = nll_got = 0.0
    dmax, dsum, dcount = 0.0, 0.0, 0
    for r, g, w in zip(ref, got, windows):
        target = w[0, 1:]  # (L-1,) the next tokens
        agree += int((r[:-1].argmax(-1) == g[:-1].argmax(-1)).sum())
        n += target.numel()
        nll_ref += float(torch.nn.functional.cross_entropy(r[:-1].double(), target, reduction="sum"))
        nll_got += float(torch.nn.functional.cross_entropy(g[:-1].double(), target, reduction="sum"))
        d = (r - g).abs()  # (L, vocab)
        dmax, dsum, dcount = max(dmax, float(d.max())), dsum + float(d.double().sum()), dcount + d.numel()
    ppl_ref, ppl_got = math.exp(nll_ref / n), math.exp(nll_got / n)
    return {"tokens": n, "top1_agreement": agree / n, "perplexity_original": ppl_ref, "perplexity_split": ppl_got,
            "perplexity_ratio": ppl_got / ppl_ref, "max_abs_logit_diff": dmax, "mean_abs_logit_diff": dsum / dcount}


def one_line(r: dict) -> str:
    """The result as one line for people."""
    return (f"{r['split']} vs {r['original']} on {r['tokens']} tokens ({r['data']}): top-1 agreement {100 * r['top1_agreement']:.1f}%, "
            f"perplexity {r['perplexity_split']:.4g} vs {r['perplexity_original']:.4g} (ratio {r['perplexity_ratio']:.4g}), "
            f"max |Δlogit| {r['max_abs_logit_diff']:.3g}, mean {r['mean_abs_logit_diff']:.3g}")
