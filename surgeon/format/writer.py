"""Write sharded safetensors whose layout is planned before any data exists.

Every output tensor's name, dtype and shape is known from the input headers, so the shard
boundaries, headers and byte offsets are fixed up front (`plan_shards`). `ShardSetWriter` then
writes each tensor straight to its place with a positioned write, in any order, as soon as it is
computed: nothing is buffered beyond the tensor in hand, and a resumed run rewrites only what its
`Journal` does not list as done. Shard size is counted in bytes, as transformers does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from surgeon.errors import DiskSpaceError
from surgeon.format.dtypes import DTYPES, dtype_name
from surgeon.options import parse_size  # noqa: F401 (read here by split, absorb and the dry run)

FULL = (errno.ENOSPC, errno.EDQUOT)
# fdatasync every this many bytes per shard, from the writing thread (SURGEON_SYNC_BYTES: a benchmark knob)
SYNC_BYTES = int(os.environ.get("SURGEON_SYNC_BYTES", "")) if os.environ.get("SURGEON_SYNC_BYTES", "").isdigit() else 256 << 20
# SURGEON_WRITEBACK=0 leaves when to write dirty pages to the kernel (a benchmark knob)
_FADVISE = hasattr(os, "posix_fadvise") and os.environ.get("SURGEON_WRITEBACK", "1") != "0"


@contextlib.contextmanager
def disk_errors(path: Path):
    """A full disk (or quota) while writing `path` becomes one line that says how to go on."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL:
            raise
        free = shutil.disk_usage(path.parent).free
        if e.errno == errno.ENOSPC and _no_inodes(path.parent):
            raise DiskSpaceError(
                f"the file system holding {path.parent} has no free inodes left (room for no more files, though "
                f"{human_size(free)} are free) writing {path}; delete some files there and run the same command again."
            ) from None
        raise DiskSpaceError(
            f"the disk is full writing {path} ({human_size(free)} free at {path.parent}); free some space and run the same "
            "command again: it resumes after the tensors already written."
        ) from None


def _no_inodes(folder: Path) -> bool:
    """Whether a file system that has inodes at all has none left (statvfs; btrfs and others report 0 of 0)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_files > 0 and st.f_favail == 0


def check_free_space(folder: Path, files: list[tuple[Path, int]]) -> None:
    """Refuse before writing when the planned files cannot fit (existing files count what they hold)."""
    need = sum(max(0, size - (p.stat().st_blocks * 512 if p.exists() else 0)) for p, size in files)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DiskSpaceError(f"needs {human_size(need)} at {folder}, {human_size(free)} free; free some space or choose another --out.")


def human_size(n: int) -> str:
    """Bytes in the largest decimal unit that leaves a number ≥ 1: "4.21 GB", "310 kB"."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (the small files: shards were synced as written)."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with disk_errors(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy, order-preserving split into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int, prefix: str = "model") -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, int] = {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    chunk = 1 << 30
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + chunk], offset + done)


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these bytes to the disk now, without waiting (Linux: fadvise DONTNEED begins the
    writeback of dirty pages and drops clean ones): the disk stays busy between the periodic fdatasyncs,
    which then find little left to wait for. Durability still comes only from fsync (commit, sync)."""
    if _FADVISE:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class _InOrderHash:
    """xxh3-128 of a file built from the bytes written to it, while they are written strictly in file
    order from its start: the content listing (listing.write_listing) then needs no second read of
    a file that the early writeback (fadvise DONTNEED) has already dropped from the page cache. Any
    other order (a resumed file, a rank writing beside others, a tensor rewritten) gives it up."""

    def __init__(self, head: bytes, total: int):
        self.h, self.at, self.total = xxhash.xxh3_128(head), len(head), total
        self.lock = threading.Lock()  # writers on several threads: the order check and the update as one

    def add(self, offset: int, data: memoryview) -> None:
        with self.lock:
            if self.h is not None and offset == self.at:
                self.h.update(data)
                self.at += len(data)
            else:
                self.h = None

    def digest(self) -> str | None:
        """The file's hash when every one of its bytes went through `add` in order, else None."""
        with self.lock:
            return self.h.hexdigest() if self.h is not None and self.at == self.total else None


def planned_sizes(folder: Path, shards: list[list[OutTensor]], prefix: str = "model", metadata: dict[str, str] | None = None) -> list[tuple[Path, int]]:
    """(file, size) of each shard a ShardSetWriter with these arguments lays out, before it exists."""
    meta = {"format": "pt", **(metadata or {})}
    names = shard_names(len(shards), prefix)
    return [(Path(folder) / n, len(_header_bytes(ts, meta)[0]) + sum(t.nbytes for t in ts)) for n, ts in zip(names, shards)]


