"""Read a checkpoint one tensor at a time.

A `Checkpoint` knows every tensor's name, dtype, shape and byte range from the shard headers
alone (nothing is loaded). `read(name)` does one positioned read of exactly that tensor's bytes;
`stream(names)` reads ahead on background threads, `prefetch` tensors ahead, so reading overlaps
the caller's work while host memory stays at a few tensors: each tensor's bytes are fetched as
`READ_CHUNK`-byte positioned reads in file order, `READ_DEPTH` of them in flight (one stream of
reads gets about a third of a fast disk's rate; several in flight get all of it).

    python -c "from surgeon.format import Checkpoint; c = Checkpoint.open(['model.safetensors']); print(len(c))"
"""

from __future__ import annotations

import json
import os
import queue
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.errors import CorruptCheckpointError, SourceError
from surgeon.format.dtypes import DTYPES, dtype_name

_MAX_HEADER = 100 * 1024 * 1024
READ_CHUNK = 16 << 20  # bytes per positioned read of stream()
READ_DEPTH = 8  # stream()'s reads in flight


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def regular_file(path: Path) -> os.stat_result:
    """stat of `path`, which must be a regular file (a FIFO or a device would block or never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror}).") from e
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{path} is not a regular file (a FIFO, device or folder); surgeon reads only regular files: replace it with the file itself.")
    return st


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _library_check(path: Path, raw: bytes, size: int) -> list[str]:
    """The safetensors library's own verdict on the file: its tensor names, or CorruptCheckpointError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors_rust.SafetensorError, OSError from the mmap
        end = _declared_end(raw)
        if end is not None and 8 + len(raw) + end > size:
            why = f"truncated: the header declares {8 + len(raw) + end} bytes but the file has {size}"
        else:
            why = f"not a valid safetensors file ({e})"
        raise CorruptCheckpointError(f"{path}: {why}; re-download it.") from None


def _declared_end(raw: bytes) -> int | None:
    """The largest data offset a header names, if it parses that far (for the message only)."""
    try:
        h = json.loads(raw)
        return max(int(v["data_offsets"][1]) for k, v in h.items() if k != "__metadata__")
    except Exception:
        return None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header, as strictly as the safetensors library does (it
    checks first), plus duplicate keys; raise CorruptCheckpointError naming the file on any damage."""
    size = regular_file(path).st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{path}: file is {size} bytes, too short to be safetensors; re-download it.")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CorruptCheckpointError(f"{path}: header length {n} does not fit a {size}-byte file (truncated or not safetensors); re-download it.")
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror}).") from e
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}); the file is damaged, re-download it.") from None
    names = _library_check(path, raw, size)
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos = {name: _info(path, name, h, data_start) for name, h in header.items()}
    if sorted(infos) != sorted(names):  # cannot differ after the library's check; kept as a guard
        raise CorruptCheckpointError(f"{path}: the header's tensors differ from what safetensors reads; re-download it.")
    # file order = data order, which makes reads sequential
    ordered = dict(sorted(infos.items(), key=lambda kv: kv[1].offset))
    return ordered, meta


def _info(path: Path, name: str, h: dict, data_start: int) -> TensorInfo:
    dt, shape, (b, e) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
    if dt not in DTYPES:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has dtype {dt}, which surgeon cannot read.")
    return TensorInfo(name, dt, shape, path, data_start + b, e - b)


def content_hash(data) -> str:
    """A tensor's identity: xxh3-128 of its stored bytes (~30 GB/s on one core), "xxh3_128:<hex>"."""
    import xxhash

    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


def file_hash(path: Path, chunk: int = 8 << 20) -> str:
    """content_hash of a whole (small) file, read in chunks: a split's factor files, for resume plans."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "xxh3_128:" + h.hexdigest()


def tensor_hash(t: torch.Tensor) -> str:
    """content_hash of a contiguous tensor's stored bytes (what split records and absorb checks)."""
    return content_hash(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror}).") from None


