"""Split folders for every arm, made once and shared between worker processes (file locks).

Only surgeon's stable entry points are used: surgeon.commands.split.split and surgeon.commands.absorb.absorb; the
folder format (surgeon.json, adapter_model.safetensors, surgeon.init.safetensors) is read directly.

  lora    plain LoRA as PEFT initialises it: base W unchanged, A ~ U(±1/√in) (kaiming_uniform_,
          a=√5), B = 0, scale α/r = 1. Made from the shared milora split of the same model: every file
          hard-linked, the residual replaced by (a hard link to) the original weights, the factors
          and init factors rewritten with the PEFT init, so it trains in the very same loop.
  others  `split --method M` at the arm's rank; kasa per seed (its A and d are random).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import torch

TARGETS = {"all": ["all-linear"], "qv": ["q_proj", "v_proj"]}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def weight_files(model: Path) -> list[Path]:
    return sorted(p for p in Path(model).glob("*.safetensors") if not p.name.startswith(("adapter_", "surgeon.")))


def target_shapes(model: Path, targets: str) -> dict[str, tuple[int, int]]:
    """module name -> (out, in) of every targeted weight: the blocks' linears named in TARGETS."""
    from safetensors import safe_open

    names = ALL_LINEAR if targets == "all" else tuple(TARGETS[targets])
    out = {}
    for f in weight_files(model):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                mod = k[: -len(".weight")]
                if k.endswith(".weight") and ".layers." in k and mod.rsplit(".", 1)[-1] in names:
                    out[mod] = tuple(h.get_slice(k).get_shape())
    return dict(sorted(out.items()))


def lora_count(model: Path, targets: str, rank: int) -> int:
    return sum(rank * (o + i) for o, i in target_shapes(model, targets).values())


def null_sizes(model: Path, targets: str, energy: float = 0.95, device: str = "cpu") -> list[int]:
    """NuSA's null rank n = k − p per targeted weight (p: smallest rank with Σσ² ≥ ρ·total), as the method."""
    from safetensors import safe_open

    shapes = target_shapes(model, targets)
    sizes = []
    for f in weight_files(model):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k[: -len(".weight")] in shapes:
                    s = torch.linalg.svdvals(h.get_tensor(k).to(device, torch.float32)).double().cpu()  # (k,)
                    cum = s.square().cumsum(0) / s.square().sum()
                    p = min(int((cum < energy).sum()) + 1, s.numel())
                    sizes.append(s.numel() - p)
    return sizes


def nusa_rank_for(budget: int, sizes: list[int], kmin: int) -> tuple[int, int]:
    """The r whose EFFECTIVE count Σ min(n_i, r)² is closest to `budget` (and that count); r < kmin, the
    smallest min(out, in) of the targets (the split's bound)."""
    top = max(1, min(max(sizes), kmin - 1))
    best = min(range(1, top + 1), key=lambda r: abs(sum(min(n, r) ** 2 for n in sizes) - budget))
    return best, sum(min(n, best) ** 2 for n in sizes)


def split_folder(model: Path, out: Path, method: str, rank: int, targets: str, seed: int, device: str) -> Path:
    """`surgeon split` into `out` once: an existing complete folder is reused (locked, so workers share it)."""
    from surgeon.commands.split import SplitOptions, split

    with locked(out):
        if not (out / "surgeon.json").exists():
            split(str(model), out, SplitOptions(method=method, rank=rank, target=TARGETS[targets], seed=seed, overwrite=True,
                                                device="cpu" if device == "cpu" else "auto", spectra=False))
    return out


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def lora_folder(model: Path, milora: Path, out: Path, seed: int) -> Path:
    """PEFT-default LoRA as a split folder, from a milora split of `model` (see the module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from surgeon.format.splitdir import factor_hashes

    with locked(out):
        if (out / "surgeon.json").exists():
            return out
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards = [p.name for p in weight_files(milora)]
        for f in milora.iterdir():
            if f.is_file() and f.name not in shards and f.name not in ("adapter_model.safetensors", "surgeon.init.safetensors", "surgeon.json"):
                _link(f, tmp / f.name)
        src = weight_files(model)
        if len(src) == 1 and len(shards) == 1:  # same tensors in one file each: the original weights, linked
            _link(src[0], tmp / shards[0])
        else:
            orig = {k: v for f in src for k, v in load_file(str(f)).items()}
            for s in shards:
                with safe_open(str(milora / s), "pt") as h:
                    save_file({k: orig[k].contiguous() for k in h.keys()}, str(tmp / s), metadata={"format": "pt"})
        with safe_open(str(milora / "adapter_model.safetensors"), "pt") as h:
            shapes = {k: h.get_slice(k).get_shape() for k in h.keys()}
        g = torch.Generator().manual_seed(10_007 * seed + 1)
        new = {}
        for k in sorted(shapes):
            if ".lora_A." in k:  # (r, in): PEFT's kaiming_uniform_(a=√5) bound = 1/√in
                new[k] = (torch.rand(shapes[k], generator=g, dtype=torch.float32) * 2 - 1) / math.sqrt(shapes[k][1])
            else:  # (out, r)
                new[k] = torch.zeros(shapes[k], dtype=torch.float32)
        for name in ("adapter_model.safetensors", "surgeon.init.safetensors"):
            save_file(new, str(tmp / name), metadata={"format": "pt"})
        mf = json.loads((milora / "surgeon.json").read_text())
        mf["eval_methods_note"] = "plain LoRA (PEFT default init) built by bench/eval/folders.py from a milora split"
        mf["factor_hashes"] = factor_hashes(tmp / "surgeon.init.safetensors")  # the new untrained factors, as split records them
        (tmp / "surgeon.json").write_text(json.dumps(mf, indent=2))
        os.replace(tmp, out)
    return out


def merge(trained: Path, out: Path) -> Path:
    from surgeon.commands.absorb import AbsorbOptions, absorb

    absorb(trained, out, AbsorbOptions(overwrite=True))
    return out


def effective_params(path: Path) -> int:
    """Trainable elements that can move: NuSA Σ e² (e = filled null-space size), otherwise every factor element."""
    from safetensors import safe_open

    mf = json.loads((path / "surgeon.json").read_text())
    f = path / ("adapter_model.safetensors" if mf.get("peft_adapter") else "surgeon.factors.safetensors")
    n = 0
    with safe_open(str(f), "pt") as h:
        for k in h.keys():
            if k.endswith("nusa_A"):
                e = int((h.get_tensor(k).abs().sum(1) > 0).sum())
                n += e * e
            elif not k.endswith(("nusa_B", "nusa_M")):
                n += math.prod(h.get_slice(k).get_shape())
    return n


def budget_plan(settings: dict, model: Path, device: str) -> dict:
    """Per target set: LoRA's trainable count at the protocol's rank, and NuSA's rank matched on its effective count."""
    plan = {"budget": {}, "nusa_rank": {}, "nusa_effective": {}, "null_sizes": {}}
    for t in settings["targets"]:
        budget = lora_count(model, t, settings["rank"])
        sizes = null_sizes(model, t, device=device)
        r, eff = nusa_rank_for(budget, sizes, min(min(sh) for sh in target_shapes(model, t).values()))
        plan["budget"][t], plan["nusa_rank"][t], plan["nusa_effective"][t], plan["null_sizes"][t] = budget, r, eff, sizes
    return plan
