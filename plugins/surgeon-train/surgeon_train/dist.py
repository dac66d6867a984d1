"""Data parallelism over the factors only, on torch.distributed (gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node 2 -m surgeon train SPLIT_DIR --data d.jsonl --out OUT

torchrun (or `accelerate launch`) sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one
process and nothing here communicates. Every rank holds the whole frozen base; only the trainable
parameters are broadcast at the start and their gradients summed after each step's backward, in one
flat bucket. torch's DistributedDataParallel wrapper is not used: it broadcasts every frozen base
tensor at construction unless told to skip them through a private hook, and a method whose modules
are not all used by every batch (a router picking experts) would need find_unused_parameters=True,
a graph walk per step. A single all-reduce of the (small) factor gradients does the same job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device: str = "auto") -> Dist:
    """The process group from torchrun's environment, and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def broadcast_params(params: list[torch.nn.Parameter], d: Dist) -> None:
    if d.world > 1:
        with torch.no_grad():
            for p in params:
                tdist.broadcast(p.data, src=0)


def sum_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Gradients summed over ranks (each rank's loss is already divided by the global token
    count). A parameter without a gradient gets zeros, on one process as on many."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if d.world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (Σ numel,)
    tdist.all_reduce(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i : i + n].view_as(p.grad))
        i += n


def sum_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        tdist.all_reduce(t)
    return t


def gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        tdist.barrier()


def close() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def min_int(v: int, d: Dist) -> int:
    """The smallest of every rank's v."""
    if d.world == 1:
        return v
    t = torch.tensor([v], device=d.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())