def _pread_range(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    """Exactly len(view) bytes of `info`'s file from `offset`, with positioned reads (no shared file
    offset between threads); a short file or an I/O error becomes one line naming file and tensor."""
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as e:
            raise SourceError(f"{info.file}: cannot read {info.name!r} ({e.strerror}); check the disk, or copy the model again.") from None
        if n <= 0:
            raise CorruptCheckpointError(f"{info.file}: unexpected end of file reading {info.name!r}; re-download it.")
        got += n


def _pread_into(info: TensorInfo, view: memoryview) -> None:
    """Exactly the tensor's bytes, in one positioned read (and more if the kernel returns fewer)."""
    fd = _open(info.file)
    try:
        _pread_range(fd, view, info.offset, info)
    finally:
        os.close(fd)


class _Fds:
    """One read-only descriptor per file, shared by the read threads (positioned reads need no lock)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = _open(path)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class _Pending:
    """A tensor whose chunks are being read: its buffer and the reads (and hash) still in flight."""

    info: TensorInfo
    host: torch.Tensor | None  # pinned bytes, or None for a plain bytearray `buf`
    buf: object
    reads: list[Future]
    digest: Future | None = None
    done: torch.Tensor | None = None  # pickled sources: read whole

    def wait(self) -> None:
        for f in self.reads:
            f.result()  # the first failed read raises its one-line error

    def result(self) -> torch.Tensor:
        self.wait()
        if self.done is not None:
            return self.done
        return _as_tensor(self.info, self.host, self.buf)


def _hash_after(p: _Pending) -> str:
    p.wait()
    return content_hash(p.buf)


def _as_tensor(info: TensorInfo, host: torch.Tensor | None, buf) -> torch.Tensor:
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype][0])
    if host is not None:
        return host.view(DTYPES[info.dtype][0]).reshape(info.shape)
    return torch.frombuffer(buf, dtype=DTYPES[info.dtype][0]).reshape(info.shape)


def _buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor | None, object]:
    if pin and nbytes:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # torch caches pinned blocks: reused
        return host, host.numpy()
    return None, bytearray(nbytes)


class Checkpoint:
    """All tensors of a set of shard files, addressable by name."""

    def __init__(self, tensors: dict[str, TensorInfo], metadata: dict[str, str], pickled: dict[Path, dict] | None = None):
        self.tensors = tensors
        self.metadata = metadata
        self._pickled = pickled or {}
        self.digests: dict[str, str] = {}  # name -> content_hash of the bytes read, for reads with digest=True

    @classmethod
    def open(cls, files: Iterable[Path]) -> Checkpoint:
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for f in files:
            infos, meta = read_header(Path(f))
            metadata.update(meta)
            for name, info in infos.items():
                if name in tensors:
                    raise CorruptCheckpointError(f"tensor {name!r} appears in both {tensors[name].file.name} and {f.name}.")
                tensors[name] = info
        return cls(tensors, metadata)

    @classmethod
    def open_pickled(cls, files: Iterable[Path]) -> Checkpoint:
        """Pickled weights (.bin/.pt), loaded with weights_only=True and mmap: only on --allow-pickle."""
        tensors: dict[str, TensorInfo] = {}
        pickled: dict[Path, dict] = {}
        for f in files:
            regular_file(Path(f))
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise CorruptCheckpointError(f"{f}: cannot load with weights_only=True ({e}).") from e
            pickled[Path(f)] = sd
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    continue
                tensors[name] = TensorInfo(name, dtype_name(t.dtype), tuple(t.shape), Path(f), 0, t.numel() * t.element_size())
        return cls(tensors, {}, pickled)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, pin: bool = False, digest: bool = False) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype; `pin`: in page-locked memory (fast, async H2D);
        `digest`: also record the content hash of its bytes in `self.digests[name]`."""
        info = self.tensors[name]
        if info.file in self._pickled:
            t = self._pickled[info.file][name].contiguous().clone()
            if digest:
                self.digests[name] = tensor_hash(t)
            return t.pin_memory() if pin else t
        host, buf = _buffer(info.nbytes, pin)
        _pread_into(info, memoryview(buf))
        if digest:
            self.digests[name] = content_hash(buf)
        return _as_tensor(info, host, buf)

    def stream(self, names: Iterable[str], prefetch: int = 2, pin: bool = False, digest: bool = False,
               depth: int = READ_DEPTH, chunk: int = READ_CHUNK) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, tensor) in the given order. A background thread allocates the next tensors'
        buffers, at most `prefetch` ahead of the caller, and hands their `chunk`-byte pieces, in file
        order, to `depth` read threads; with `digest`, a hash thread records each tensor's content
        hash while the caller works on the previous one."""
        names = list(names)
        if prefetch <= 0:
            for n in names:
                yield self.tensors[n], self.read(n, pin, digest)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        fds = _Fds()
        pool = ThreadPoolExecutor(max(1, depth), thread_name_prefix="surgeon-read")
        hasher = ThreadPoolExecutor(1, thread_name_prefix="surgeon-hash") if digest else None

        def work() -> None:
            try:
                for n in names:
                    if stop.is_set():
                        return
                    q.put(self._start(n, pin, fds, pool, hasher, chunk))
                q.put(None)
            except BaseException as e:  # handed to the consumer
                q.put(e)

        t = threading.Thread(target=work, name="surgeon-reader", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                tensor = item.result()
                if item.digest is not None:
                    self.digests[item.info.name] = item.digest.result()
                yield item.info, tensor
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)
            pool.shutdown(wait=True, cancel_futures=True)  # no read may outlive its descriptor
            if hasher is not None:
                hasher.shutdown(wait=True, cancel_futures=True)
            fds.close()

    def _start(self, name: str, pin: bool, fds: _Fds, pool: ThreadPoolExecutor, hasher, chunk: int) -> _Pending:
        """Allocate one tensor's buffer and queue its chunked reads (and its hash, after them)."""
        info = self.tensors[name]
        if info.file in self._pickled:
            return _Pending(info, None, None, [], done=self.read(name, pin, digest=hasher is not None))
        host, buf = _buffer(info.nbytes, pin)
        view = memoryview(buf).cast("B") if info.nbytes else memoryview(b"")
        fd = fds.get(info.file) if info.nbytes else -1
        step = max(1, chunk)
        reads = [pool.submit(_pread_range, fd, view[a : a + step], info.offset + a, info) for a in range(0, info.nbytes, step)]
        p = _Pending(info, host, buf, reads)
        if hasher is not None:
            p.digest = hasher.submit(_hash_after, p)
        return p
