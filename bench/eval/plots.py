"""bench/eval_methods_v1.png: accuracy vs forgetting, the sequence, the KaSA sweep, latency."""

from __future__ import annotations

from pathlib import Path

from bench.eval.claims import TARGET_NAMES


def _tradeoff(ax, res) -> None:
    for i, m in enumerate(res["settings"]["methods"]):
        for t, marker in zip(res["settings"]["targets"], ("o", "s")):
            v = res["summary"].get(f"{m}/{t}")
            if not v or v["best_lr"] is None:
                continue
            rs = [r for r in res["runs"] if r["method"] == m and r["targets"] == t and abs(r["lr"] - v["best_lr"]) < 1e-12 and "error" not in r]
            ax.scatter([r["ppl_increase_pct"] for r in rs], [r["test_acc"] for r in rs], edgecolors=f"C{i}", marker=marker,
                       facecolors=f"C{i}" if t == "all" else "none", s=36, label=f"{m} {TARGET_NAMES[t]}")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("general-text perplexity increase (%, symlog)")
    ax.set_ylabel("test accuracy (mean of the tasks)")
    ax.set_title("task accuracy vs forgetting (best lr, one point per seed)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def _sequence(ax, res) -> None:
    seq = [r for r in res["sequence"] if "error" not in r]
    order = res["settings"]["seq_tasks"]
    for i, m in enumerate(dict.fromkeys(r["method"] for r in seq)):
        rs = [r for r in seq if r["method"] == m]
        for j, task in enumerate(order):
            ys = [sum(r["acc"][k][j] for r in rs) / len(rs) for k in range(len(order))]
            ax.plot(range(len(order)), ys, color=f"C{i}", linestyle=("-", "--", ":")[j % 3], marker="o", ms=3, label=f"{m}: {task}")
    ax.set_xticks(range(len(order)), [f"after {t}" for t in order])
    ax.set_ylabel("test accuracy")
    ax.set_title("sequence: accuracy of each task after each stage", fontsize=9)
    ax.legend(fontsize=6)


def _kasa(ax, res) -> None:
    sw = res.get("kasa_sweep") or res.get("kasa_sweep_cpu")
    if not sw:
        return
    for name in dict.fromkeys(r["set"] for r in sw["rows"]):
        rows = sorted((r for r in sw["rows"] if r["set"] == name), key=lambda r: r["rank"])
        ax.plot([r["rank"] for r in rows], [r["ppl_ratio"] for r in rows], marker=".", label=name)
    ax.axhline(1.1, color="k", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("KaSA rank r (minor components removed)")
    ax.set_ylabel("perplexity / original")
    ax.set_title("KaSA truncation before training", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def _latency(ax, res) -> None:
    lat = res.get("latency")
    if not lat:
        return
    bs = sorted(lat["batches"], key=int)
    for arm in ("moe_cached", "moe_per_step", "moe_per_step_dense", "lora", "base"):
        ax.plot([int(b) for b in bs], [lat["batches"][b][arm]["ms_per_step"] for b in bs], marker="o", ms=3, label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (prompts, each with its own gates)")
    ax.set_ylabel("ms per new token (generate time / tokens)")
    ax.set_title(f"generation latency, {lat['device']}", fontsize=9)
    ax.legend(fontsize=6)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, f in zip(axes.flat, (_tradeoff, _sequence, _kasa, _latency)):
        f(ax, res)
        ax.grid(alpha=0.3)
    s = res["settings"]
    fig.suptitle(f"{s['model_name']}, rank {s['rank']}, {s['steps']} steps, seeds {', '.join(map(str, s['seeds']))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