class ShardSetWriter:
    """Pre-laid-out shard files in `folder`; `write(name, tensor)` fills one tensor's bytes."""

    def __init__(self, folder: Path, shards: list[list[OutTensor]], prefix: str = "model", metadata: dict[str, str] | None = None, sync_bytes: int | None = None):
        self.folder = Path(folder)
        # flush to disk every `sync_bytes` per file, from the writing thread, so the disk works
        # all along instead of the page cache filling up and the final fsync waiting for it all
        self.sync_bytes = SYNC_BYTES if sync_bytes is None else sync_bytes
        self._unsynced: list[int] = []
        self.files = [self.folder / n for n in shard_names(len(shards), prefix)]
        self.prefix = prefix
        self._where: dict[str, tuple[int, int, OutTensor]] = {}  # name -> (file idx, abs offset, spec)
        self._fds: list[int] = []
        self._hashes: list[_InOrderHash | None] = []  # None: a file reopened with its bytes (resume)
        self._closed: list[tuple[int, int, int]] = []  # each file's (inode, size, mtime_ns) at close
        metadata = {"format": "pt", **(metadata or {})}
        for i, (path, tensors) in enumerate(zip(self.files, shards)):
            head, offsets = _header_bytes(tensors, metadata)
            total = len(head) + sum(t.nbytes for t in tensors)  # as planned_sizes says
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            existing = os.pread(fd, len(head), 0) if os.fstat(fd).st_size == total else b""
            fresh = existing != head
            if fresh:  # new file, or a layout from another plan: start it afresh
                with disk_errors(path):
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, total)
                    os.pwrite(fd, head, 0)
            self._hashes.append(_InOrderHash(head, total) if fresh else None)
            self._fds.append(fd)
            self._unsynced.append(0)
            for t in tensors:
                self._where[t.name] = (i, len(head) + offsets[t.name], t)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        idx, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or dtype_name(tensor.dtype) != spec.dtype:
            raise ValueError(f"{name}: planned {spec.dtype}{list(spec.shape)}, got {dtype_name(tensor.dtype)}{list(tensor.shape)}")
        if spec.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            with disk_errors(self.files[idx]):
                _pwrite_all(self._fds[idx], memoryview(data), offset)
                if self._hashes[idx] is not None:
                    self._hashes[idx].add(offset, memoryview(data))
                _start_writeback(self._fds[idx], offset, spec.nbytes)
                self._unsynced[idx] += spec.nbytes
                if self._unsynced[idx] >= self.sync_bytes:
                    os.fdatasync(self._fds[idx])
                    self._unsynced[idx] = 0

    def sync(self) -> None:
        for i, fd in enumerate(self._fds):
            with disk_errors(self.files[i]):
                os.fsync(fd)
            self._unsynced[i] = 0

    def content_hashes(self) -> dict[Path, tuple[tuple[int, int, int], str]]:
        """file -> ((inode, size, mtime_ns) when closed, xxh3-128 of its bytes), for each file this
        writer wrote whole and in order (listing.py's hash and cache key); empty until closed."""
        return {f: (key, d) for f, h, key in zip(self.files, self._hashes, self._closed)
                if h is not None and (d := h.digest()) is not None}

    def close(self) -> None:
        for fd in self._fds:
            st = os.fstat(fd)
            self._closed.append((st.st_ino, st.st_size, st.st_mtime_ns))
            os.close(fd)
        self._fds = []

    def index(self) -> dict:
        """The model.safetensors.index.json content (only meaningful for several shards)."""
        total = sum(spec.nbytes for _, _, spec in self._where.values())
        weight_map = {name: self.files[i].name for name, (i, _, _) in self._where.items()}
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

    def write_index(self) -> Path | None:
        if len(self.files) == 1:
            return None
        path = self.folder / f"{self.prefix}.safetensors.index.json"
        write_json(path, self.index())
        return path


def write_json(path: Path, obj) -> None:
    """Write JSON via a temporary name + fsync + rename, so a reader never sees half a file."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write a small file via a temporary name + fsync + rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class Journal:
    """Append-only record of finished tensors (one JSON object a line), for resuming a run.

    A line is appended only after the data it names has been fsynced (`commit`), so every name in
    the journal is safely on disk; a torn last line from a crash is ignored.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a torn last line (killed mid-append): cut it off
                data = data[: data.rfind(b"\n") + 1]
                os.truncate(self.path, len(data))
            for line in data.decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                    self.done[rec["name"]] = rec

    def commit_after(self, batch: list, writers: list) -> None:
        """A resume point: wait for the batch's writes [(future, record)], fsync the writers, then
        journal the records; none of them if any write failed (a failed tensor is never "done")."""
        for write, _ in batch:
            write.result()
        for w in writers:
            w.sync()
        self.commit([rec for _, rec in batch])

    def commit(self, recs: list[dict]) -> None:
        if not recs:
            return
        with disk_errors(self.path), open(self.path, "a") as f:
            f.write("".join(json.dumps(rec) + "\n" for rec in recs))
            f.flush()
            os.fsync(f.fileno())
        for rec in recs:
            self.done[rec["name"]] = rec
