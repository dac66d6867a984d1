"""Output folders as transactions: locked, written under a temporary name, renamed when complete,
resumed after a kill at any moment, and never replacing what surgeon did not write.

    PARENT/.OUT.lock                 an exclusive lock (filelock) for the whole run; holds the holder's pid
                                     (commands that read OUT share it: surgeon/readlock.py)
    PARENT/.OUT.partial/             everything is written here
        .surgeon/plan.json           what this run writes; a resumed run must plan exactly the same
        .surgeon/journal*.jsonl      finished tensors, appended only after their bytes are fsynced
    PARENT/OUT/                      .OUT.partial renamed once complete; its .surgeon/ is removed last

A run killed anywhere resumes with the same command: before the rename the partial folder is picked
up (its plan equal); after it, OUT still holds .surgeon/ with the same plan, and the run only cleans
up. `--overwrite` replaces an existing OUT only when it is empty, or surgeon wrote it (its surgeon.json)
and every file in it is one surgeon listed, unchanged (surgeon/listing.py); never the input, a folder
holding the input or inside it, /, home or the current folder.
The old OUT is moved aside (.OUT.replaced) just before the rename and deleted just after.

Under torchrun (surgeon/distributed.py) each rank keeps its own journal, journal.rankN.jsonl, and
what is done is the union of every journal in the folder: a run resumes with any number of ranks,
one process included. Rank 0 locks and creates (or clears) the folder; the others only join it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from surgeon.engine import faults
from surgeon.engine.outplace import (  # noqa: F401 (OutputLock: imported from here)
    OutputLock,
    check_place,
    discard,
    folder_mode,
    out_path,
    sweep_trash,
)
from surgeon.errors import DistributedError, OutputExistsError, UnsafeOutputError
from surgeon.format.listing import FILES, TEMP, WORK, seeded_cache, unlisted_reason, write_listing  # noqa: F401 (FILES: imported from here)
from surgeon.format.splitdir import RUN_LOG, is_surgeon_output, read_manifest
from surgeon.format.writer import Journal, disk_errors, fsync_tree, write_json

JOURNALS = "journal*.jsonl"  # journal.jsonl (one process) and journal.rankN.jsonl (torchrun ranks)
COMMIT_SECONDS = 2.0  # how often finished tensors are fsynced and journaled: what a kill may lose


def _normal(obj):
    return json.loads(json.dumps(obj))


def _listing(folder: Path, n: int = 3) -> str:
    items = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def unsafe_reason(out: Path, inputs: list[Path]) -> str | None:
    """Why `out` must never be replaced (None when nothing forbids it beyond its content)."""
    if out.is_symlink():
        return f"{out} is a symbolic link; give the folder it points to, or another --out"
    r = out.resolve()
    if r == Path("/").resolve():
        return f"{out} is the root folder"
    for place, what in ((Path.home().resolve(), "your home folder"), (Path.cwd().resolve(), "the current folder")):
        if r == place:
            return f"{out} is {what}"
        if place.is_relative_to(r):
            return f"{out} holds {what}"
    for i in inputs:
        i = Path(i).resolve()
        if r == i or i.is_relative_to(r):
            return f"{out} is or holds the input {i}"
        if r.is_relative_to(i):
            return f"{out} lies inside the input {i}"
    return None


def check_outside(out: Path, inputs: list[Path]) -> None:
    """Refuse an --out inside an input folder: writing there changes the input, --overwrite or not."""
    r = Path(out).resolve()
    for i in inputs:
        if Path(i).is_dir() and r != Path(i).resolve() and r.is_relative_to(Path(i).resolve()):
            raise UnsafeOutputError(f"{out} lies inside the input {i}; surgeon never writes into its input, so choose an --out outside it.")


def _content_reason(folder: Path) -> str | None:
    """Why the folder's content forbids deleting it: not a folder, or not only what surgeon wrote."""
    if not folder.is_dir():
        return f"{folder} is a file, not an output folder"
    if not any(folder.iterdir()):
        return None
    if not is_surgeon_output(folder):
        return f"{folder} was not written by surgeon (no surgeon.json) and holds {_listing(folder)}"
    return unlisted_reason(folder)


