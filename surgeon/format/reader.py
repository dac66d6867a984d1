"""Read a checkpoint one tensor at a time.

A `Checkpoint` knows every tensor's name, dtype, shape and byte range from the shard headers
alone (nothing is loaded). `read(name)` does one positioned read of exactly that tensor's bytes;
`stream(names)` does the same on a background thread, `prefetch` tensors ahead, so reading
overlaps the caller's work while host memory stays at a few tensors.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.errors import CorruptCheckpointError, SourceError
from surgeon.format.dtypes import DTYPES, dtype_name

_MAX_HEADER = 100 * 1024 * 1024


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


def _pread_into(info: TensorInfo, view: memoryview) -> None:
    """Exactly the tensor's bytes, with positioned reads (no shared file offset between threads)."""
    fd = os.open(info.file, os.O_RDONLY)
    try:
        got = 0
        while got < info.nbytes:
            n = os.preadv(fd, [view[got:]], info.offset + got)
            if n <= 0:
                raise CorruptCheckpointError(f"{info.file}: unexpected end of file reading {info.name!r}; re-download it.")
            got += n
    finally:
        os.close(fd)


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
        if pin and info.nbytes:
            host = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)  # torch caches pinned blocks
            buf = host.numpy()
        else:
            host = None
            buf = bytearray(info.nbytes)
        _pread_into(info, memoryview(buf))
        if digest:
            self.digests[name] = content_hash(buf)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype][0])
        if host is not None:
            return host.view(DTYPES[info.dtype][0]).reshape(info.shape)
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype][0]).reshape(info.shape)

    def stream(self, names: Iterable[str], prefetch: int = 2, pin: bool = False, digest: bool = False) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, tensor) in the given order; a background thread reads `prefetch` ahead (and,
        with `digest`, hashes each tensor's bytes there, while the caller works on the previous one)."""
        names = list(names)
        if prefetch <= 0:
            for n in names:
                yield self.tensors[n], self.read(n, pin, digest)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for n in names:
                    if stop.is_set():
                        return
                    q.put((self.tensors[n], self.read(n, pin, digest)))
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
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)
