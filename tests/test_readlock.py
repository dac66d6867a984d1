"""Reading a split while another run replaces it (issue 27, finding 8): refused, never mixed.

    PYTHONPATH=$PWD python -m pytest tests/test_readlock.py -q

Before surgeon.format.readlock, `absorb S --base residual` while `split M --out S --overwrite` replaced S merged
the old residual with the new factors (172 of 272 tensors matched neither result), and a train started
during a re-split wrote rank-4 factors into a folder labelled rank 8. The first tests hold the writers'
lock (outdir.OutputLock) or a reader's (readlock.shared) in this process and run the other side; the last
races two processes for a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cliutil import one_error_line, run, tree_hashes
from safetensors.torch import load_file

from surgeon.engine.outdir import OutputLock
from surgeon.errors import OutputLockedError, SplitDirError
from surgeon.format.readlock import lock_path, shared
from surgeon.runtime import load_split

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"


@pytest.fixture
def sp(tiny, tmp_path) -> Path:
    out = tmp_path / "sp"
    assert run("split", tiny["tiny-llama"], "--rank", "4", "--out", out, "-q").exit_code == 0
    return out


READERS = [
    ("absorb", lambda sp, o: ["absorb", sp, "--out", o, "-q"]),
    ("export", lambda sp, o: ["export", sp, "--out", o]),
    ("spectra", lambda sp, o: ["spectra", sp, "--out", o.with_suffix(".png")]),
    ("push --check", lambda sp, o: ["push", sp, "--check"]),
    ("train", lambda sp, o: ["train", sp, "--data", DATA, "--out", o, "--steps", "1", "--seq-len", "32", "-q"]),
]


@pytest.mark.parametrize("name, argv", READERS, ids=[r[0] for r in READERS])
def test_a_read_is_refused_while_a_run_writes_the_folder(sp, tmp_path, name, argv):
    before = tree_hashes(sp)
    lock = OutputLock(sp).acquire()  # what split/absorb/train --out sp [--overwrite] hold from start to end
    try:
        r = run(*argv(sp, tmp_path / "o"))
        assert r.exit_code == 2
        msg = one_error_line(r)
        assert f"{sp} is being written by another surgeon run (pid {os.getpid()}" in msg and "wait for it to finish" in msg
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()
        with pytest.raises(OutputLockedError):
            load_split(sp)
    finally:
        lock.release()
    assert tree_hashes(sp) == before
    r = run(*argv(sp, tmp_path / "o"))  # the same command once the writer is gone
    assert r.exit_code == 0, r.output
    assert not lock_path(sp).exists()  # the reader removed the lock file it made


def test_replacing_or_writing_a_folder_is_refused_while_it_is_read(sp, tiny, tmp_path):
    before = tree_hashes(sp)
    other = tmp_path / "other"
    assert run("split", tiny["tiny-llama"], "--rank", "2", "--out", other, "-q").exit_code == 0
    with shared(sp):
        for argv in (["split", tiny["tiny-llama"], "--rank", "8", "--out", sp, "--overwrite", "-q"],
                     ["absorb", other, "--out", sp, "--overwrite", "-q"],
                     ["train", other, "--data", DATA, "--out", sp, "--overwrite", "--steps", "1", "--seq-len", "32", "-q"]):
            r = run(*argv)
            assert r.exit_code == 2, (argv, r.output)
            last = r.output.strip().splitlines()[-1]  # train prints transformers' loading bar before it opens --out
            assert "Traceback" not in r.output and last.startswith(f"error: {sp} is being read by another surgeon run"), r.output
        assert tree_hashes(sp) == before
        assert run("absorb", sp, "--out", tmp_path / "m", "-q").exit_code == 0  # readers share it
        assert lock_path(sp).exists()  # still held by this reader
    assert not lock_path(sp).exists()
    assert run("split", tiny["tiny-llama"], "--rank", "8", "--out", sp, "--overwrite", "-q").exit_code == 0
    assert json.loads((sp / "surgeon.json").read_text())["rank"] == 8


def test_every_name_of_the_folder_meets_the_same_lock(sp, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(sp)
    assert lock_path(link) == lock_path(tmp_path / "x" / ".." / "sp") == sp.parent / ".sp.lock"
    lock = OutputLock(sp).acquire()
    try:
        with pytest.raises(OutputLockedError, match="being written"):
            load_split(link)
    finally:
        lock.release()


def test_a_folder_moved_away_while_read_is_an_error_not_a_mix(sp, tmp_path):
    with pytest.raises(SplitDirError, match="moved or replaced while surgeon read it"), shared(sp):
        sp.rename(tmp_path / "elsewhere")  # what a person's mv does: it takes no lock
        sp.mkdir()
    assert not lock_path(sp).exists()


RACE = """
import sys, time
from pathlib import Path
from surgeon.commands.absorb import AbsorbOptions, absorb
from surgeon.errors import OutputLockedError
from surgeon.commands.split import SplitOptions, split
role, model, s, out, seconds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5])
end, n, refused = time.monotonic() + seconds, 0, 0  # after the imports: both loops run for `seconds`
while time.monotonic() < end:
    try:
        if role == "writer":
            split(model, s, SplitOptions(rank=8 if n % 2 else 4, overwrite=True, workers=1))
            time.sleep(0.05)
        else:
            absorb(s, out / str(n), AbsorbOptions(base="residual"))
            time.sleep(0.05)
        n += 1
    except OutputLockedError:
        refused += 1
        time.sleep(0.01)
    except Exception as e:  # what a read of a half-replaced folder may raise: reported
        print("ERROR", type(e).__name__, str(e)[:200], flush=True)
        n += 1
print(role, n, refused, flush=True)
"""


def test_absorb_racing_a_resplit_gets_one_whole_result_or_a_refusal(tiny, tmp_path):
    """Two processes for 6 s: one re-splits S at rank 4, 8, 4, ... with --overwrite, the other absorbs S
    with --base residual again and again. Each absorb either is refused or equals the absorb of one whole split."""
    model = str(tiny["tiny-llama"])
    want = []
    for r in (4, 8):
        s = tmp_path / f"s{r}"
        assert run("split", model, "--rank", r, "--out", s, "-q").exit_code == 0
        assert run("absorb", s, "--out", tmp_path / f"m{r}", "--base", "residual", "-q").exit_code == 0
        want.append(load_file(tmp_path / f"m{r}" / "model.safetensors"))
    s, outs = tmp_path / "S", tmp_path / "outs"
    assert run("split", model, "--rank", 4, "--out", s, "-q").exit_code == 0
    outs.mkdir()
    script = tmp_path / "race.py"
    script.write_text(textwrap.dedent(RACE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), role, model, str(s), str(outs), "6"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for role in ("writer", "reader")]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    assert "ERROR" not in results[1][0], results[1][0]
    written = int(results[0][0].split()[-2])
    absorbed = sorted(outs.iterdir())
    assert written >= 2 and absorbed, (results[0][0], results[1][0])  # both sides got turns
    mixed = []
    for o in absorbed:
        got = load_file(o / "model.safetensors")
        if not any(all(got[k].equal(w[k]) for k in w) and got.keys() == w.keys() for w in want):
            mixed.append(o.name)
    assert not mixed, f"{len(mixed)} of {len(absorbed)} absorbs match neither whole split"
