"""Several processes, one output folder: `surgeon split` and `absorb` under torchrun.

    torchrun --nproc-per-node 4 -m surgeon split MODEL --rank 64 --out OUT
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m surgeon split ...

torchrun starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or
with WORLD_SIZE=1) everything here is a no-op and the code runs as a single process.

The scheme rests on the writer's fixed layout (surgeon/io/writer.py): every shard file, header and
tensor offset is known before any data exists, so the ranks write into the SAME files, each its
own tensors at their fixed offsets. Rank 0 creates the work folder and lays out the shards
(`main_first`); every rank then takes a share of the tensors balanced by cost (`share`: greedy
longest-processing-time over `matrix_cost`) and streams it in file order with its own journal;
after a barrier rank 0 writes the index, manifest and card and renames the folder into place.
The bytes are those of a single-process run with the same shard size. Several hosts need --out
(and the source) on one shared filesystem.

Failures: the ranks meet only at `sync` points (an all_gather of a status and a payload). A rank
that raises takes part, instead, in exactly one last gather that carries its error (`collective`),
so a peer waiting at its next sync gets it and raises `PeerFailedError` with the same message and
exit code: nobody waits for a rank that is gone. A peer still working hears of the failure
through the rendezvous store (`check_peers`, once per tensor) and stops early. A rank that dies
outright is torchrun's to handle: it stops the other workers. Control messages go over gloo (CPU);
on CUDA the default group is "cpu:gloo,cuda:nccl" so that a trainer can use NCCL for tensors.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import heapq
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from surgeon.errors import DistributedError, PeerFailedError  # noqa: F401 - DistributedError re-exported

# Cost units: one per float64 flop of a solve; moving a byte (read, cast, write) costs BYTE_COST.
# Measured orders: a 4096² float64 eigh takes ~0.3 s on an H100 (~5e11 units/s) and ~15 s on one
# CPU core (~1e10/s), while a byte moves at ~2 GB/s on either: ~250 units per byte on CUDA, ~8 on CPU.
BYTE_COST = {"cuda": 256, "cpu": 8}
TIMEOUT_ENV = "SURGEON_DIST_TIMEOUT"  # seconds a rank waits at a barrier (default 12 h: ranks wait for the slowest)


def matrix_cost(shape: Sequence[int], nbytes: int, device_type: str = "cpu", solve: bool = False, rank: int | None = None) -> int:
    """Work units of one tensor: its bytes × BYTE_COST, plus for a solved (m, n) weight
    min(m,n)³ (the eigensolver) + m·n·min(m,n) (the Gram product), or with `rank` r instead the
    m·n·r of forming B·A (absorb)."""
    cost = nbytes * BYTE_COST.get(device_type, BYTE_COST["cpu"])
    if len(shape) == 2:
        m, n = shape
        if solve:
            k = min(m, n)
            cost += k**3 + m * n * k
        elif rank:
            cost += m * n * rank
    return int(cost)


def assign(costs: Sequence[int], world: int) -> list[int]:
    """The owner rank of each item: greedy longest-processing-time (Graham, 4/3-optimal): heaviest
    first, each to the least-loaded rank (ties: the lower rank). Deterministic on every rank."""
    owner = [0] * len(costs)
    heap = [(0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner


class Group:
    """This process's place among the ranks; the single-process Group (world 1) does nothing."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, pg=None, store=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.pg, self.store = pg, store
        self.loads: list[int] = []  # cost per rank of the last `share`
        self._call = 0  # numbers the collective calls, the same on every rank
        self._depth = 0
        self._broken = False  # a collective itself failed: no further gathers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def journal_rank(self) -> int | None:
        """Which journal this process keeps (WorkDir): None for a single process."""
        return self.rank if self.world > 1 else None

    def device(self, wanted: str) -> str:
        """Each rank on its own GPU: auto / cuda → cuda:LOCAL_RANK when there are several ranks."""
        import torch

        if self.world == 1 or wanted not in ("auto", "cuda") or not torch.cuda.is_available():
            return "cpu" if (self.world > 1 and wanted == "auto") else wanted
        n = torch.cuda.device_count()
        if self.local_rank < n:
            return f"cuda:{self.local_rank}"
        if n == 1:  # a launcher that gives each process one visible GPU
            return "cuda:0"
        raise DistributedError(f"LOCAL_RANK {self.local_rank} but this host has {n} GPUs; use --nproc-per-node {n} or fewer.")

    # ---- meeting points -------------------------------------------------------------------
    def sync(self, payload=None) -> list:
        """Every rank's payload in rank order (a barrier). Raises PeerFailedError on every rank
        if any rank arrived here failed."""
        if self.world == 1:
            return [payload]
        got = self._gather(("ok", payload))
        _raise_failures(got)
        return [p for _, p in got]

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (create the folder, lay out the files); the others then run
        it, and find everything in place."""
        if not self.is_main:
            self.sync()
        yield
        if self.is_main:
            self.sync()

    def from_main(self, fn: Callable):
        """fn() computed on rank 0 only, its result handed to every rank."""
        value = fn() if self.is_main else None
        return self.sync(value)[0]

    def share(self, names: list[str], costs: Sequence[int]) -> list[str]:
        """This rank's part of `names`, in their order (file order: reads stay sequential)."""
        if self.world == 1:
            self.loads = [sum(costs)]
            return list(names)
        digest = hashlib.sha256(json.dumps([list(names), list(costs)]).encode()).hexdigest()
        seen = self.sync((len(names), digest, socket.gethostname()))
        if len({d for _, d, _ in seen}) > 1:
            views = ", ".join(f"rank {r} on {h}: {n} tensors" for r, (n, _, h) in enumerate(seen))
            raise DistributedError(
                f"the ranks disagree on the work left ({views}); every rank must see the same checkpoint and the same "
                "output folder: on several hosts put both on one shared filesystem."
            )
        owner = assign(costs, self.world)
        self.loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(self.world)]
        return [n for n, o in zip(names, owner) if o == self.rank]

    def check_peers(self) -> None:
        """Stop early (PeerFailedError) when another rank has failed; cheap, call once per tensor."""
        if self.world == 1 or self.store is None:
            return
        key = self._key()
        try:
            if not self.store.check([key]):
                return
            info = json.loads(self.store.get(key))
        except Exception:  # noqa: BLE001 - a missing store only costs the early stop
            return
        raise _peer_error(info["rank"], info, self.world, settled=False)

    # ---- the failure protocol ---------------------------------------------------------------
    def _key(self) -> str:
        return f"surgeon/failed/{self._call}"

    def _gather(self, obj) -> list:
        import torch.distributed as td

        out = [None] * self.world
        try:
            td.all_gather_object(out, obj, group=self.pg)
        except BaseException:
            self._broken = True
            raise
        return out

    def _fail(self, exc: Exception) -> Exception:
        """The one gather of a rank that raised, matching the peers' next sync; returns the error
        to raise (a rank stopped by `check_peers` raises the first failure, as rank 0 reports it)."""
        if isinstance(exc, PeerFailedError):
            status, info = "aborted", None  # stopped early by check_peers: the failure is another rank's
        else:
            info = {"rank": self.rank, "type": type(exc).__name__, "message": str(exc), "exit_code": getattr(exc, "exit_code", 1)}
            status = "failed"
            if self.store is not None:
                with contextlib.suppress(Exception):
                    self.store.set(self._key(), json.dumps(info))
        got = self._gather((status, info))
        first = _first_failure(got)
        if status == "aborted":
            return _peer_error(first["rank"], first, self.world, settled=True) if first else exc
        # rank 0 prints the first failure; a rank whose error that is stays quiet (cli/common.py)
        exc.reported = first is not None and (first["rank"] == self.rank or first["message"] == str(exc))
        return exc


