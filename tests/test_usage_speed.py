"""Usage errors of `surgeon split` come before torch is imported (issue 23; timings: bench/bench_usage_errors.py).

    python -m pytest -q tests/test_usage_speed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import one_error_line, run

from surgeon.commands import precheck
from surgeon.commands.split import SplitOptions, split
from surgeon.errors import UsageError
from surgeon.format.dtypes import USER_DTYPES
from surgeon.linalg.decompose import SOLVERS
from surgeon.methods import names

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys, json
from typer.testing import CliRunner
from surgeon.cli import build_app
r = CliRunner().invoke(build_app(), sys.argv[1:])
print(json.dumps({"torch": "torch" in sys.modules, "code": r.exit_code, "out": r.output}))
"""


def test_the_copied_name_lists_match_the_registries():
    assert list(precheck.METHODS) == names()
    assert precheck.SOLVERS == SOLVERS
    assert set(precheck.DTYPES) == set(USER_DTYPES)


@pytest.mark.parametrize("args, says", [
    (["split", "--method", "lora", "x", "--out", "y"], "unknown method 'lora'"),
    (["split", "fixtures/tiny-llama", "--rank", "100000", "--out", "y"], "--rank 100000 is not below"),
    (["split", "fixtures/tiny-llama", "--dtype", "int4", "--out", "y"], "--dtype 'int4' unknown"),
    (["split", "fixtures/tiny-llama", "--null-rank", "3", "--out", "y"], "--null-rank is an option of --method nusa"),
])
def test_usage_errors_come_before_torch_is_imported(tmp_path, args, says):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "surgeon-train"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["code"] == 2 and says in got["out"] and not got["torch"], got
    assert not (ROOT / "y").exists()


@pytest.mark.parametrize("rank", [64, 100000])
def test_the_precheck_refuses_only_what_the_full_check_refuses(tiny, tmp_path, rank):
    one_error_line(run("split", tiny["tiny-llama"], "--rank", rank, "--out", tmp_path / "a"))
    with pytest.raises(UsageError):
        split(str(tiny["tiny-llama"]), tmp_path / "b", SplitOptions(rank=rank))


def test_a_rank_pattern_is_left_to_the_full_check(tiny, tmp_path):
    r = run("split", tiny["tiny-llama"], "--rank", "100000", "--rank-pattern", ".*=4", "--out", tmp_path / "s", "-q")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra, says", [
    (["--method", "moe", "--pooling", "max"], "--pooling 'max'"),
    (["--shard-size", "lots"], "--shard-size"),
    (["--target", "nothing_like_this"], "no linear weight matches"),
])
def test_errors_keep_the_order_of_the_full_check(tiny, tmp_path, extra, says):
    """The default --rank 64 is too large for tiny-llama, but the error plan_split finds first is the one reported."""
    assert says in one_error_line(run("split", tiny["tiny-llama"], *extra, "--out", tmp_path / "o"))