def check_replaceable(out: Path, inputs: list[Path]) -> None:
    """Raise unless `out` is a folder --overwrite may delete: empty, or written by surgeon, and no input."""
    why = unsafe_reason(out, inputs) or _content_reason(out)
    if why:
        raise UnsafeOutputError(f"refusing to replace: {why}; surgeon replaces only empty folders and its own outputs, so choose another --out.")


class WorkDir:
    """The work folder of one output; `finish()` renames it into place. Use as a context manager
    (or call `close()`) so that the lock is released on failure."""

    def __init__(self, out: Path, plan: dict, overwrite: bool, rank: int | None = None, inputs: list[Path] = ()):
        """rank: None for a single process, else this torchrun rank (rank 0 creates the folder)."""
        self.out = out_path(out)
        self.path = self.out.parent / f".{self.out.name}.partial"
        self.plan = _normal(plan)
        self.inputs = [Path(i) for i in inputs]
        self.complete = False  # OUT already holds this very run, finished but for its cleanup
        self.created = False  # this run made the work folder (nothing of an earlier run is in it)
        self.lock = None
        if rank:
            self._join(rank)
            return
        check_outside(self.out, self.inputs)
        check_place(self.out)
        finished_here = self._plan_at(self.out) == self.plan  # this very run, killed after its rename
        if (self.out.exists() or self.out.is_symlink()) and not finished_here:  # refused before anything is created beside it
            why = unsafe_reason(self.out, self.inputs)
            if why:
                raise UnsafeOutputError(f"{why}; choose another --out (surgeon never replaces its input, /, home or the current folder).")
        self.lock = OutputLock(self.out).acquire()
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise
        faults.point("workdir-open")
        self.journal = Journal(self.path / WORK / ("journal.jsonl" if rank is None else f"journal.rank{rank}.jsonl"))
        self.done = self.records()
        self.resumed = len(self.done)

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # --- opening ------------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        if self.out.exists() or self.out.is_symlink():
            if self._plan_at(self.out) == self.plan:  # killed after the rename: only the cleanup is left
                self.complete, self.path = True, self.out
                return
            if not overwrite and self.out.is_dir() and any(self.out.iterdir()):
                if is_surgeon_output(self.out):
                    raise OutputExistsError(f"output folder {self.out} exists; pass --overwrite to replace it, or choose another --out.")
                raise OutputExistsError(f"{self.out} exists and was not written by surgeon (it holds {_listing(self.out)}); choose another --out.")
            check_replaceable(self.out, self.inputs)
        self._clear_stale()
        if self.path.exists():
            old = self._plan_at(self.path)
            if old == self.plan:
                return  # resume
            if old is None:
                raise UnsafeOutputError(f"{self.path} exists but was not made by surgeon; move it away, or choose another --out.")
            if not overwrite:
                raise OutputExistsError(f"{self.path} holds an interrupted run with different settings; repeat that command to resume it, "
                                        "or pass --overwrite to discard it.")
            self._discard_tree(self.path)
        self._create()

    def _create(self) -> None:
        """The work folder appears whole, plan included (a kill never leaves one without its plan)."""
        tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.partial.new-"))
        os.chmod(tmp, folder_mode())  # the output gets the umask's mode, as a folder made by mkdir would
        (tmp / WORK).mkdir()
        write_json(tmp / WORK / "plan.json", self.plan)
        os.rename(tmp, self.path)
        self.created = True

    def _clear_stale(self) -> None:
        """Half-made work folders of killed runs (holding only their plan) and half-deleted trash go."""
        for p in self.out.parent.glob(f".{self.out.name}.partial.new-*"):
            if {q.relative_to(p).as_posix() for q in p.rglob("*")} <= {WORK, f"{WORK}/plan.json", f"{WORK}/plan.json.tmp"}:
                shutil.rmtree(p, ignore_errors=True)
        sweep_trash(self.out)

    def _discard_tree(self, folder: Path) -> None:
        discard(folder, self.out)

    @staticmethod
    def _plan_at(folder: Path) -> dict | None:
        try:
            return json.loads((folder / WORK / "plan.json").read_text())
        except (OSError, ValueError):
            return None

    def _join(self, rank: int) -> None:
        """A rank > 0 opens the folder rank 0 prepared; it never creates or deletes anything."""
        old = self._plan_at(self.path)
        if old is None and self._plan_at(self.out) == self.plan:  # rank 0 found the run finished
            self.complete, self.path, old = True, self.out, self.plan
        if old is None:
            raise DistributedError(
                f"rank {rank} does not see {self.path}, which rank 0 created: every rank must see --out on one shared "
                "filesystem (on several hosts: NFS, Lustre, ...)."
            )
        if old != self.plan:
            raise DistributedError(f"rank {rank} plans different work than rank 0 in {self.path}: every rank must see the same source files.")
        self.journal = Journal(self.path / WORK / f"journal.rank{rank}.jsonl")
        self.done = self.records()
        self.resumed = len(self.done)

    def records(self) -> dict[str, dict]:
        """Every finished tensor's record, read from all journals in the folder."""
        done: dict[str, dict] = {}
        for f in sorted((self.path / WORK).glob(JOURNALS)):
            done.update(Journal(f).done)
        return done

    # --- finishing ----------------------------------------------------------------------------
    def finish(self, hashes: dict | None = None) -> Path:
        """fsync everything, rename the work folder into place (moving an old OUT aside), then drop
        the bookkeeping. Each step is safe to repeat after a kill. hashes: content hashes of files
        that their writer computed while writing them (not read again for the listing)."""
        trash = self.out.parent / f".{self.out.name}.replaced"
        if not self.complete:
            # the run log's timings differ from run to run
            write_listing(self.path, {RUN_LOG: TEMP}, seeded_cache(self.path, hashes or {}))
            fsync_tree(self.path)
            faults.point("before-rename")
            if self.out.exists():  # only reached with --overwrite, over a folder check_replaceable allowed
                if trash.exists():
                    self._drop(trash)
                os.replace(self.out, trash)
                faults.point("after-move-aside")
            os.replace(self.path, self.out)
            _fsync_dir(self.out.parent)
            faults.point("after-rename")
        if trash.exists():
            self._drop(trash)
        _drop_bookkeeping(self.out / WORK)
        _fsync_dir(self.out)
        self.close()
        return self.out

    def discard(self) -> None:
        """Delete this run's work folder (a run that can never complete), then unlock."""
        if not self.complete and self.lock is not None:
            self._discard_tree(self.path)
        self.close()

    def _drop(self, replaced: Path) -> None:
        """The older OUT moved aside by a replacing run: surgeon's (check_replaceable allowed it)."""
        if _content_reason(replaced) is None:  # else something was added meanwhile: it stays
            self._discard_tree(replaced)


