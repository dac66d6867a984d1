"""Read a checkpoint one tensor at a time.

A `Checkpoint` knows every tensor's name, dtype, shape and byte range from the shard headers
alone (nothing is loaded). `read(name)` does one positioned read of exactly that tensor's bytes;
`stream(names)` does the same on a background thread, `prefetch` tensors ahead, so reading
overlaps the caller's work while host memory stays at a few tensors.

    python -c "from surgeon.io import Checkpoint; c = Checkpoint.open(['model.safetensors']); print(len(c))"
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.errors import CorruptCheckpointError, SourceError
from surgeon.io.dtypes import DTYPES, dtype_name

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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header; raise CorruptCheckpointError on any damage."""
    try:
        size = path.stat().st_size
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
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}); the file is damaged, re-download it.") from e
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dt, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptCheckpointError(f"{path}: malformed header entry for {name!r}.") from err
        if dt not in DTYPES:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has dtype {dt}, which surgeon cannot read.")
        numel = 1
        for s in shape:
            numel *= s
        if e - b != numel * DTYPES[dt][1] or b < 0:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} byte range {b}..{e} does not match shape {list(shape)} {dt}.")
        if data_start + e > size:
            raise CorruptCheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + e} but the file has {size}; re-download it."
            )
        infos[name] = TensorInfo(name, dt, shape, path, data_start + b, e - b)
    # file order = data order, which makes reads sequential
    ordered = dict(sorted(infos.items(), key=lambda kv: kv[1].offset))
    return ordered, meta


class Checkpoint:
    """All tensors of a set of shard files, addressable by name."""

    def __init__(self, tensors: dict[str, TensorInfo], metadata: dict[str, str], pickled: dict[Path, dict] | None = None):
        self.tensors = tensors
        self.metadata = metadata
        self._pickled = pickled or {}

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

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype; `pin`: in page-locked memory (fast, async H2D)."""
        info = self.tensors[name]
        if info.file in self._pickled:
            t = self._pickled[info.file][name].contiguous().clone()
            return t.pin_memory() if pin else t
        if pin and info.nbytes:
            host = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)  # torch caches pinned blocks
            buf = host.numpy()
        else:
            host = None
            buf = bytearray(info.nbytes)
        view = memoryview(buf)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            got = 0
            while got < info.nbytes:
                n = os.preadv(fd, [view[got:]], info.offset + got)
                if n <= 0:
                    raise CorruptCheckpointError(f"{info.file}: unexpected end of file reading {name!r}.")
                got += n
        finally:
            os.close(fd)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype][0])
        if host is not None:
            return host.view(DTYPES[info.dtype][0]).reshape(info.shape)
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype][0]).reshape(info.shape)

    def stream(self, names: Iterable[str], prefetch: int = 2, pin: bool = False) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, tensor) in the given order; a background thread reads `prefetch` ahead."""
        names = list(names)
        if prefetch <= 0:
            for n in names:
                yield self.tensors[n], self.read(n, pin)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for n in names:
                    if stop.is_set():
                        return
                    q.put((self.tensors[n], self.read(n, pin)))
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
