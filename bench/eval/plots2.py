"""bench/eval_methods.png (protocol v2): accuracy against forgetting along each arm's lr curve, one panel per target set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.eval import derive as D
from bench.eval import grid as G

NAMES = {"all": "all-linear", "qv": "q/v"}


def _panel(ax, settings, done, ref, targets) -> None:
    for i, arm in enumerate(settings["arms"]):
        c = D.curve(settings, done, ref, arm, targets) if ref else None
        if not c:
            continue
        acc = [m.mean() for m in c["acc"]]
        fg = [m.mean() for m in c["forget"]]
        ax.plot(fg, acc, marker="o", ms=3, color=f"C{i}", label=arm)
        for lr, x, y in zip(c["lr"], fg, acc):
            ax.annotate(G.lr_tag(lr), (x, y), fontsize=5, color=f"C{i}", xytext=(2, 2), textcoords="offset points")
        best = G.chosen_lr(settings, done, arm, targets)
        if best is not None:
            p = D.point(settings, done, ref, arm, targets, best, G.heldout(settings, arm))
            if p["acc"]:
                ax.scatter([np.mean(list(p["forget"].values()))], [np.mean(list(p["acc"].values()))], marker="*", s=80, color=f"C{i}", edgecolors="k", lw=0.5)
    ax.set_xscale("symlog", linthresh=0.05)  # a diverging lr moves it by nats, a gentle one by hundredths
    ax.set_xlabel("Δ log-perplexity on general text (nats/token, symlog)")
    ax.set_ylabel("test accuracy (three tasks)")
    ax.set_title(f"{NAMES[targets]}: lr curves (selection seeds); ★ chosen point, held-out seeds", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "not yet measured", ha="center", va="center", transform=ax.transAxes)


def plot(settings: dict, done: dict, ref: dict | None, path: Path, levels: dict | None = None) -> None:
    """LEVELS: {targets: the matched accuracy level}, drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings["targets"]), figsize=(6 * len(settings["targets"]), 4.8), squeeze=False)
    for ax, t in zip(axes[0], settings["targets"]):
        _panel(ax, settings, done, ref, t)
        if (levels or {}).get(t) is not None:
            ax.axhline(levels[t], color="k", lw=0.6, ls="--")
            ax.annotate("matched accuracy", (0.01, levels[t]), xycoords=("axes fraction", "data"), fontsize=6, va="bottom")
    fig.suptitle(f"{settings['model_name']}, tasks {settings['task_version']}, rank {settings['rank']}, {settings['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
