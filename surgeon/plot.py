"""Spectra pictures: every split layer's singular values on a log scale, the factor band marked.

    surgeon spectra split-dir --out spectra.png
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from surgeon.errors import SplitDirError, UsageError


def spectra(sd, rx: re.Pattern, device: str = "auto"):
    """(module, every singular value descending) of the split layers `rx` selects: from
    surgeon.spectra.safetensors when the split stored them (--spectra), else computed from the source
    weights (each verified by its content hash first), one tensor at a time."""
    from safetensors import safe_open

    from surgeon.splitdir import SPECTRA

    modules = [m for m in sd.layers if rx.search(m)]
    if (sd.path / SPECTRA).exists():
        with safe_open(sd.path / SPECTRA, "pt") as f:
            yield from ((m, f.get_tensor(m)) for m in modules if m in f.keys())
        return
    yield from _from_source(sd, modules, device)


def _from_source(sd, modules: list[str], device: str):
    from surgeon.absorb import check_hash, verified_source
    from surgeon.linalg import get_backend, singular_values

    missing = sd.missing_source_files()
    if missing:
        raise SplitDirError(f"{sd.path} stores no spectra and its source {missing[0]} is gone; split again with --spectra.")
    ckpt = verified_source(sd)
    backend = get_backend(device)
    want = {sd.layers.get(m, {}).get("tensor", f"{m}.weight"): m for m in modules}  # checkpoint key -> loaded module
    for info, w in ckpt.stream([n for n in ckpt.tensors if n in want], digest=True):
        check_hash(sd.source_hashes(), ckpt, info.name)
        yield want[info.name], singular_values(w.to(backend.device).double(), backend).cpu()


FORMATS = (".png", ".pdf", ".svg")


def picture_path(out: Path, overwrite: bool) -> Path:
    """The file to draw into: .png unless it names .pdf or .svg; an existing file only with overwrite, never a link."""
    out = Path(out)
    if not out.suffix:
        out = out.with_suffix(".png")
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {out}: a spectra picture is {', '.join(FORMATS)}; give a name ending in one of them.")
    if out.is_symlink() or out.is_dir():
        raise UsageError(f"--out {out} is a link or a folder; give a file name.")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")
    return out


def plot_spectra(split_dir: Path, out: Path, layers: str = ".*", overwrite: bool = False) -> tuple[int, Path]:
    """Draw the spectra of the layers `layers` selects into `out` (written whole, then renamed);
    returns (how many, the file written)."""
    out = picture_path(out, overwrite)
    try:
        rx = re.compile(layers)
    except re.error as e:
        raise UsageError(f"--layers {layers!r} is not a regular expression ({e}).") from None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("plotting needs matplotlib: pip install 'surgeon[plot]'.") from e
    from surgeon.splitdir import SplitDir

    sd = SplitDir(Path(split_dir))  # validated: a split folder, complete
    manifest = sd.manifest
    groups: dict[str, list] = {}
    for name, sigma in spectra(sd, rx):
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(sigma.numpy())
    if not groups:
        raise UsageError(f"--layers {layers!r} selects no split layer.")
    n = len(groups)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
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
    fig.suptitle(f"{manifest['method']} split of {manifest['source'].get('hub_id') or manifest['source']['model']} (colour: layer depth)")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.partial{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return sum(len(v) for v in groups.values()), out
