"""`--help` renders what it says: brackets kept, every choice listed, one example per command (issue 23).

    python -m pytest -q tests/test_help.py
"""

from __future__ import annotations

import re

import pytest
from cliutil import run

from surgeon.linalg.decompose import SOLVERS
from surgeon.methods import names
from surgeon.methods.moe_runtime import POOLINGS

COMMANDS = ["split", "absorb", "export", "spectra", "check", "push", "train"]


def help_text(*cmd: str) -> str:
    r = run(*cmd, "--help")
    assert r.exit_code == 0, r.output
    return re.sub(r"\s+", " ", r.output)  # the words, whatever the terminal width


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_an_example(cmd):
    text = help_text(cmd)
    assert f"Example: surgeon {cmd} " in text


def test_brackets_are_not_eaten():
    assert "pip install 'surgeon[quant]'" in help_text("split")
    assert "{block: [gates]}" in help_text("absorb")
    assert "[default: milora]" in help_text("split")


def test_every_choice_is_listed():
    split = help_text("split")
    solver = split[split.index("--solver"):split.index("--tol")]
    assert all(s in solver for s in SOLVERS), solver
    method = split[split.index("--method"):split.index("--rank")]
    assert all(m in method for m in names()), method
    pooling = split[split.index("--pooling"):]
    assert all(p in pooling for p in POOLINGS)
    dtype = split[split.index("--dtype"):split.index("--device")]
    assert all(d in dtype for d in ("float32", "bfloat16", "float16")) and "exact" in dtype
    assert all(b in help_text("absorb") for b in ("auto", "original", "residual"))
    assert "lora" in help_text("export") and "kasa" in help_text("export")


def test_train_help_lists_the_data_formats():
    text = help_text("train")
    assert all(k in text for k in ('"messages"', '"instruction"', '"conversations"', '"prompt"', '"text"'))


def test_top_level_help_lists_check():
    assert "check" in help_text()


def test_spectra_from_the_source_show_progress(tiny, tmp_path):
    from surgeon.commands.split import SplitOptions, split

    split(str(tiny["tiny-llama"]), tmp_path / "s", SplitOptions(method="milora", rank=4))
    r = run("spectra", tmp_path / "s", "--out", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert "spectra from the source" in r.output and "14/14 tensors" in r.output
    r = run("spectra", tmp_path / "s", "--out", tmp_path / "q.png", "--quiet")
    assert r.exit_code == 0 and "tensors" not in r.output


def test_dry_run_table_sorts_layers_as_numbers_and_keeps_names(tmp_path):
    from surgeon.cli.commands import natural_key

    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.mlp", "model.layers.1.attn"]
    assert sorted(names, key=natural_key) == ["model.layers.1.attn", "model.layers.1.mlp", "model.layers.2.mlp", "model.layers.10.mlp"]
    from typer.testing import CliRunner

    from surgeon.cli import build_app

    r = CliRunner().invoke(build_app(), ["split", "fixtures/tiny-llama", "-r", "4", "--dry-run", "--out", str(tmp_path / "o")],
                           env={"COLUMNS": "60"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "…" not in r.output
