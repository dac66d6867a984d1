"""The core commands: split, absorb, export, spectra, push.

    surgeon split --method milora MODEL --rank 64 --out split-dir [--push-to-hub org/name]
    surgeon absorb split-dir --out merged-dir [--push-to-hub org/name]
    surgeon push split-dir org/name [--private] [--revision BRANCH] [--commit-message MSG]
    surgeon export split-dir --to lora --out lora-dir
    surgeon export kasa-split-dir --to kasa --out kasa-dir
    surgeon spectra split-dir --out spectra.png
    surgeon check split-dir [--data text.jsonl] [--json]
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surgeon.cli.common import err_console, errors_to_exit, print_json, reporter
from surgeon.engine.distributed import is_main_process
from surgeon.options import calibrate_mode as calibrate_mode_of
from surgeon.version import __version__

app = typer.Typer(
    name="surgeon",
    help="Model surgery for fine-tuning: split checkpoints into frozen residuals + trainable SVD factors, and merge them back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: 'surgeon[quant]' and {block: [gates]} keep their brackets
)

Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written under a temporary name, renamed when complete).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder (or discard an interrupted run).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON on stdout.")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest output shard, e.g. 5GB, 500MB.")]
PushToHub = Annotated[str | None, typer.Option("--push-to-hub", help="Then upload the output folder to this Hub model repo (org/name), as `surgeon push` does.")]
Private = Annotated[bool, typer.Option("--private", help="Create the Hub repo private (an existing public repo is refused).")]


def example(*lines: str) -> str:
    """A help epilog of example command lines, kept as written (\\b stops Click from rewrapping it)."""
    return "\b\nExample:\n" + "\n".join(f"  {ln}" for ln in lines)


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", name)]


def _version(value: bool):
    if value:
        typer.echo(f"surgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """surgeon: split, train, absorb."""


@app.command(epilog=example('surgeon split --method milora org/name --rank 64 --dtype float32 --out split-dir'))
def split(
    model: Annotated[str, typer.Argument(help="Local folder, a .safetensors file (with --config), or a Hub id org/name (org/name@revision pins a revision).")],
    out: Out,
    method: Annotated[str, typer.Option("--method", "-m", help="milora (train the minor r components), pissa (the principal r), kasa (drop the minor r, train a gated rank-r update), nusa (a core between null-space bases, for continual learning) or moe (gated LoRA experts, one prompt router per block).")] = "milora",
    rank: Annotated[int, typer.Option("--rank", "-r", help="Number of singular components that become trainable factors.")] = 64,
    alpha: Annotated[float | None, typer.Option("--alpha", help="LoRA alpha; scaling is alpha/rank as in PEFT. Default: rank (scaling 1); nusa: 2, scaling alpha/sqrt(rank).")] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="rsLoRA scaling alpha/sqrt(rank).")] = False,
    null_energy: Annotated[float | None, typer.Option("--null-energy", help="nusa: energy cutoff rho; the null space is what lies beyond the smallest principal part holding this fraction of sum(sigma^2). Default 0.95.")] = None,
    null_rank: Annotated[int | None, typer.Option("--null-rank", help="nusa: null-space size n (the n smallest directions) instead of the energy rule; with --null-energy the smaller wins.")] = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="all-linear (default), module names (q_proj, ...; repeatable) or one regex full-matched against module names.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="dtype of the written base (float32, bfloat16, float16). Default: the checkpoint's. Only float32 gives an exact split (a bfloat16 residual is rounded; `surgeon check` measures it); absorb of untrained factors is bit-exact either way.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Eigen/SVD backend: auto, torch or cupy.")] = "auto",
    solver: Annotated[str, typer.Option("--solver", help="auto (on CUDA, for large weights without --spectra: subspace iteration; else float64 Gram-eigh; every result checked; on the minor side QR + inverse iteration next; float64 SVD last), gram-eigh, subspace, qr-inverse or svd.")] = "auto",
    tol: Annotated[float, typer.Option("--tol", help="Accepted subspace error bound before falling back to a float64 SVD.")] = 1e-6,
    shard_size: ShardSize = "5GB",
    workers: Annotated[int, typer.Option("--workers", help="Matrices decomposed at once (threads; on CUDA one stream each). 0: 2 on CPU, 1 on CUDA.")] = 0,
    keep_spectra: Annotated[bool, typer.Option("--spectra/--no-spectra", help="Also store every singular value (surgeon.spectra.safetensors). Off by default: it costs a full eigendecomposition per weight, which the fast GPU route avoids; `surgeon spectra` computes them from the source when needed.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="config.json for a single .safetensors file.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickled .bin weights (loaded with weights_only=True).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of random initial factors (KaSA); each layer's seed derives from it and the module name.")] = 0,
    kasa_beta: Annotated[float, typer.Option("--kasa-beta", help="KaSA: weight of the singular-value penalty sum(d^2) in the training loss.")] = 1e-4,
    kasa_gamma: Annotated[float, typer.Option("--kasa-gamma", help="KaSA: weight of the orthogonality penalty ||B^T B - I||_F + ||A A^T - I||_F.")] = 1e-3,
    top_k: Annotated[int, typer.Option("--top-k", help="moe: experts kept per prompt in each block (0 = all).")] = 2,
    pooling: Annotated[str, typer.Option("--pooling", help="moe: how the router pools the prompt: attention, mean or last.")] = "attention",
    rank_pattern: Annotated[list[str] | None, typer.Option("--rank-pattern", help="REGEX=R (repeatable): rank R for the modules whose name ends in a dotted part matching REGEX entirely (PEFT's rank_pattern; the first matching pattern wins), e.g. 'mlp\\..*=32'.")] = None,
    alpha_pattern: Annotated[list[str] | None, typer.Option("--alpha-pattern", help="REGEX=A (repeatable): alpha A for the matching modules (PEFT's alpha_pattern). Without --alpha, a module given a rank by --rank-pattern keeps scale 1 (alpha = its rank).")] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="nf4 or fp4: write the frozen residual as bitsandbytes 4-bit weights in the pre-quantized format transformers loads (QLoRA/QPiSSA; needs pip install 'surgeon[quant]'). Best with --method pissa.")] = None,
    quantize_iters: Annotated[int, typer.Option("--quantize-iters", help="pissa + --quantize: LoftQ alternations; the factors are refitted to W - deq(Q(residual)) this many times, and the best pair is written.")] = 0,
    quant_blocksize: Annotated[int, typer.Option("--quant-blocksize", help="--quantize: values per absmax block (transformers' default 64).")] = 64,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="--quantize: also quantize the absmax statistics (bnb_4bit_use_double_quant).")] = False,
    calibrate: Annotated[str | None, typer.Option("--calibrate", help="DATA (a .txt/.md file, a record per paragraph; JSONL; or a dataset, as train --data; 'default': a built-in general-English sample): decompose each weight as the layer is used on this text (CorDA / ASVD), streamed block by block. milora, pissa, kasa, nusa.")] = None,
    calibrate_tokens: Annotated[int, typer.Option("--calibrate-tokens", help="--calibrate: tokens of DATA used at most.")] = 65536,
    calibrate_mode: Annotated[str | None, typer.Option("--calibrate-mode", help="kpm: the r components of W·C the text needs LEAST (default for milora, kasa, nusa); ipm: the r it needs most (default for pissa); asvd: W scaled by activation RMS^0.5; whiten: W times C's Cholesky factor (SVD-LLM); both on the method's own side.")] = None,
    calibrate_peft: Annotated[bool, typer.Option("--calibrate-peft", help="--calibrate: PEFT's CorDA settings (each sample's inputs divided by their max, damping 0.01·mean(diag C) always) instead of ours (plain token covariance, damped only when singular).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (targets, ranks, trainable parameters, file sizes, free space, estimated time) and write nothing.")] = False,
    overwrite: Overwrite = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """Split every targeted linear weight W into a frozen residual plus trainable factors (W = W_res + s·B·A)."""
    from surgeon.commands.precheck import check_split_options

    with errors_to_exit():  # usage errors in half a second: before torch is imported
        nusa = [o for o, v in (("--null-energy", null_energy), ("--null-rank", null_rank)) if v is not None]
        judged_first = dict(alpha=alpha, top_k=top_k, pooling=pooling, kasa_beta=kasa_beta, kasa_gamma=kasa_gamma, quantize=quantize,
                            quantize_iters=quantize_iters, quant_blocksize=quant_blocksize, double_quant=double_quant, rank_pattern=rank_pattern or None)
        plain = target in (None, ["all-linear"]) and _as_default(split, judged_first)
        check_split_options(model, method, rank, dtype, solver, nusa, shard_size, check_rank=plain)
        calibrate_mode_of(method, calibrate, calibrate_tokens, calibrate_mode, calibrate_peft, quantize)
    from surgeon.commands.split import SplitOptions
    from surgeon.commands.split import split as do_split

    opts = SplitOptions(
        method=method, rank=rank, alpha=alpha, use_rslora=rslora, null_energy=null_energy, null_rank=null_rank, target=target or ["all-linear"], dtype=dtype,
        device=device, backend=backend, solver=solver, tol=tol, shard_size=shard_size, revision=revision,
        config=config, allow_pickle=allow_pickle, overwrite=overwrite, workers=workers, spectra=keep_spectra,
        seed=seed, kasa_beta=kasa_beta, kasa_gamma=kasa_gamma, top_k=top_k, pooling=pooling,
        rank_pattern=rank_pattern or [], alpha_pattern=alpha_pattern or [], quantize=quantize, quantize_iters=quantize_iters,
        quant_blocksize=quant_blocksize, double_quant=double_quant,
        calibrate=calibrate, calibrate_tokens=calibrate_tokens, calibrate_mode=calibrate_mode, calibrate_peft=calibrate_peft,
    )
    if dry_run:
        return _dry_run(model, out, opts, json_out)
    with errors_to_exit():
        if push_to_hub:
            from surgeon.commands.push import preflight

            preflight()  # token and not offline: before hours of work, not after
        manifest = do_split(model, out, opts, reporter(f"split {method}", quiet))
    if not is_main_process():  # torchrun: rank 0 speaks and pushes
        return
    if not quiet:
        _summary(manifest, out)
        for w in manifest.get("warnings", []):
            err_console().print(f"[yellow]warning:[/] {w}")
    if push_to_hub:
        _push(out, push_to_hub, private, None, None, quiet)
    if json_out:
        print_json({k: manifest.get(k) for k in ("method", "rank", "alpha", "target_modules", "summary", "run")} | {"out": str(out)})


def _as_default(command, given: dict) -> bool:
    """Whether every option in `given` still has the command's default value."""
    params = inspect.signature(command).parameters
    return all(v == params[k].default for k, v in given.items())


