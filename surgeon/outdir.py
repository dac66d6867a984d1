"""Output folders that appear whole or not at all, and runs that resume.

Everything is written into a hidden sibling `.NAME.partial/`, which holds `plan.json` (what this
run will write) and a journal of finished tensors. Only when all is written and fsynced is it
renamed to NAME. A later run with the same plan picks up the partial folder where it stopped; a
run with a different plan refuses to touch it unless --overwrite.

Under torchrun (surgeon/distributed.py) each rank keeps its own journal, journal.rankN.jsonl, and
what is done is the union of every journal in the folder: a run resumes with any number of ranks,
one process included. Rank 0 creates (or clears) the folder; the others only join it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from surgeon.errors import DistributedError, OutputExistsError
from surgeon.io.writer import Journal, write_json


JOURNALS = "journal*.jsonl"  # journal.jsonl (one process) and journal.rankN.jsonl (torchrun ranks)


class WorkDir:
    def __init__(self, out: Path, plan: dict, overwrite: bool, rank: int | None = None):
        """rank: None for a single process, else this torchrun rank (rank 0 creates the folder)."""
        self.out = Path(out).absolute()
        self.path = self.out.parent / f".{self.out.name}.partial"
        self.overwrite = overwrite
        if rank:
            self._join(plan, rank)
            return
        if self.out.exists() and not overwrite:
            raise OutputExistsError(f"output folder {self.out} exists; pass --overwrite to replace it, or choose another --out.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        plan_file = self.path / "plan.json"
        self.resumed = 0
        if self.path.exists():
            old = json.loads(plan_file.read_text()) if plan_file.exists() else None
            if old != plan:
                if not overwrite:
                    raise OutputExistsError(
                        f"{self.path} holds an interrupted run with different settings; pass --overwrite to discard it, "
                        "or repeat the earlier command to resume it."
                    )
                shutil.rmtree(self.path)
        self.path.mkdir(exist_ok=True)
        if not plan_file.exists():
            write_json(plan_file, plan)
        self.journal = Journal(self.path / ("journal.jsonl" if rank is None else f"journal.rank{rank}.jsonl"))
        self.done = self.records()
        self.resumed = len(self.done)

    def _join(self, plan: dict, rank: int) -> None:
        """A rank > 0 opens the folder rank 0 prepared; it never creates or deletes anything."""
        plan_file = self.path / "plan.json"
        if not plan_file.exists():
            raise DistributedError(
                f"rank {rank} does not see {self.path}, which rank 0 created: every rank must see --out on one shared "
                "filesystem (on several hosts: NFS, Lustre, ...)."
            )
        if json.loads(plan_file.read_text()) != plan:
            raise DistributedError(f"rank {rank} plans different work than rank 0 in {self.path}: every rank must see the same source files.")
        self.journal = Journal(self.path / f"journal.rank{rank}.jsonl")
        self.done = self.records()
        self.resumed = len(self.done)

    def records(self) -> dict[str, dict]:
        """Every finished tensor's record, read from all journals in the folder."""
        done: dict[str, dict] = {}
        for f in sorted(self.path.glob(JOURNALS)):
            done.update(Journal(f).done)
        return done

    def finish(self) -> Path:
        """Drop the bookkeeping, fsync the folder and rename it into place."""
        for p in [self.path / "plan.json", *self.path.glob(JOURNALS)]:
            p.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.out.exists():  # only reached with --overwrite
            trash = self.out.parent / f".{self.out.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.out, trash)
            os.replace(self.path, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        return self.out


def copy_side_files(files: list[Path], dest: Path, skip: set[str] = frozenset()) -> list[str]:
    copied = []
    for f in files:
        if f.name in skip:
            continue
        shutil.copyfile(f, dest / f.name)
        copied.append(f.name)
    return copied
