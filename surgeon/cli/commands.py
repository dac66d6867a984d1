"""The core commands: split, absorb, export, spectra.

    surgeon split --method milora MODEL --rank 64 --out split-dir
    surgeon absorb split-dir --out merged-dir
    surgeon export split-dir --to lora --out lora-dir
    surgeon spectra split-dir --out spectra.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surgeon import __version__
from surgeon.cli.common import err_console, errors_to_exit, print_json, reporter

app = typer.Typer(
    name="surgeon",
    help="Model surgery for fine-tuning: split checkpoints into frozen residuals + trainable SVD factors, and merge them back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written under a temporary name, renamed when complete).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder (or discard an interrupted run).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON on stdout.")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest output shard, e.g. 5GB, 500MB.")]


def _version(value: bool):
    if value:
        typer.echo(f"surgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """surgeon: split, train, absorb."""


@app.command()
def split(
    model: Annotated[str, typer.Argument(help="Local folder, a .safetensors file (with --config), or a Hub id org/name (org/name@revision pins a revision).")],
    out: Out,
    method: Annotated[str, typer.Option("--method", "-m", help="milora (train the minor r components), pissa (the principal r) or nusa (a core between null-space bases, for continual learning).")] = "milora",
    rank: Annotated[int, typer.Option("--rank", "-r", help="Number of singular components that become trainable factors.")] = 64,
    alpha: Annotated[float | None, typer.Option("--alpha", help="LoRA alpha; scaling is alpha/rank as in PEFT. Default: rank (scaling 1); nusa: 2, scaling alpha/sqrt(rank).")] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="rsLoRA scaling alpha/sqrt(rank).")] = False,
    null_energy: Annotated[float | None, typer.Option("--null-energy", help="nusa: energy cutoff rho; the null space is what lies beyond the smallest principal part holding this fraction of sum(sigma^2). Default 0.95.")] = None,
    null_rank: Annotated[int | None, typer.Option("--null-rank", help="nusa: null-space size n (the n smallest directions) instead of the energy rule; with --null-energy the smaller wins.")] = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="all-linear (default), module names (q_proj, ...; repeatable) or one regex full-matched against module names.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="dtype of the written base (float32, bfloat16, float16). Default: the checkpoint's.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Eigen/SVD backend: auto, torch or cupy.")] = "auto",
    solver: Annotated[str, typer.Option("--solver", help="auto (float64 Gram-eigh, checked, float64 SVD fallback), gram-eigh or svd.")] = "auto",
    tol: Annotated[float, typer.Option("--tol", help="Accepted subspace error bound before falling back to a float64 SVD.")] = 1e-6,
    shard_size: ShardSize = "5GB",
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="config.json for a single .safetensors file.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickled .bin weights (loaded with weights_only=True).")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """Split every targeted linear weight W into a frozen residual plus trainable factors (W = W_res + s·B·A)."""
    from surgeon.pipeline import SplitOptions
    from surgeon.pipeline import split as do_split

    opts = SplitOptions(
        method=method, rank=rank, alpha=alpha, use_rslora=rslora, null_energy=null_energy, null_rank=null_rank, target=target or ["all-linear"], dtype=dtype,
        device=device, backend=backend, solver=solver, tol=tol, shard_size=shard_size, revision=revision,
        config=config, allow_pickle=allow_pickle, overwrite=overwrite,
    )
    with errors_to_exit():
        manifest = do_split(model, out, opts, reporter(f"split {method}", quiet))
    if not quiet:
        _summary(manifest, out)
    if json_out:
        print_json({k: manifest[k] for k in ("method", "rank", "alpha", "target_modules", "summary")} | {"out": str(out)})


def _summary(m: dict, out: Path) -> None:
    s = m["summary"]
    t = Table(title=f"surgeon split → {out}", show_header=False)
    t.add_row("method / rank / alpha", f"{m['method']} / {m['rank']} / {m['alpha']:g}")
    t.add_row("layers split", str(s["layers"]))
    t.add_row("solvers", ", ".join(f"{k}: {v}" for k, v in s["solvers"].items()))
    t.add_row("worst ‖W−(W_res+sBA)‖/‖W‖", f"{s['worst_reconstruction_error']:.2e}")
    t.add_row("mean factor energy", f"{s['mean_factor_energy']:.3%}")
    t.add_row("time", f"{s['seconds']:.1f} s ({s['bytes_read'] / max(s['seconds'], 1e-9) / 1e9:.2f} GB/s read)")
    err_console().print(t)


@app.command()
def absorb(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split` (trained or not).")],
    out: Out,
    base: Annotated[str, typer.Option("--base", help="auto: the original weights when still present and unchanged, else the residual; or original / residual.")] = "auto",
    shard_size: ShardSize = "5GB",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """Merge the factors back into plain weights with the source's tensor names."""
    from surgeon.absorb import AbsorbOptions
    from surgeon.absorb import absorb as do_absorb

    with errors_to_exit():
        m = do_absorb(split_dir, out, AbsorbOptions(base=base, shard_size=shard_size, overwrite=overwrite), reporter("absorb", quiet))
    if not quiet:
        err_console().print(f"absorbed {m['layers']} layers into the {m['base']} weights ({m['layers_changed']} changed) → {out}")
    if json_out:
        print_json(m)


@app.command()
def export(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split`.")],
    out: Out,
    to: Annotated[str, typer.Option("--to", help="Export format: lora (a rank-2r PEFT LoRA for the ORIGINAL base model).")] = "lora",
    overwrite: Overwrite = False,
):
    """Export the trained change as an adapter for the original model."""
    from surgeon.absorb import export_lora
    from surgeon.errors import UsageError

    with errors_to_exit():
        if to != "lora":
            raise UsageError(f"--to {to!r}: only 'lora' is supported.")
        conf = export_lora(split_dir, out, overwrite=overwrite)
    err_console().print(f"wrote a rank-{conf['r']} LoRA for {conf['base_model_name_or_path']} → {out}")


@app.command()
def spectra(
    split_dir: Annotated[Path, typer.Argument(help="A folder written by `surgeon split`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("spectra.png"),
    layers: Annotated[str, typer.Option("--layers", help="Regex selecting modules to draw (default: all).")] = ".*",
):
    """Plot the singular-value spectra of the split layers, with the trainable band shaded."""
    from surgeon.plot import plot_spectra

    with errors_to_exit():
        n = plot_spectra(split_dir, out, layers)
    err_console().print(f"plotted {n} spectra → {out}")