def _dry_run(model: str, out: Path, opts, json_out: bool) -> None:
    from surgeon.commands.plan import dry_run

    with errors_to_exit():
        p = dry_run(model, out, opts)
    if json_out:
        print_json(p)
        return
    con = err_console()
    t = Table(title=f"surgeon split --dry-run: {p['method']} of {model} (nothing written)")
    for col in ("module", "shape", "rank", "alpha", "scale", "trainable"):
        t.add_column(col, justify="left" if col == "module" else "right", overflow="fold")  # fold: never cut a name
    for r in sorted(p["targets"], key=lambda r: natural_key(r["module"])):
        t.add_row(r["module"], "x".join(map(str, r["shape"])), str(r["rank"]), f"{r['alpha']:g}", f"{r['scale']:g}", f"{r['trainable']:,}")
    con.print(t)
    f = Table(show_header=True)
    f.add_column("file")
    f.add_column("bytes", justify="right")
    for row in p["files"]:
        f.add_row(row["file"], f"{row['bytes']:,}")
    con.print(f)
    q = p["quantize"]
    con.print(f"{p['layers']} layers, {p['trainable_parameters']:,} trainable parameters"
              + (f"; residual as {q['quant_type']} (blocksize {q['blocksize']}, {q['iters']} LoftQ alternations)" if q else ""))
    fits = "fits" if p["fits"] else "[bold red]does NOT fit[/]"
    con.print(f"output {p['output_bytes'] / 1e6:,.1f} MB; free at {out}: {p['free_bytes_at_out'] / 1e9:,.1f} GB ({fits})"
              + ("; [yellow]--out exists[/] (pass --overwrite to replace it)" if p["out_exists"] else ""))
    if c := p["calibration"]:
        con.print(f"calibration: {c['tokens']:,} tokens in {c['samples']:,} samples ({c['mode']}), ~{c['estimated_seconds']:.0f} s of the estimate, "
                  f"about {c['device_bytes_estimate'] / 1e9:,.2f} GB more on {p['device']}")
    con.print(f"estimated time on {p['device']}: {p['estimated_seconds']:.0f} s")


