"""`surgeon train`: registered on the core CLI through the entry-point group `surgeon.commands`.

    surgeon train SPLIT_DIR --data train.jsonl --out OUT --steps 200 [--eval-data dev.jsonl]
    torchrun --nproc-per-node 2 -m surgeon train SPLIT_DIR --data train.jsonl --out OUT --steps 200

Wiring only: options → TrainOptions → surgeon_train.train_files, a rich progress bar (step, loss,
tokens/s, ETA) on rank 0, the core's error map (surgeon.cli.common.errors_to_exit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def register(app: typer.Typer) -> None:
    app.command(name="train", epilog="\b\nExample:\n  surgeon train split-dir --data chat.jsonl --out trained --steps 200 --lr 2e-4")(train)


def train(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split` (any method).")],
    data: Annotated[str, typer.Option("--data", "-d", help='Training data: JSONL, one record per line: {"text"}, {"prompt", "completion"}, chat {"messages": [{"role", "content"}]}, alpaca {"instruction", "input", "output"} or sharegpt {"conversations": [{"from", "value"}]} (loss on the answers only); a .txt/.md file (a {"text"} record per paragraph); or through `datasets` a .json/.parquet/.csv file, a folder or a Hub dataset id.')],
    out: Annotated[Path, typer.Option("--out", "-o", help="The trained split folder (same format; base shards hard-linked, not copied).")],
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: one epoch).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the packed data (instead of --steps).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of AdamW.")] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows of --seq-len tokens per optimizer step, per process (× --grad-accum); run in micro-batches that fit memory.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Multiplies --batch-size: rows per step = batch-size × grad-accum (× processes).")] = 1,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", help="Rows per forward/backward pass (default: the most that fits the free memory, measured before the first step).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per packed row.")] = 1024,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Data evaluated (mean token loss) at the end, in any --data form.")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="Force the data format: text, prompt-completion, messages, alpaca or sharegpt (default: detected from each record's keys).")] = None,
    data_split: Annotated[str, typer.Option("--data-split", help='Split of a `datasets` source, slices allowed: "train[:2000]".')] = "train",
    columns: Annotated[str | None, typer.Option("--columns", help="Map record fields (text, prompt, completion, messages, instruction, input, output, conversations) to the source's columns: prompt=question,completion=answer.")] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Save (factors + optimizer state) every N steps; 0: at the end only.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out from its last save.")] = False,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", help="Linear warm-up steps before the cosine decay (default: 5% of the steps).")] = None,
    min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio", help="The cosine decays to this fraction of --lr.")] = 0.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip the global gradient norm; 0: no clipping.")] = 1.0,
    grad_checkpointing: Annotated[bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in the backward pass (less memory, ~30% slower); default: only when one row does not fit otherwise.", show_default=False)] = None,
    loss: Annotated[str, typer.Option("--loss", help="Loss without full logits: auto (= chunked, the torch loss; measured fastest on CUDA too), chunked, liger, cce (liger-kernel's / cut-cross-entropy's, CUDA); full materialises the logits.")] = "auto",
    kernels: Annotated[str, typer.Option("--kernels", help="auto (= none), liger (liger-kernel's RMSNorm/SwiGLU/RoPE, CUDA), none.")] = "auto",
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile each transformer block (a one-time warm-up of ~10-20 s, then faster steps); default: on CUDA for runs of at least 800k tokens a process (steps × batch-size × grad-accum × seq-len: 100 steps of 8 × 1024), where the warm-up is paid back; off on the CPU.", show_default=False)] = None,
    no_document_mask: Annotated[bool, typer.Option("--no-document-mask", help="Let packed examples attend to the ones before them in the row.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order and of dropout.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (under torchrun: each rank's local GPU).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the frozen base: auto (bfloat16 on CUDA with bf16 autocast, float32 on CPU), float32, bfloat16.")] = "auto",
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="Prompt + completion + EOS even when the tokenizer has a chat template.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (and its saved state).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")] = False,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="Then upload --out to this Hub model repo (org/name), as `surgeon push` does (train_state/ stays local).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo private.")] = False,
):
    """Fine-tune only the factors of a split folder (the residual base stays frozen and is never rewritten)."""
    from surgeon.cli.common import err_console, errors_to_exit, print_json
    from surgeon_train import dist
    from surgeon_train.loop import TrainOptions, train_files
    from surgeon_train.sources import parse_columns

    opts = TrainOptions(
        steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, micro_batch=micro_batch, seq_len=seq_len,
        loss=loss, kernels=kernels, compile=compile, document_mask=not no_document_mask, data_split=data_split, columns=None, data_format=data_format,
        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        grad_checkpointing=grad_checkpointing, seed=seed, save_every=save_every, device=device, dtype=dtype,
        chat_template=not no_chat_template, resume=resume, overwrite=overwrite,
    )
    main = dist.env_rank() == 0
    if quiet or not main:  # --quiet: no bar at all, transformers' "Loading weights" one included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with errors_to_exit():
        opts.columns = parse_columns(columns)
    bar = _Bar() if main and not quiet else None
    try:
        with errors_to_exit():
            if push_to_hub and main:
                from surgeon.commands.push import preflight

                preflight()  # token and not offline: before the training, not after
            try:
                summary = train_files(split_dir, data, out, opts, eval_data, bar)
            except KeyboardInterrupt:
                err_console().print(f"[yellow]interrupted[/]: {out} holds the last save; add --resume to continue from it.")
                raise typer.Exit(130) from None
    finally:
        if bar is not None:
            bar.close()
        dist.close()
    if main and not quiet:
        ev = f", eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""
        err_console().print(
            f"trained {summary['plan']['trainable']:,} parameters for {summary['steps_done']} steps: "
            f"loss {summary['final_loss'] or float('nan'):.4f}{ev}, {summary['tokens_per_s_this_run']:,.0f} tokens/s → {out}"
        )
    if main and push_to_hub:
        from surgeon.commands.push import push

        with errors_to_exit():
            res = push(out, push_to_hub, private=private)
        err_console().print(f"pushed {len(res.files)} files to {res.url}")
    if main and json_out:
        print_json(summary)


class _Bar:
    """Step, loss, tokens/s and ETA on stderr (rank 0 only)."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from surgeon.cli.common import err_console

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"), TextColumn("{task.fields[micro]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=err_console(),
        )
        self.task = None
        self.status = None  # a spinner naming the start-up step (data, model load, memory probe) until the bar starts

    def __call__(self, event: str, info: dict) -> None:
        if event == "phase":
            if self.status is None:
                self.status = self.progress.console.status(f"train: {escape(info['name'])} …")
                self.status.start()
            else:
                self.status.update(f"train: {escape(info['name'])} …")
            return
        if event in ("start", "warning") and self.status is not None:
            self.status.stop()
            self.status = None
        if event == "warning":
            self.progress.console.print(f"[yellow]warning:[/] {escape(info['message'])}", soft_wrap=True)
        elif event == "start":
            if info["step"]:
                self.progress.console.print(f"resuming at step {info['step']} of {info['total']}")
            self.progress.start()
            self.task = self.progress.add_task("train", total=info["total"], completed=info["step"], loss="-", rate="-", micro=_micro(info))
        elif event == "step" and self.task is not None:
            self.progress.update(self.task, completed=info["step"], loss=f"{info['loss']:.4f}", rate=f"{info['tokens_per_s']:,.0f}", micro=_micro(info))

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
        self.progress.stop()


def _micro(info: dict) -> str:
    """The chosen micro-batch, e.g. "micro 2 +ckpt"."""
    return f"micro {info['micro_batch']}" + (" +ckpt" if info.get("grad_checkpointing") else "")
