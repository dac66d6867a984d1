"""Reading a folder while another run replaces it: refused, never mixed.

    from surgeon.format.readlock import shared, reads
    with shared(Path("sp")):            # hold a shared lock on sp while reading it
        ...
    @reads("split_dir")                 # the same, for the whole call of a read command
    def absorb(split_dir, out, ...): ...

A run that writes an output OUT holds PARENT/.OUT.lock exclusively from its start to its end
(outdir.OutputLock: filelock, which is flock(2)), the final rename of --overwrite onto the old OUT
included. A command that reads a folder S (absorb, export, train, spectra, push, load_split) takes
flock(LOCK_SH) on that same file, beside S's real path (links resolved, so every name of S meets
the same lock), before it opens anything in S, and keeps it until it has read its last file. So:

- a read of S while a run writes or replaces S is refused at once, naming that run;
- a run that would write S while S is read is refused at once, saying it is being read
  (outdir.OutputLock asks `only_readers`);
- any number of reads share S.

flock belongs to the open file, so the kernel drops it when a process dies (kill -9 included). The
last reader removes the lock file: it takes the lock exclusively, without waiting, and unlinks the
file while holding it. Whoever opened that file just before finds, after locking, that it locked a
file no longer in the folder, and tries again (filelock does the same).

Something that does not take the lock (a person's `mv`, an older surgeon) can still move S away
while it is read: on release the reader compares S with the folder it locked (device and inode)
and raises if they differ, so such a read ends in an error, not a silent mix.

Limits: flock is advisory (only surgeon runs take it), and POSIX only (on Windows reads take no lock). Where the lock file cannot be created (S
in a read-only folder, such as a shared cache), S is read without it: no surgeon run can write
beside S there either.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import JSON_READ_ERRORS, OutputLockedError, SplitDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; reads take no lock there
    fcntl = None


def lock_path(folder: Path) -> Path:
    """The lock file the writers of `folder` hold (outdir.OutputLock): PARENT/.NAME.lock."""
    real = Path(folder).resolve()
    return real.parent / f".{real.name}.lock"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open(path: Path) -> int | None:
    """A descriptor of the lock file, created if need be; None where it cannot be created or opened."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return None  # the folder holding S is gone: reading S will say so
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
    return None


def _locked(path: Path, how: int) -> int | None:
    """A descriptor of `path` holding flock `how` (non-blocking), on the file that is at `path` now;
    None when no lock file can exist there. BlockingIOError when another process holds a conflicting lock."""
    while True:
        fd = _open(path)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        if st.st_nlink > 0 and _identity(path) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # locked a file its last holder had just removed: lock the one there now


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {' '.join(h['argv'])}"
    except (*JSON_READ_ERRORS, KeyError, TypeError):  # a reader's empty file, or a damaged one
        return "process unknown"


def only_readers(path: Path) -> bool:
    """Whether the lock file `path`, which an exclusive lock could not take, is held by readers only."""
    if fcntl is None:
        return False
    try:
        fd = _locked(path, fcntl.LOCK_SH)
    except BlockingIOError:
        return False
    if fd is not None:
        os.close(fd)
    return fd is not None


@contextmanager
def shared(folder: Path) -> Iterator[None]:
    """Hold the shared lock of `folder` (see the module docstring) for the body of the with."""
    path = lock_path(folder)
    try:
        fd = _locked(path, fcntl.LOCK_SH) if fcntl is not None else None
    except BlockingIOError:
        raise OutputLockedError(
            f"{folder} is being written by another surgeon run ({_holder(path)}); wait for it to finish, then run this again."
        ) from None
    ident = _identity(Path(folder))
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, path)
    if _identity(Path(folder)) != ident:
        raise SplitDirError(f"{folder} was moved or replaced while surgeon read it (not by a surgeon run); what was read may mix "
                            "two versions, so run the command again.")


def _release(fd: int, path: Path) -> None:
    """Unlock; the last reader removes the lock file first (it holds it exclusively then)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        if _identity(path) == (st.st_dev, st.st_ino):
            path.unlink(missing_ok=True)
    except OSError:  # other readers hold it (BlockingIOError), or it cannot be removed: leave it
        pass
    finally:
        os.close(fd)


def reads(param: str):
    """Decorate a function that reads the folder passed as `param`: the shared lock is held for the call."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with shared(Path(sig.bind(*args, **kwargs).arguments[param])):
                return fn(*args, **kwargs)

        return locked

    return wrap