def open_work(dist, out: Path, plan: dict, overwrite: bool, inputs: list[Path], layout):
    """(WorkDir, layout(work)): rank 0 first locks and creates the work folder and lays out its files
    (`layout`, skipped when an earlier run already finished); the lock is released if that fails."""
    with dist.main_first():
        work = WorkDir(out, plan, overwrite, rank=dist.journal_rank, inputs=inputs)
        try:
            files = None if work.complete else layout(work)
        except BaseException:
            work.discard() if work.created else work.close()  # a folder this run just made holds nothing worth resuming
            raise
    return work, files


def finish_completed(work: WorkDir, dist) -> dict:
    """A run found its own finished folder (killed after the rename): clean up and return its manifest.
    Every rank has seen the plan before rank 0 removes it."""
    dist.sync()
    if dist.is_main:
        work.finish()
    return finished(work.out)


def finished(out: Path) -> dict:
    """The manifest of a folder an earlier, killed run completed, with its run log under "run"."""
    manifest = read_manifest(out)
    try:
        manifest["run"] = json.loads((out / RUN_LOG).read_text())
    except (OSError, ValueError):
        manifest["run"] = {}
    return manifest


def _drop_bookkeeping(work: Path) -> None:
    """Remove .surgeon/: journals first and the plan last, so a kill in between still leaves the
    plan by which the next run recognises its own finished folder."""
    for p in sorted(work.glob(JOURNALS)) + [work / "plan.json.tmp", work / "plan.json"]:
        p.unlink(missing_ok=True)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_side_files(files: list[Path], dest: Path, skip: set[str] = frozenset()) -> list[str]:
    copied = []
    for f in files:
        if f.name in skip:
            continue
        with disk_errors(dest / f.name):  # a full disk names the file being written, not its source
            shutil.copyfile(f, dest / f.name)
        copied.append(f.name)
    return copied
