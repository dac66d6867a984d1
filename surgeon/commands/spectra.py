"""Spectra pictures: every split layer's singular values on a log scale, the factor band marked.

    surgeon spectra split-dir --out spectra.png
"""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.engine.outdir import check_outside
from surgeon.engine.outplace import check_place, out_path
from surgeon.engine.progress import NullReporter, Reporter
from surgeon.errors import SplitDirError, UsageError
from surgeon.format.readlock import reads
from surgeon.methods.folder import SplitDir
from surgeon.model.patterns import UserRegex


def spectra(sd, rx: UserRegex, device: str = "auto", reporter: Reporter | None = None):
    """(module, every singular value descending) of the split layers `rx` selects: from
    surgeon.spectra.safetensors when the split stored them (--spectra), else computed from the source
    weights (each verified by its content hash first), one tensor at a time, reporting each layer to
    `reporter` (a progress bar in the CLI: minutes on a large model)."""
    from safetensors import safe_open

    from surgeon.format.splitdir import SPECTRA

    modules = [m for m in sd.layers if rx.search(m)]
    if (sd.path / SPECTRA).exists():
        with safe_open(sd.path / SPECTRA, "pt") as f:
            yield from ((m, f.get_tensor(m)) for m in modules if m in f.keys())
        return
    yield from _from_source(sd, modules, device, reporter or NullReporter())


def _from_source(sd, modules: list[str], device: str, reporter: Reporter):
    from surgeon.commands.absorb import check_hash, verified_source
    from surgeon.linalg import get_backend, singular_values

    missing = sd.missing_source_files()
    if missing:
        raise SplitDirError(f"{sd.path} stores no spectra and its source {missing[0]} is gone; split again with --spectra.")
    ckpt = verified_source(sd)
    backend = get_backend(device)
    want = {sd.layers.get(m, {}).get("tensor", f"{m}.weight"): m for m in modules}  # checkpoint key -> loaded module
    names = [n for n in ckpt.tensors if n in want]
    reporter.start(len(names), sum(ckpt.tensors[n].nbytes for n in names))
    try:
        for info, w in ckpt.stream(names, digest=True):
            check_hash(sd.source_hashes(), ckpt, info.name)
            sigma = singular_values(w.to(backend.device).double(), backend).cpu()
            reporter.advance(info.name, info.nbytes)
            yield want[info.name], sigma
    finally:
        reporter.close()


FORMATS = (".png", ".pdf", ".svg")


def picture_path(out: Path, overwrite: bool) -> Path:
    """The file to draw into: .png unless it names .pdf or .svg; an existing file only with overwrite,
    never a link. Its folders are resolved first (`a/../p.png` makes no folder `a`)."""
    out = out_path(out)
    if not out.suffix:
        out = out.with_suffix(".png")
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {out}: a spectra picture is {', '.join(FORMATS)}; give a name ending in one of them.")
    if out.is_symlink() or out.is_dir():
        raise UsageError(f"--out {out} is a link or a folder; give a file name.")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")
    check_place(out)
    return out


@reads("split_dir")
def plot_spectra(split_dir: Path, out: Path, layers: str = ".*", overwrite: bool = False, reporter: Reporter | None = None) -> tuple[int, Path]:
    """Draw the spectra of the layers `layers` selects into `out` (written whole, then renamed);
    returns (how many, the file written)."""
    out = picture_path(out, overwrite)
    rx = UserRegex(layers, "--layers")  # matched under a time bound
    sd = SplitDir(Path(split_dir))  # validated: a split folder, complete
    check_outside(out, sd.inputs())  # never into the split or the model it came from
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("plotting needs matplotlib: pip install 'surgeon[plot]'.") from e
    manifest = sd.manifest
    groups: dict[str, list] = {}
    for name, sigma in spectra(sd, rx, reporter=reporter):
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(sigma.numpy())
    if not groups:
        raise UsageError(f"--layers {layers!r} selects no split layer.")
    n = len(groups)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols + 1, 3 * rows), squeeze=False, layout="constrained")
    r, minor = manifest["rank"], manifest["method"] != "pissa"
    for ax, (kind, specs) in zip(axes.flat, sorted(groups.items())):
        for i, s in enumerate(specs):
            ax.semilogy(s, color=matplotlib.colormaps["viridis"](i / max(len(specs) - 1, 1)), lw=0.8)
        k = len(specs[0])
        lo, hi = (k - r, k) if minor else (0, r)
        ax.axvspan(lo, hi, color="tab:red", alpha=0.15, label=f"trainable r={r}")
        ax.set_title(f"{kind} ({len(specs)} layers)")
        ax.set_xlabel("index")
        ax.set_ylabel("σ")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    depth = max(len(v) for v in groups.values())
    key = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, max(depth - 1, 1)), cmap="viridis")
    fig.colorbar(key, ax=axes.ravel().tolist(), label="layer (0 = first block)", fraction=0.03, ticks=matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"{manifest['method']} split of {manifest['source'].get('hub_id') or manifest['source']['model']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return sum(len(v) for v in groups.values()), out