def _summary(m: dict, out: Path) -> None:
    s, run = m["summary"], m.get("run", {})
    t = Table(title=f"surgeon split → {out}", show_header=False)
    t.add_row("method / rank / alpha", f"{m['method']} / {m['rank']} / {m['alpha']:g}")
    t.add_row("layers split", str(s["layers"]))
    if m.get("dense"):  # all-linear layers left dense: routers, layers not above the rank
        first = next(iter(m["dense"].items()))
        t.add_row("kept dense", f"{len(m['dense'])} (e.g. {first[0]}: {first[1]}; all in surgeon.json \"dense\")")
    if m.get("names", "").startswith("checkpoint names"):
        t.add_row("names", m["names"])
    t.add_row("solvers", ", ".join(f"{k}: {v}" for k, v in s["solvers"].items()))
    t.add_row("worst ‖W−(W_res+sBA)‖/‖W‖ vs the original", f"{s['worst_reconstruction_error']:.2e}")
    if s.get("error_meaning"):
        t.add_row("what that means", s["error_meaning"])
    t.add_row("mean factor energy (fraction of Σσ²)", f"{s['mean_factor_energy']:.3g}")
    if c := m.get("calibration"):  # --calibrate: what the chosen part carries of the layers' output on the text
        share = f"; largest share of a layer's output carried by the {c['carried']}: {100 * c['output_share_max']:.3g}%" if c.get("output_share_max") is not None else ""
        t.add_row("calibration", f"{c['mode']} on {c['tokens']} tokens{share}" + ("; `surgeon check` measures the perplexity change" if c["carried"] == "truncated part" else ""))
    if run.get("seconds") is not None:
        t.add_row("time", f"{run['seconds']:.1f} s ({run['bytes_read'] / max(run['seconds'], 1e-9) / 1e9:.2f} GB/s read)")
    err_console().print(t)


