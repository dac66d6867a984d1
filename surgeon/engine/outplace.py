"""Where an output may go, and what surgeon leaves beside it: the --out path as resolved, the checks
before any work (not under a file, not a mount point), the lock, and the trash of a replaced folder.

    PARENT/.OUT.lock            the exclusive lock of a run on OUT (filelock); holds the holder's pid
    PARENT/.OUT.trash-XXXXXXXX  a folder being deleted; marked inside (.surgeon-trash), so that only
                                surgeon's own are ever swept, never a user's folder of a similar name
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from surgeon.errors import OutputLockedError, UnsafeOutputError, UsageError
from surgeon.format.readlock import only_readers


def out_path(out: Path) -> Path:
    """--out as an absolute path with its folders resolved (`a/../o` is `./o`, and no folder `a` is
    ever made), its last part kept as given (a link there is refused by name, not followed)."""
    p = Path(out).expanduser().absolute()
    return p.resolve() if p.name in ("", ".", "..") else p.parent.resolve() / p.name


def check_place(out: Path) -> None:
    """Refuse, before any work, an --out that cannot become a folder renamed into place: under a
    file, or a mount point (the work folder beside it would sit on another file system)."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{anc} is a file, not a folder, so {out} cannot be made; choose an --out whose folders are folders.")
    if out.is_dir() and not out.is_symlink() and os.path.ismount(out):
        raise UnsafeOutputError(f"{out} is a mount point, which surgeon cannot rename a finished output onto; "
                                f"give a folder inside it (--out {out / 'NAME'}).")


def folder_mode() -> int:
    """The mode a new folder gets from the umask (tempfile.mkdtemp makes 0700)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


TRASH_MARK = ".surgeon-trash"  # inside every trash folder surgeon makes: only those are ever swept


def discard(folder: Path, out: Path, put: Callable[[], None] | None = None) -> None:
    """Delete a folder surgeon made, atomically as far as anyone can tell: renamed into a marked trash
    folder beside `out` first, so a kill mid-delete leaves no half folder under a meaningful name.
    put: called once the folder is in the trash (it puts the new one in its place)."""
    trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.trash-"))
    (trash / TRASH_MARK).touch()
    os.replace(folder, trash / "x")
    if put is not None:
        put()
    shutil.rmtree(trash, ignore_errors=True)


def sweep_trash(out: Path) -> None:
    """Trash folders of killed runs beside `out`: marked, and holding nothing but what discard put there."""
    for p in out.parent.glob(f".{out.name}.trash-*"):
        if p.is_dir() and not p.is_symlink() and (p / TRASH_MARK).is_file() and {q.name for q in p.iterdir()} <= {TRASH_MARK, "x"}:
            shutil.rmtree(p, ignore_errors=True)


class OutputLock:
    """An exclusive, non-blocking lock on an output path (filelock: flock, released by the kernel if
    the process dies). A second run on the same --out fails at once, naming the holder."""

    def __init__(self, out: Path):
        out = out_path(out)
        self.path = out.parent / f".{out.name}.lock"
        self._lock = None

    def acquire(self) -> OutputLock:
        from filelock import FileLock, Timeout

        check_place(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_ours()
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            self._openable()  # filelock reports a lock file it cannot even create as held
            if only_readers(self.path):
                raise OutputLockedError(f"{self.path.parent / self.path.name[1:-5]} is being read by another surgeon run (absorb, export, train, "
                                        "spectra or push); wait for it to finish, or choose another --out.") from None
            raise OutputLockedError(f"{self.path.parent / self.path.name[1:-5]} is being written by another surgeon run ({self._holder()}); "
                                    "wait for it to finish, or choose another --out.") from None
        self._lock = lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:6]}
        with open(self.path, "w") as f:  # the lock is on the open file description, not the content
            json.dump(info, f)
        return self

    def _check_ours(self) -> None:
        """A file of the lock's name that surgeon did not write (empty, or its holder record) is the
        user's: never truncated nor deleted."""
        try:
            head = b"" if not self.path.is_symlink() else b"link"
            if not head and self.path.exists():
                with open(self.path, "rb") as f:
                    head = f.read(8)
        except OSError:
            return
        if head and not head.startswith(b'{"pid": '[: len(head)]):
            raise UnsafeOutputError(f"{self.path} exists and is not a surgeon lock; move it away, or choose another --out.")

    def _openable(self) -> None:
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as e:
            raise UsageError(f"cannot create {self.path} ({e.strerror}); choose an --out in a folder you can write to.") from None

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']}, since {h['since']}: {' '.join(h['argv'])}"
        except Exception:
            return "process unknown"

    def release(self) -> None:
        """Unlink the lock file, then unlock: filelock (>= 4.3) retries an acquire that won the
        flock of an unlinked file, so a racing run never holds a lock nobody else can see."""
        if self._lock is not None:
            self.path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
