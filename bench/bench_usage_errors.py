"""How long a usage error takes to reach the user (issue 23: under 1 s), against importing torch.

    PYTHONPATH=.:plugins/surgeon-train python bench/bench_usage_errors.py [--repeat 5]

Each command runs in a fresh `python -m surgeon` process (what a user's shell does); the median of
--repeat runs is printed, with `python -c "import torch"` as the cost the early checks avoid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "fixtures" / "tiny-llama")


def cases(tmp: Path) -> dict[str, list[str]]:
    return {
        "split --method lora x --out y": ["-m", "surgeon", "split", "--method", "lora", "x", "--out", str(tmp / "y")],
        "split M --rank 100000 --out y": ["-m", "surgeon", "split", TINY, "--rank", "100000", "--out", str(tmp / "y")],
        "split M --dtype int4 --out y": ["-m", "surgeon", "split", TINY, "--dtype", "int4", "--out", str(tmp / "y")],
        "surgeon --version": ["-m", "surgeon", "--version"],
        "python -c 'import torch' (reference)": ["-c", "import torch"],
    }


def timed(args: list[str], env: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "surgeon-train"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'command':45} {'median s':>9} {'min s':>7} {'exit':>5}")
        for name, args in cases(Path(tmp)).items():
            runs = [timed(args, env) for _ in range(a.repeat)]
            secs = [s for s, _ in runs]
            print(f"{name:45} {statistics.median(secs):9.3f} {min(secs):7.3f} {runs[0][1]:5d}")


if __name__ == "__main__":
    main()
