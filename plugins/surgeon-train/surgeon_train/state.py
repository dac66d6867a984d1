"""The output folder of a training run, its saves, and resuming from the last one.

    OUT/                      a split folder of the same format as SPLIT_DIR (absorb, export and
                              PEFT load it unchanged); its base shards are hard links to SPLIT_DIR's
    OUT/metrics.jsonl         one line per step, and one for the final evaluation
    OUT/surgeon.train.json    the run's settings and results
    OUT/train_state/state.pt  trainable parameters, AdamW and scheduler state, step, every rank's RNG
    OUT/train_state/run.json  the split this run started from (a run killed before its first save
                              starts over without --overwrite, or with --resume)
    OUT/.surgeon.files        every file with its content hash (surgeon/listing.py), rewritten at the
                              start, after each save and at the end: what a later --overwrite may delete

OUT is written once at the start by the runtime's SplitModel.save (base shards linked, never
copied); each later save rewrites only the factor file, in place and atomically (the same
SplitModel.save, pointed at OUT), then the state file (temp + rename). The state holds its own copy
of the trainable parameters, so a crash between the two leaves a consistent resume point.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from surgeon.engine import faults
from surgeon.engine.outdir import OutputLock, check_replaceable
from surgeon.engine.outplace import out_path
from surgeon.errors import OutputExistsError, SplitDirError, UsageError
from surgeon.format.listing import GROWS, TEMP, write_listing
from surgeon.format.splitdir import RUN_LOG
from surgeon.methods.folder import SplitDir
from surgeon.runtime import check_save_target
from surgeon_train import dist

STATE_DIR = "train_state"
STATE = "state.pt"
STARTED = "run.json"  # train_state/run.json: written at the start, so a run killed before its first save is known as one
METRICS = "metrics.jsonl"
SUMMARY = "surgeon.train.json"
# what a run changes between two listings (surgeon/listing.py): the log grows, the state's temporary may be half written
MARKS = {METRICS: GROWS, f"{STATE_DIR}/state.tmp": TEMP, RUN_LOG: TEMP}


def check_out(split_dir: Path, out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Before any work: OUT may not be, hold or lie inside the split or the model it came from, nor be
    a mount point or lie under a file; an existing OUT needs --resume, or --overwrite and surgeon's
    listed files only (checked again under the lock)."""
    out, sd = out_path(out), SplitDir(Path(split_dir))
    check_save_target(out, sd.inputs())
    if not out.exists() or resume or unsaved(out, sd.path):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} exists; add --resume to continue the run saved there, --overwrite to start over, or choose another --out.")
    check_replaceable(out, sd.inputs())


def unsaved(out: Path, split: Path) -> bool:
    """OUT holds a run of this trainer from `split`, killed before its first save: nothing in it is worth resuming."""
    try:
        started = json.loads((out / STATE_DIR / STARTED).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(started, dict) and started.get("split") == str(split.resolve()) and not (out / STATE_DIR / STATE).exists()


STATE_KEYS = {"step", "plan", "params", "optimizer", "scheduler", "rng"}


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["cpu"])
    if device.type == "cuda" and s.get("cuda") is not None:
        torch.cuda.set_rng_state(s["cuda"], device)


