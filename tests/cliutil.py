"""What the CLI tests share: invoking the app in-process, and checking that an error is one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from surgeon.cli import build_app

runner = CliRunner()


def run(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    """The output of a failed command, which must be exactly one line starting with "error:"."""
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return result.output


def tree_hashes(folder: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), but the names in `skip`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name not in skip}
