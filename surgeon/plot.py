"""Spectra pictures: every split layer's singular values on a log scale, the factor band marked.

    surgeon spectra split-dir --out spectra.png
"""

from __future__ import annotations

import re
from pathlib import Path

from surgeon.errors import SplitDirError, UsageError


def plot_spectra(split_dir: Path, out: Path, layers: str = ".*") -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("plotting needs matplotlib: pip install 'surgeon[plot]'.") from e
    from safetensors import safe_open

    from surgeon.splitdir import SPECTRA, SplitDir

    split_dir = Path(split_dir)
    manifest = SplitDir(split_dir).manifest  # validated: a split folder, complete
    if not (split_dir / SPECTRA).exists():
        raise SplitDirError(f"{split_dir} has no {SPECTRA} (split with --no-spectra?); split again with spectra to plot them.")
    rx = re.compile(layers)
    groups: dict[str, list] = {}
    with safe_open(split_dir / SPECTRA, "pt") as f:
        for name in f.keys():
            if rx.search(name):
                groups.setdefault(name.rsplit(".", 1)[-1], []).append(f.get_tensor(name).numpy())
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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return sum(len(v) for v in groups.values())