@app.command(epilog=example('surgeon absorb trained-split --out merged-dir'))
def absorb(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split` (trained or not).")],
    out: Out,
    base: Annotated[str, typer.Option("--base", help="auto: the original weights when still present and unchanged, else the residual (KaSA: always the truncated residual); or original / residual. KaSA with original re-adds the truncated components.")] = "auto",
    shard_size: ShardSize = "5GB",
    fixed_gates: Annotated[Path | None, typer.Option("--fixed-gates", help="moe only: fold with fixed gates, from a .jsonl of calibration prompts (averaged) or a .json {block: [gates]}.")] = None,
    overwrite: Overwrite = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """Merge the factors back into plain weights with the source's tensor names."""
    from surgeon.commands.absorb import AbsorbOptions
    from surgeon.commands.absorb import absorb as do_absorb

    with errors_to_exit():
        if push_to_hub:
            from surgeon.commands.push import preflight

            preflight()
        m = do_absorb(split_dir, out, AbsorbOptions(base=base, shard_size=shard_size, overwrite=overwrite, fixed_gates=fixed_gates), reporter("absorb", quiet))
    if not is_main_process():
        return
    if not quiet:
        err_console().print(f"absorbed {m['layers']} layers into the {m['base']} weights ({m['layers_changed']} changed; {m.get('base_reason', '')}) → {out}")
    if push_to_hub:
        _push(out, push_to_hub, private, None, None, quiet)
    if json_out:
        print_json(m)


@app.command(epilog=example('surgeon export split-dir --to lora --out lora-dir'))
def export(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split`.")],
    out: Out,
    to: Annotated[str, typer.Option("--to", help="lora: a PEFT LoRA (rank 2r for the ORIGINAL base; KaSA: rank r on the truncated base, the split folder); kasa: PEFT's KaSA adapter for the ORIGINAL base.")] = "lora",
    overwrite: Overwrite = False,
):
    """Export the trained change as an adapter for the original model."""
    from surgeon.commands.absorb import export_lora
    from surgeon.commands.export.kasa import export_kasa
    from surgeon.errors import UsageError

    with errors_to_exit():
        if to not in ("lora", "kasa"):
            raise UsageError(f"--to {to!r}: choose lora or kasa.")
        conf = (export_lora if to == "lora" else export_kasa)(split_dir, out, overwrite=overwrite)
    kind = "KaSA adapter" if to == "kasa" else "LoRA"
    err_console().print(f"wrote a rank-{conf['r']} {kind} for {conf['base_model_name_or_path']} → {out}")


