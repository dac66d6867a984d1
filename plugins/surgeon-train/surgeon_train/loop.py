"""The training loop: only the factors learn, the residual base stays frozen and untouched.

    surgeon train SPLIT_DIR --data train.jsonl --out OUT --steps 200 --lr 2e-4

Nothing here knows the method: the model comes from surgeon.runtime.load_split, the trainable
parameters are whatever the method's runtime modules left trainable (factors, a router, gates), and
the method's own loss terms come from SplitModel.extra_loss(), added at every micro-batch (so a term
that depends on the batch, such as a load-balancing loss, is seen on every batch). Choices, after
nanoGPT's train.py and transformers' Trainer where they agree:
  * bf16 autocast on CUDA with the frozen base loaded in bf16 (the factors stay float32, as PEFT's
    autocast_adapter_dtype does); float32 everywhere on CPU.
  * The logits are never materialised: the loss runs on the final hidden states of the labelled
    positions only, through a chunked torch loss (or liger-kernel / cut-cross-entropy where asked:
    surgeon_train.loss); on CUDA the transformer blocks are compiled for runs of
    ≥ speed.COMPILE_MIN_TOKENS tokens, liger's RMSNorm/SwiGLU/RoPE kernels where asked (surgeon_train.speed).
  * --batch-size rows (× --grad-accum) per step and process run in micro-batches that fit the
    memory that is free, with activation checkpointing only when one row does not fit otherwise
    (surgeon_train.memory, surgeon_train.step); the chosen micro-batch is on the progress bar.
  * Packed examples are kept apart by position ids that restart at each example (surgeon_train.data).
  * AdamW (fused on CUDA), linear warm-up then cosine decay to --min-lr-ratio·lr (transformers'
    get_cosine_schedule_with_warmup, except that warm-up starts at lr/(w+1), not 0, so no step is
    wasted), gradient clipping on the global norm.
  * The loss of a step is the mean over every loss-carrying token of the step's global batch (all
    micro-batches, all ranks), as transformers' Trainer does since 4.46 with num_items_in_batch:
    each micro-batch's summed cross-entropy is divided by the step's token count, known in advance
    from the packed data, so --grad-accum 2 on one process equals 2 processes with --grad-accum 1.
  * Row order: a fresh permutation per epoch from --seed; step s uses rows s·R … s·R+R−1 of that
    stream (R = batch·accum·world), so a resumed run needs nothing but the step count to continue.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from surgeon import options
from surgeon.engine import faults
from surgeon.errors import NumericsError, SplitDirError, UsageError
from surgeon.format.readlock import reads
from surgeon.model.skeleton import not_causal_lm
from surgeon.format.records import FORMATS
from surgeon_train import dist, speed
from surgeon_train.data import IGNORE, Packed, load_packed
from surgeon_train.loss import HeadCapture, resolve, token_ce_sum  # noqa: F401 (token_ce_sum: imported from here by bench/)
from surgeon_train.state import RunDir, check_out
from surgeon_train.step import Runner, autocast, forward_ce, packing_supported

Callback = Callable[[str, dict], None]  # (event: "start" | "step" | "eval", info)


@dataclass
class TrainOptions:
    steps: int | None = None  # optimizer steps; default: --epochs 1
    epochs: float | None = None
    lr: float = 2e-4
    batch_size: int = 4  # rows per step per process (× grad_accum), run in micro-batches
    grad_accum: int = 1
    micro_batch: int | None = None  # rows per forward/backward pass; None: the most that fits in memory
    seq_len: int = 1024
    warmup_steps: int | None = None  # default: 5% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    grad_checkpointing: bool | None = None  # None: only when one row does not fit otherwise
    loss: str = "auto"  # auto, chunked, liger, cce, full (surgeon_train.loss)
    kernels: str = "auto"  # auto (none), liger, none (surgeon_train.speed)
    compile: bool | None = None  # torch.compile the transformer blocks; None: on CUDA for ≥ speed.COMPILE_MIN_TOKENS tokens
    compile_backend: str = "inductor"  # torch.compile's backend (tests: aot_eager, the same path without code generation)
    compile_loss: bool = True  # with compile: the chunked loss's per-chunk softmax and gradient compiled too (loss.compiled_chunk)
    document_mask: bool = True  # packed examples attend only within themselves
    data_split: str = "train"  # split of a `datasets` source
    columns: dict | None = None  # record field -> column of the source ({"prompt": "question"})
    data_format: str | None = None  # force one of surgeon.format.records.FORMATS (default: detected per record)
    seed: int = 0
    save_every: int = 0  # 0: save at the end only
    eval_batch_size: int = 8
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # dtype of the frozen base: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16
    chat_template: bool = True
    resume: bool = False
    overwrite: bool = False


def _check(o: TrainOptions) -> None:
    """Every option, before anything is read or written: numbers through the core's one checker
    (finite, in range: surgeon.options), then the combinations."""
    options.check(
        ("--steps", o.steps, options.COUNT), ("--epochs", o.epochs, options.POSITIVE), ("--lr", o.lr, options.POSITIVE),
        *((f"--{n.replace('_', '-')}", getattr(o, n), options.COUNT) for n in ("batch_size", "grad_accum", "eval_batch_size", "micro_batch")),
        ("--seq-len", o.seq_len, options.Range(2, integer=True)), ("--warmup-steps", o.warmup_steps, options.Range(0, integer=True)),
        ("--min-lr-ratio", o.min_lr_ratio, options.FRACTION), ("--weight-decay", o.weight_decay, options.NON_NEGATIVE),
        ("--max-grad-norm", o.max_grad_norm, options.NON_NEGATIVE), ("--save-every", o.save_every, options.Range(0, integer=True)),
        ("--seed", o.seed, options.Range(0, 2**32 - 1, integer=True)),
    )
    options.device(o.device)
    bad = []
    if o.steps is not None and o.epochs is not None:
        bad.append("give --steps or --epochs, not both")
    if o.resume and o.overwrite:
        bad.append("--resume continues the run in --out, --overwrite discards it: choose one")
    if o.dtype not in ("auto", "float32", "bfloat16", "float16"):
        bad.append(f"--dtype {o.dtype!r}: choose auto, float32, bfloat16 or float16")
    if o.data_format is not None and o.data_format not in FORMATS:
        bad.append(f"--format {o.data_format!r}: choose {', '.join(FORMATS)}")
    if o.compile_backend not in speed.COMPILE_BACKENDS:
        bad.append(f"compile backend {o.compile_backend!r}: choose {', '.join(speed.COMPILE_BACKENDS)}")
    if o.kernels not in speed.KERNELS:
        bad.append(f"--kernels {o.kernels!r}: choose {', '.join(speed.KERNELS)}")
    if bad:
        raise UsageError("; ".join(bad) + ".")


def schedule(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class _Order:
    """Global row stream: epoch e is a permutation of all rows drawn from (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def rows(self, start: int, count: int) -> torch.Tensor:
        g = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for e in g.div(self.n, rounding_mode="floor").unique().tolist():
            if e not in self.perms:
                self.perms = {k: v for k, v in self.perms.items() if k >= e - 1}
                self.perms[e] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
            sel = g.div(self.n, rounding_mode="floor") == e
            out[sel] = self.perms[e][g[sel] % self.n]
        return out


_autocast = autocast  # the name bench/ scripts import


def _base_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Packed, batch_size: int = 8, d: dist.Dist | None = None, loss: str = "auto") -> tuple[float, int]:
    """Mean cross-entropy per loss-carrying token over all rows (split across ranks), and the count;
    without the full logits where the model's head allows (else through them)."""
    d = d or dist.Dist(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with speed.eager():  # compiled blocks: no new graphs (no grad, another batch) for one pass
        acc = _eval_sums(model, data, batch_size, d, loss)
    dist.sum_(acc, d)
    model.train(was_training)
    return (acc[0] / acc[1].clamp(min=1)).item(), int(acc[1].item())


def _eval_sums(model: torch.nn.Module, data: Packed, batch_size: int, d: dist.Dist, loss: str) -> torch.Tensor:
    """[Σ cross-entropy, Σ loss-carrying tokens] over this rank's rows."""
    impl, capture = resolve(loss, d.device), None
    if impl != "full":
        try:
            capture = HeadCapture(model)
            capture.verify(data.input_ids[:1, : min(16, data.seq_len)].to(d.device), autocast(d.device))
        except UsageError:
            impl, capture = "full", None
    docs = data.position_ids is not None and packing_supported(model)
    acc = torch.zeros(2, dtype=torch.float64, device=d.device)
    mine = torch.arange(d.rank, len(data), d.world)
    for i in range(0, len(mine), batch_size):
        rows = mine[i : i + batch_size]
        acc[0] += forward_ce(model, capture, impl, data, rows, d.device, docs).double()
        acc[1] += (data.labels[rows, 1:] != IGNORE).sum()
    return acc


@reads("split_dir")
def train_files(split_dir: Path, data, out: Path, opts: TrainOptions | None = None, eval_data=None, callback: Callback | None = None) -> dict:
    """Tokenise the data (JSONL, or any `datasets` source: surgeon_train.sources) with SPLIT_DIR's tokenizer and train."""
    from transformers import AutoTokenizer

    opts = opts or TrainOptions()
    _check(opts)
    check_model(split_dir)
    check_out(split_dir, out, opts.overwrite, opts.resume)  # before the data is read
    try:
        tok = AutoTokenizer.from_pretrained(split_dir)
    except (OSError, ValueError) as e:
        raise SplitDirError(f"{split_dir} has no usable tokenizer ({e}); the split copies the source's tokenizer files, add them there.") from None
    if callback is not None:
        callback("phase", {"name": f"reading and packing {data}"})
    packed = load_packed(data, tok, opts.seq_len, opts.chat_template, opts.data_split, opts.columns, opts.data_format)
    ev = load_packed(eval_data, tok, opts.seq_len, opts.chat_template, opts.data_split, opts.columns, opts.data_format) if eval_data is not None else None
    return train(split_dir, packed, out, opts, ev, callback, {"data": str(data), "eval_data": str(eval_data) if eval_data else None})


def check_model(split_dir: Path) -> None:
    """Refuse, before anything loads, a model the next-token loss does not train: an encoder-decoder
    (T5, BART, Whisper: its forward needs decoder inputs) or one that cannot generate (BERT's encoder,
    a masked LM: no causal head). Their splits still load, for transformers' own trainers."""
    conf_file = Path(split_dir) / "config.json"
    if not conf_file.is_file():
        return  # the split's own checks say what is missing
    why = not_causal_lm(json.loads(conf_file.read_text()))
    if why is None:
        return
    raise UsageError(f"surgeon train fine-tunes causal language models on the next-token loss, and {why}; train this split with "
                     f"transformers' own Trainer on surgeon.runtime.load_split('{split_dir}').model (only its factors train), then surgeon absorb.")


def _load(split_dir: Path, data: Packed, opts: TrainOptions, d: dist.Dist):
    from surgeon.runtime import load_split

    torch.manual_seed(opts.seed)
    sm = load_split(Path(split_dir), dtype=_base_dtype(opts.dtype, d.device), device=d.device)
    max_pos = getattr(sm.model.config, "max_position_embeddings", None)
    if max_pos and data.seq_len > max_pos:
        raise UsageError(f"--seq-len {data.seq_len} exceeds the model's max_position_embeddings ({max_pos}).")
    named = [(n, p) for n, p in sm.model.named_parameters() if p.requires_grad]
    if not named:
        raise SplitDirError(f"the runtime of {split_dir} has no trainable parameter; nothing to train.")
    dist.broadcast_params([p for _, p in named], d)  # a runtime that initialises anything at random agrees across ranks
    sm.model.train()
    return sm, named


@reads("split_dir")
def train(split_dir: Path, data: Packed, out: Path, opts: TrainOptions | None = None, eval_data: Packed | None = None,
          callback: Callback | None = None, meta: dict | None = None) -> dict:
    """Train the factors of SPLIT_DIR on packed rows; OUT becomes the trained split folder."""
    opts = opts or TrainOptions()
    _check(opts)
    check_model(split_dir)
    check_out(split_dir, out, opts.overwrite, opts.resume)  # before the model is loaded
    callback = callback or (lambda event, info: None)
    d = dist.init(opts.device)
    resolve(opts.loss, d.device)  # a loss that cannot run here fails before the model loads
    callback("phase", {"name": f"loading {split_dir}"})
    sm, named = _load(split_dir, data, opts, d)
    run = RunDir(out, sm, d)
    try:
        summary = _train(sm, named, run, data, opts, eval_data, d, callback, split_dir, meta)
    except BaseException:
        run.close()  # refused or failed: the lock goes, the last save stays
        raise
    run.finish(summary)
    summary["out"] = str(run.out)
    return summary


def _train(sm, named, run: RunDir, data: Packed, opts: TrainOptions, eval_data: Packed | None, d: dist.Dist, callback: Callback,
           split_dir: Path, meta: dict | None) -> dict:
    kernels = speed.resolve(opts.kernels, sm.model, d.device)
    with speed.scoped_kernels(sm.model, kernels):
        runner = Runner(sm.model, sm.extra_loss, data, d, opts.loss, opts.document_mask)
        mine = opts.batch_size * opts.grad_accum  # rows per step on this rank
        callback("phase", {"name": "measuring memory for the micro-batch"})
        fit = runner.fit(mine, opts.grad_checkpointing, opts.micro_batch)
        tokens = total_steps(opts, len(data), d.world) * mine * data.seq_len  # this process trains
        compiled = speed.use_compile(opts.compile, d.device, tokens)
        if compiled:
            runner.compile(opts.compile_backend, opts.compile_loss)
        setup = {"loss": runner.loss, "kernels": kernels, "compile": compiled, "compile_loss": bool(runner.capture and runner.capture.fused),
                 "document_mask": runner.document_mask, "memory": fit.as_dict()}
        from surgeon_train import __version__

        summary = {"surgeon_train_version": __version__, "split": str(Path(split_dir).resolve()), **(meta or {})}
        summary |= _run(sm, named, runner, data, run, opts, d, callback) | {"setup": setup}
        if eval_data is not None:
            ev_loss, ev_tok = evaluate(sm.model, eval_data, opts.eval_batch_size, d, runner.loss)
            summary |= {"eval_loss": ev_loss, "eval_tokens": ev_tok}
            run.log({"event": "eval", "step": summary["steps_done"], "eval_loss": ev_loss, "eval_tokens": ev_tok})
            if d.main:
                callback("eval", {"eval_loss": ev_loss, "eval_tokens": ev_tok})
    return summary


def few_steps_warning(opts: TrainOptions, total: int, rows: int, world: int) -> str | None:
    """One line when the data alone (no --steps) makes fewer than 10 optimizer steps."""
    if opts.steps is not None or total >= 10:
        return None
    per = f"--batch-size {opts.batch_size} × --grad-accum {opts.grad_accum}" + (f" × {world} processes" if world > 1 else "")
    return (f"the data packs into {rows} row(s) of --seq-len {opts.seq_len} tokens and {per} rows make one step, so this run makes "
            f"only {total} optimizer step{'s' if total > 1 else ''}; pass --steps N (the data repeats) or --epochs, or lower --batch-size or --seq-len.")


def total_steps(opts: TrainOptions, rows: int, world: int) -> int:
    """Optimizer steps of the run: --steps, else --epochs (default 1) over `rows` packed rows."""
    return opts.steps or max(1, math.ceil((opts.epochs or 1.0) * rows / (opts.batch_size * opts.grad_accum * world)))


def _run(sm, named, runner: Runner, data: Packed, run: RunDir, opts: TrainOptions, d: dist.Dist, callback: Callback) -> dict:
    params = [p for _, p in named]
    R = opts.batch_size * opts.grad_accum * d.world  # rows per optimizer step, all ranks
    total = total_steps(opts, len(data), d.world)
    warmup = opts.warmup_steps if opts.warmup_steps is not None else round(0.05 * total)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=d.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, warmup, opts.min_lr_ratio))
    plan = {
        "method": sm.split.manifest["method"], "rank": sm.split.manifest["rank"], "trainable": sum(p.numel() for p in params),
        "data": data.fingerprint(), "rows": len(data), "seq_len": data.seq_len, "steps": total, "warmup_steps": warmup,
        "world_size": d.world, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "lr": opts.lr,
        "min_lr_ratio": opts.min_lr_ratio, "weight_decay": opts.weight_decay, "max_grad_norm": opts.max_grad_norm, "seed": opts.seed,
        "document_mask": runner.document_mask,
    }
    if opts.resume and not run.unsaved():
        start = run.resume(plan, named, opt, sched)
    else:  # a run killed before its first save starts over, --resume or not
        run.create(opts.overwrite)
        start = 0
        torch.manual_seed(opts.seed + d.rank)  # dropout masks differ across ranks

    if d.main and (note := few_steps_warning(opts, total, len(data), d.world)):
        callback("warning", {"message": note})
    order, counts = _Order(len(data), opts.seed), data.loss_tokens()
    callback("start", {"step": start, "total": total, "rows": len(data), "trainable": plan["trainable"], "world_size": d.world,
                       "micro_batch": runner.micro, "grad_checkpointing": runner.checkpointing, "loss": runner.loss})
    t_run, tokens_run, loss_v = time.perf_counter(), 0, float("nan")
    for step in range(start, total):
        t0 = time.perf_counter()
        rows = order.rows(step * R, R)  # (R,) global rows of this step
        n_tok = max(1, int(counts[rows].sum()))
        mine = _rank_rows(rows, opts.batch_size, opts.grad_accum, d)
        acc = runner.step(mine, n_tok, params)  # Σ ce, Σ extra-loss share
        dist.sum_grads(params, d)
        gnorm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else float("inf"))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dist.sum_(acc, d)
        ce_sum, extra_v, gn = torch.cat([acc, gnorm.reshape(1).to(acc)]).tolist()
        loss_v = ce_sum / n_tok
        if not math.isfinite(loss_v + extra_v):
            raise NumericsError(f"the loss became {loss_v + extra_v} at step {step + 1}; lower --lr (now {opts.lr:g}) or keep --max-grad-norm on.")
        for ev in runner.events:
            run.log(ev | {"step": step + 1})
        runner.events.clear()
        dt = time.perf_counter() - t0
        tokens_run += R * data.seq_len
        info = {
            "step": step + 1, "loss": round(loss_v, 6), "extra_loss": round(extra_v, 8), "lr": lr, "grad_norm": round(gn, 6),
            "tokens": (step + 1) * R * data.seq_len, "loss_tokens": n_tok, "step_time_s": round(dt, 5),
            "tokens_per_s": round(tokens_run / (time.perf_counter() - t_run), 1), "epoch": round((step + 1) * R / len(data), 4),
            "micro_batch": runner.micro, "grad_checkpointing": runner.checkpointing,
        }
        run.log(info)
        faults.point("train-step")  # tests: a kill after the step's log line, before its save
        if (opts.save_every and (step + 1) % opts.save_every == 0) or step + 1 == total:
            run.save(step + 1, plan, named, opt, sched)
        if d.main:
            callback("step", info | {"total": total})
    peak = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else None
    return {
        "plan": plan, "options": asdict(opts), "device": str(d.device), "steps_done": total, "final_loss": loss_v if math.isfinite(loss_v) else None,
        "seconds_this_run": round(time.perf_counter() - t_run, 3),
        "tokens_per_s_this_run": round(tokens_run / max(time.perf_counter() - t_run, 1e-9), 1),
        "micro_batch": runner.micro, "grad_checkpointing": runner.checkpointing,
        "peak_cuda_gib": None if peak is None else round(peak / 2**30, 3),
    }


def _rank_rows(rows: torch.Tensor, batch: int, accum: int, d: dist.Dist) -> torch.Tensor:
    """This rank's rows of a step: slice k·world + rank of size `batch` for every k < accum (the
    assignment of --grad-accum micro-batches), concatenated; the runner re-splits them to fit."""
    return torch.cat([rows[(k * d.world + d.rank) * batch :][:batch] for k in range(accum)])