def _step_of(line: str) -> int | None:
    """The step of a metrics line of a training step; None for an event (eval), a blank or torn line."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("step"), int)
    return rec["step"] if ok else None


class RunDir:
    """OUT and what lives in it; only rank 0 writes."""

    def __init__(self, out: Path, sm, d: dist.Dist):
        self.out = out_path(out)
        self.sm = sm
        self.d = d
        self.state_file = self.out / STATE_DIR / STATE
        self._metrics = None
        self._lock = None  # rank 0 holds OUT's lock for the whole run: a second run on it fails at once
        self._hashes: dict = {}  # the listing's cache: files this run already hashed, by (inode, size, mtime)

    def _take_lock(self) -> None:
        if self.d.main and self._lock is None:
            self._lock = OutputLock(self.out).acquire()

    # --- start --------------------------------------------------------------------------------
    def unsaved(self) -> bool:
        return unsaved(self.out, self.sm.split.path)

    def create(self, overwrite: bool) -> None:
        """A fresh run: OUT becomes a copy of the split (base shards hard-linked). A run killed before
        its first save is started over without --overwrite (its files still checked by the listing)."""
        self._take_lock()
        exists, unsaved = self.out.exists(), self.unsaved()
        dist.barrier(self.d)  # every rank has looked before rank 0 writes
        if exists and not overwrite and not unsaved:
            raise OutputExistsError(
                f"{self.out} exists; add --resume to continue the run saved there, --overwrite to start over, or choose another --out."
            )
        if self.d.main:
            split = self.sm.split.path.resolve()
            self.sm.save(self.out, overwrite=overwrite or unsaved)
            for stale in (METRICS, SUMMARY):  # when SPLIT_DIR was itself a trained folder
                (self.out / stale).unlink(missing_ok=True)
            self.relist(busy=[f"{STATE_DIR}/{STARTED}"])  # a kill before the next listing leaves nothing unlisted
            (self.out / STATE_DIR).mkdir(exist_ok=True)
            (self.out / STATE_DIR / STARTED).write_text(json.dumps({"split": str(split)}) + "\n")
            self.relist()
        dist.barrier(self.d)
        self.sm.split = SplitDir(self.out)  # later saves write OUT's factor file in place

    def relist(self, busy: list[str] = ()) -> None:
        """Rewrite OUT's content listing (what a later --overwrite may delete); unchanged files are not
        read again. busy: files about to be rewritten, listed as surgeon's whatever they hold until
        the next listing, so that a kill in between leaves OUT replaceable."""
        write_listing(self.out, MARKS | {b: TEMP for b in busy}, self._hashes)

    def close(self) -> None:
        """Release OUT's lock (a refused or failed run leaves no lock file behind)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def resume(self, plan: dict, named: list[tuple[str, torch.nn.Parameter]], opt, sched) -> int:
        """Load the last save; returns the number of steps it had done."""
        self._take_lock()
        if not self.state_file.exists():
            raise UsageError(f"--resume: {self.out} holds no saved training state ({STATE_DIR}/{STATE}); run without --resume to start.")
        st = self._read_state()
        old = st["plan"]
        diff = [f"{k} {old.get(k)!r} → {v!r}" for k, v in plan.items() if old.get(k) != v]
        if diff:
            raise UsageError(
                f"--resume: these settings differ from the run saved in {self.out}: {'; '.join(diff)}. "
                "Use the same settings, or start a new run with --overwrite."
            )
        missing = [n for n, _ in named if n not in st["params"]]
        if missing:
            raise SplitDirError(f"{self.state_file} lacks trainable parameters {missing[:3]}; it belongs to another split.")
        with torch.no_grad():
            for n, p in named:
                p.copy_(st["params"][n])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if len(st["rng"]) == self.d.world:
            _set_rng_state(st["rng"][self.d.rank], self.d.device)
        step = int(st["step"])
        if self.d.main:
            self.relist(busy=[METRICS])
            self._truncate_metrics(step)
            self.relist()
        dist.barrier(self.d)
        self.sm.split = SplitDir(self.out)
        return step

    def _read_state(self) -> dict:
        """The saved state, or one line saying it is damaged (a file cut short, not a torch save)."""
        try:
            st = torch.load(self.state_file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            raise SplitDirError(f"{self.state_file} is damaged ({first}); it cannot be resumed: start over with --overwrite "
                                "instead of --resume.") from None
        if not isinstance(st, dict) or not STATE_KEYS <= st.keys() or not isinstance(st["plan"], dict) or not isinstance(st["params"], dict):
            raise SplitDirError(f"{self.state_file} is not a surgeon training state; start over with --overwrite instead of --resume.")
        return st

    def _truncate_metrics(self, step: int) -> None:
        """Steps after the last save are done again, so their lines go; so does a line a kill cut short."""
        f = self.out / METRICS
        if f.exists():
            keep = [ln for ln in f.read_text(errors="replace").splitlines() if _step_of(ln) is not None and _step_of(ln) <= step]
            f.write_text("".join(ln + "\n" for ln in keep))

    # --- during the run -----------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.d.main:
            return
        if self._metrics is None:
            self._metrics = (self.out / METRICS).open("a", buffering=1)
        self._metrics.write(json.dumps(record) + "\n")

    def save(self, step: int, plan: dict, named: list[tuple[str, torch.nn.Parameter]], opt, sched) -> None:
        rng = dist.gather(_rng_state(self.d.device), self.d)  # every rank takes part
        if not self.d.main:
            return
        self.relist(busy=[self.sm.split.factors_file.name, f"{STATE_DIR}/{STATE}"])
        self.sm.save(self.out)  # in place: the factor file only
        faults.point("train-save")  # tests: a kill between the factor file and the state
        state = {
            "step": step,
            "plan": plan,
            "params": {n: p.detach().to("cpu", copy=True) for n, p in named},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng,
        }
        self.state_file.parent.mkdir(exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_file)
        self.relist()

    def finish(self, summary: dict) -> None:
        if self.d.main:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            self.relist(busy=[SUMMARY])
            (self.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
            self.relist()
            self.close()
        dist.barrier(self.d)
