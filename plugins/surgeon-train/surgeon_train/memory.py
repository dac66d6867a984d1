"""Fit the batch to the machine: the micro-batch, and activation checkpointing when memory is short.

    surgeon train SPLIT --data d.jsonl --batch-size 8        # 8 rows a step, in micro-batches that fit

Before the first step, one row is run forward under torch.autograd.graph.saved_tensors_hooks, which
sees every tensor autograd keeps for the backward pass: their bytes (distinct storages, parameters
left out) are what one more row of a micro-batch costs. The budget is what the device has free
after the model is loaded: on CUDA torch.cuda.mem_get_info plus what torch's allocator holds unused,
on the CPU MemAvailable (/proc/meminfo), capped by the cgroup's memory.max (less what it uses, plus
its inactive page cache), shared by the processes of a torchrun job on the host. Then

    micro = min(rows per step, cap, ⌊(FRACTION·budget − loss workspace − margin) / (SLACK·bytes per row)⌋)

with cap = ⌈1024 / --seq-len⌉ rows on the CPU, where a micro-batch of 1024 tokens already keeps the
cores busy and a larger one only costs memory (SmolLM2-135M, B=4 × T=1024: 12.2 GiB peak RSS in one
pass, 3.9 GiB in passes of one row; bench/RESULTS_train.md), and no cap on CUDA, where larger
micro-batches run faster. Where even one row does not fit: the same with activation checkpointing
(each block keeps only its input, ~n_blocks·L·d values a row, and recomputes one block at a time in
the backward pass), where allowed. The requested batch is reached by accumulating micro-batches;
the step's gradient is the same (the loss is a sum over tokens divided by the step's token count).
The estimate is a guard, not a promise: an out-of-memory error in a step (CUDA; on the CPU the
kernel usually kills the process first) halves the micro-batch (then turns checkpointing on) and
runs the step again from its start (step.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from surgeon.errors import SurgeonError
from surgeon.runtime.memory import host_available

FRACTION = {"cuda": 0.9, "cpu": 0.75}  # of the free memory; the CPU is often shared
CPU_TOKENS = 1024  # tokens per micro-batch that keep CPU cores busy; more only costs memory
SLACK = 1.25  # transient tensors of the forward/backward pass on top of the saved ones
MARGIN = 512 * 2**20


class TrainMemoryError(SurgeonError):
    """Not even one row of --seq-len fits the memory that is free."""


def available_bytes(device: torch.device) -> int:
    """Memory this process may still use on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def saved_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `run()` executes (which must
    not run backward). The hook keeps each storage, not the tensor: a saved output handed back by
    the pack hook would form a cycle through its grad_fn that no garbage collector sees, and the
    probe's whole graph would stay alive."""
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in frozen:
                seen[st.data_ptr()] = st  # held until the end, so no address is reused and counted twice
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse)
            pass
        return None

    def unpack(_):
        raise RuntimeError("surgeon_train.memory.saved_bytes: the probe's graph cannot run backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        run()
    total = sum(st.nbytes() for st in seen.values())
    seen.clear()
    return total


@dataclass
class Plan:
    micro_batch: int
    checkpointing: bool
    row_bytes: int  # saved for backward per row, as measured
    budget_bytes: int
    reason: str

    def as_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "grad_checkpointing": self.checkpointing,
                "row_gib": round(self.row_bytes / 2**30, 3), "budget_gib": round(self.budget_bytes / 2**30, 2), "reason": self.reason}


def plan(rows: int, row_bytes: int, ckpt_row_bytes: int, workspace: int, budget: int, device: torch.device,
         checkpointing: bool | None, seq_len: int) -> Plan:
    """The largest micro-batch ≤ rows that fits; checkpointing only when one row does not fit
    without it (checkpointing=None), always (True) or never (False)."""
    room = FRACTION[device.type] * budget - workspace - MARGIN

    cap = rows if device.type == "cuda" else min(rows, max(1, -(-CPU_TOKENS // seq_len)))

    def fit(per_row: int) -> int:
        return min(cap, int(room // max(1, SLACK * per_row)))

    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    if checkpointing is not True and fit(row_bytes) >= 1:
        m = fit(row_bytes)
        why = ("the whole batch fits" if m == rows else f"{CPU_TOKENS} tokens a pass keep the CPU busy" if m == cap
               else f"{gib(SLACK * row_bytes)} a row, {gib(room)} free for activations")
        return Plan(m, False, row_bytes, budget, why)
    if checkpointing is not False and fit(ckpt_row_bytes) >= 1:
        m = fit(ckpt_row_bytes)
        why = "asked for" if checkpointing else f"one row needs {gib(SLACK * row_bytes)}, {gib(room)} free: checkpointing"
        return Plan(m, True, ckpt_row_bytes, budget, why)
    need = ckpt_row_bytes if checkpointing is not False else row_bytes
    raise TrainMemoryError(
        f"one row of --seq-len {seq_len} needs about {gib(SLACK * need + workspace + MARGIN)} on {device.type} "
        f"but {gib(FRACTION[device.type] * budget)} is free; lower --seq-len, free memory"
        + (", or allow --grad-checkpointing" if checkpointing is False else "") + " (or force a size with --micro-batch)."
    )


def micro_batches(rows: torch.Tensor, micro: int) -> list[torch.Tensor]:
    """rows split into ⌈n/micro⌉ micro-batches of near-equal size."""
    k = max(1, math.ceil(len(rows) / micro))
    return [c for c in torch.tensor_split(rows, k) if len(c)]


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())