@app.command(epilog=example('surgeon spectra split-dir --out spectra.png --layers self_attn'))
def spectra(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Picture to write: .png (default), .pdf or .svg.")] = Path("spectra.png"),
    layers: Annotated[str, typer.Option("--layers", help="Regex selecting modules to draw (default: all).")] = ".*",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    quiet: Quiet = False,
):
    """Plot the singular-value spectra of the split layers, with the trainable band shaded."""
    from surgeon.commands.spectra import plot_spectra

    with errors_to_exit():
        n, written = plot_spectra(split_dir, out, layers, overwrite, reporter("spectra from the source", quiet))
    err_console().print(f"plotted {n} spectra → {written}")


@app.command(epilog=example('surgeon check split-dir --data text.jsonl --tokens 512'))
def check(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split` or `surgeon train`.")],
    data: Annotated[Path | None, typer.Option("--data", help="Text to measure on: .txt, or .jsonl in any format `surgeon train` takes. Default: a built-in English sample.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens of the text to run through both models.")] = 256,
    json_out: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON on stdout.")] = False,
):
    """Run the split and its original (the recorded source, verified by hash) on text: top-1 agreement, perplexities, max |Δlogit|.

    Both run in float32 on the CPU one decoder block at a time, so memory holds one block, the embeddings
    and the head rather than the whole model (the numbers are those of the whole model); --json says in
    "ran" which way each model ran. Causal language models only (an encoder or encoder-decoder is refused)."""
    from surgeon.commands.check import check as do_check
    from surgeon.commands.check import one_line

    with errors_to_exit():
        r = do_check(split_dir, data, tokens)
    if json_out:
        print_json(r)
    else:
        typer.echo(one_line(r))


@app.command(epilog=example('surgeon push split-dir your-name/model-milora-r64 --private'))
def push(
    folder: Annotated[Path, typer.Argument(help="A folder written by surgeon split, train or absorb.")],
    repo_id: Annotated[str | None, typer.Argument(help="Hub model repo, org/name (created if it does not exist).")] = None,
    private: Private = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (created from main if missing). Default: main.")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="Commit summary. Default: what surgeon did, from surgeon.json.")] = None,
    regenerate_card: Annotated[bool, typer.Option("--regenerate-card", help="First rewrite README.md from surgeon.json (fixes a missing or outdated card).")] = False,
    check_only: Annotated[bool, typer.Option("--check", help="Only check the folder; upload nothing.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds one Hub request may wait for an answer (default: SURGEON_HUB_TIMEOUT or 60).")] = None,
    quiet: Quiet = False,
):
    """Check an output folder (shards, config, model card) and upload it to the Hub in one commit."""
    from surgeon import options
    from surgeon.errors import UsageError
    from surgeon.format.hubcheck import validate, write_card

    with errors_to_exit():
        options.check(("--timeout", timeout, options.POSITIVE))  # inf or NaN would mean no deadline at all
        if repo_id is None and not check_only:
            raise UsageError("give the Hub repo to push to (surgeon push FOLDER org/name), or --check to only check the folder.")
        if regenerate_card:
            write_card(folder)
        if check_only:
            chk = validate(folder)
            for w in chk.warnings:
                err_console().print(f"[yellow]warning:[/] {w}")
            err_console().print(f"{folder} is ready for the Hub: {len(chk.files)} files.")
            return
    _push(folder, repo_id, private, revision, commit_message, quiet, timeout)


def _push(folder: Path, repo_id: str, private: bool, revision: str | None, message: str | None, quiet: bool, timeout: float | None = None) -> None:
    from surgeon.commands.push import push as do_push

    with errors_to_exit():
        r = do_push(folder, repo_id, private=private, revision=revision, commit_message=message, timeout=timeout)
    if not quiet:
        for w in r.warnings:
            err_console().print(f"[yellow]warning:[/] {w}")
        vis = "private" if r.private else "public"
        err_console().print(f"pushed {len(r.files)} files ({r.nbytes / 1e6:.1f} MB) to {r.url} ({vis}, {r.revision}); commit {r.commit_url}")
