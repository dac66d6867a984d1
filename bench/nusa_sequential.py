"""Two sequential tasks on the aligned tiny-clip fixture, NuSA-CL vs plain LoRA, over seeds and ranks.

    PYTHONPATH=$PWD python bench/nusa_sequential.py --ranks 8 40 --seeds 0 1 2 3 4

Runs tests/test_nusa.py::sequential_tasks (CPU, a few seconds per seed) and prints one row per run:
task losses before → after, how much task B moved task A's outputs and the pretraining family's
outputs (relative norm), and the weight-space overlap of the task-B update with the task-A update.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "fixtures")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from make_fixtures import build
    from test_nusa import sequential_tasks

    with tempfile.TemporaryDirectory() as tmp:
        fixture = build(Path(tmp) / "fx")["tiny-clip"]
        print("rank seed | arm  | task A loss    | task B loss    | A drift | D0 drift | overlap")
        for rank in args.ranks:
            for seed in args.seeds:
                work = Path(tmp) / f"r{rank}s{seed}"
                work.mkdir()
                r = sequential_tasks(fixture, work, seed=seed, steps=args.steps, rank=rank)
                for arm in ("nusa", "lora"):
                    a, b = r[f"{arm}_A"], r[f"{arm}_B"]
                    print(
                        f"{rank:4d} {seed:4d} | {arm} | {a[0]:.4f}→{a[1]:.4f} | {b[0]:.4f}→{b[1]:.4f} | "
                        f"{r[f'{arm}_drift_A']:.3f}   | {r[f'{arm}_drift_D0']:.3f}    | {r[f'{arm}_overlap']:.4f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