def _first_failure(got: list) -> dict | None:
    return next((info for status, info in got if status == "failed"), None)


def _peer_error(rank: int, info: dict, world: int, settled: bool) -> PeerFailedError:
    e = PeerFailedError(f"rank {rank} of {world} failed: {info['message']}")
    e.exit_code = info.get("exit_code", 1)
    e.settled, e.reported = settled, True
    return e


def _raise_failures(got: list) -> None:
    if all(status == "ok" for status, _ in got):
        return
    first = _first_failure(got)
    if first is None:  # only "aborted": cannot happen without a failed rank, but never pass
        raise DistributedError("a rank stopped without saying why; see the other ranks' output.")
    raise _peer_error(first["rank"], first, len(got), settled=True)


_SINGLE = Group()
_GROUP: Group | None = None


def current() -> Group:
    """The Group of this process (set up by `init`; a single-process Group otherwise)."""
    return _GROUP or _SINGLE


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, or not under torchrun (before or without `init`): who prints progress and summaries."""
    return env_rank() == 0


def init() -> Group:
    """Join the torchrun job when WORLD_SIZE > 1 (once per process); a no-op otherwise."""
    global _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _SINGLE
    if _GROUP is not None:
        return _GROUP
    import torch
    import torch.distributed as td

    if not td.is_available():
        raise DistributedError("this torch build has no torch.distributed; run surgeon as a single process.")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 12 * 3600)))
    pg = None
    if td.is_initialized():  # someone (a trainer, a notebook) set it up: keep our control traffic apart
        pg = td.new_group(backend="gloo", timeout=timeout)
    else:
        cuda = torch.cuda.is_available()
        if cuda and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        # object collectives pick the CPU (gloo) when the group has one
        td.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
        atexit.register(_shutdown)
    try:
        store = td.distributed_c10d._get_default_store()  # torchrun's rendezvous store (private API)
    except Exception:  # noqa: BLE001 - without it, failures are still seen at the next sync
        store = None
    _GROUP = Group(rank, td.get_world_size(), local, pg, store)
    return _GROUP


def _shutdown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        with contextlib.suppress(Exception):
            td.destroy_process_group()


def collective(fn: Callable) -> Callable:
    """Run `fn` on every rank of a torchrun job: an error on one rank reaches all of them, and
    every rank returns rank 0's result. A plain call outside torchrun."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        g = init()
        if g.world == 1 or g._depth:
            return fn(*args, **kwargs)
        g._call += 1
        g._depth += 1
        try:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if g._broken or getattr(e, "settled", False):
                    raise
                err = g._fail(e)  # the peers wait at their next sync: tell them, once
                if err is e:
                    raise
                raise err from None
            # the closing barrier: rank 0's last steps (manifest, rename) can fail too
            return g.sync(result if g.is_main else None)[0]
        finally:
            g._depth -= 1

    return run


def linger(seconds: float = 1.0) -> None:
    """A rank > 0 whose error rank 0 reports waits a moment before exiting: torchrun stops every
    worker once one exits with an error, which could cut rank 0 off before it printed."""
    if env_rank() != 0:
        time.sleep(seconds)


def rank_summary(summary: dict, ranks: list[dict]) -> None:
    """Fold the per-rank records of a distributed run into a manifest summary (no-op for one rank)."""
    if len(ranks) < 2:
        return
    stages: dict[str, float] = {}
    for r in ranks:
        for k, v in (r.get("stage_seconds") or {}).items():
            stages[k] = round(stages.get(k, 0.0) + v, 3)
    if "stage_seconds" in summary:
        summary["stage_seconds"] = dict(sorted(stages.items()))  # summed over ranks
    peaks = [r["peak_gpu_bytes"] for r in ranks if r.get("peak_gpu_bytes") is not None]
    if "peak_gpu_bytes" in summary:
        summary["peak_gpu_bytes"] = max(peaks) if peaks else None
    summary["world_size"] = len(ranks)
    summary["ranks"] = ranks
