"""`surgeon split --dry-run`: what a split would do, from the checkpoint headers alone; writes nothing.

    surgeon split --method pissa MODEL --rank 16 --quantize nf4 --out q-split --dry-run [--json]

Reports the targets (shape, rank, alpha, scale, trainable parameters), the output files with their
exact sizes (every shard's header and data are planned before a split reads any data, so these are
the sizes the split writes), the free space at --out, and an estimate of the time on this device:
the cost model that balances torchrun ranks (surgeon/distributed.py: min(m,n)³ + m·n·min(m,n) per
solve, a byte cost per byte moved), timed on one small solve here. The estimate counts each LoftQ
alternation as one more solve, plus the timed quantize + dequantize per element. It ignores the page
cache and the disk (a cold read of a large checkpoint from a slow disk takes longer); measured on the
2-core CPU machine with SmolLM2-135M it was within 2x of the split's time, on a machine busy with other
work too.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from surgeon import distributed, quant
from surgeon.io import OutTensor, plan_shards
from surgeon.io.dtypes import USER_DTYPES
from surgeon.io.writer import _header_bytes, shard_names
from surgeon.linalg import decompose, get_backend
from surgeon.methods import MethodConfig, get_method
from surgeon.source import resolve
from surgeon.targets import check_targets, group_by_block, select_targets

CALIBRATE_K = 1024  # the timed solve: a target shape scaled to min(m, n) ≤ this


def _files(prefix: str, shards: list[list[OutTensor]]) -> list[dict]:
    names = shard_names(len(shards), prefix)
    return [{"file": n, "tensors": len(t), "bytes": len(_header_bytes(t, {"format": "pt"})[0]) + sum(x.nbytes for x in t)} for n, t in zip(names, shards)]


def _free_bytes(out: Path) -> int:
    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _calibration_shape(targets) -> tuple[int, int]:
    """The target shape that carries most of the solve cost, scaled down to min(m, n) ≤ 1024 (same aspect)."""
    shapes = [(t.out_features, t.in_features) for t in targets.values()]
    m, n = max(sorted(set(shapes)), key=lambda s: shapes.count(s) * distributed.matrix_cost(s, 0, solve=True))
    f = min(1.0, CALIBRATE_K / min(m, n))
    return max(2, round(m * f)), max(2, round(n * f))


def _fastest(fn, device, repeats: int = 3) -> float:
    """Seconds of fn(), the fastest of `repeats` after one warm-up call (a busy machine slows some)."""
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return max(best, 1e-6)


def _rates(backend, shape: tuple[int, int], rank: int, which: str, qspec) -> tuple[float, float]:
    """(cost units per second of a solve here, seconds per element of one quantize + dequantize)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(backend.device)
    backend.warmup()
    r = max(1, min(rank, min(shape) - 1))
    units = distributed.matrix_cost(shape, 0, backend.device.type, solve=True) / _fastest(lambda: decompose(w, r, which, backend), backend.device)
    if qspec is None:
        return units, 0.0
    w32 = w.float()
    per_elem = _fastest(lambda: quant.dequantize("w", quant.quantize("w", w32, qspec), backend.device), backend.device) / w.numel()
    return units, per_elem


def dry_run(model: str, out: Path, opts) -> dict:
    """The plan of `split(model, out, opts)` as one JSON-ready object."""
    from surgeon.pipeline import FACTORS, INIT_FACTORS, SPECTRA, _out_dtype, factor_key, layer_configs, parse_size, quant_spec
    from surgeon.export.peft import ADAPTER_WEIGHTS

    method = get_method(opts.method)
    alpha = float(opts.alpha if opts.alpha is not None else method.default_alpha(opts.rank))
    cfg = MethodConfig(opts.rank, alpha, opts.use_rslora or method.rslora_scale, seed=opts.seed, moe_top_k=opts.top_k,
                       moe_pooling=opts.pooling, null_energy=opts.null_energy, null_rank=opts.null_rank)
    method.check(cfg)
    qspec = quant_spec(opts, method)
    new_dtype = USER_DTYPES.get((opts.dtype or "").lower())
    src = resolve(model, opts.revision, opts.config, opts.allow_pickle)
    ckpt = src.checkpoint()
    model_cfg = src.config()
    targets = select_targets(ckpt.tensors, opts.target, model_cfg.get("model_type"))
    layer_cfg, rank_pattern, alpha_pattern = layer_configs(targets, cfg, method, opts)
    check_targets(ckpt.tensors, targets, opts.rank, ranks={m: c.rank for m, c in layer_cfg.items()})
    backend = get_backend(opts.device, opts.backend)

    base = [OutTensor(n, _out_dtype(i.dtype, new_dtype), i.shape) for n, i in ckpt.tensors.items()]
    if qspec is not None:
        base = quant.base_plan(base, {n: (t.out_features, t.in_features) for n, t in targets.items()},
                               {n: quant.qdtype_name(_out_dtype(ckpt.tensors[n].dtype, new_dtype)) for n in targets}, qspec)
    rows, factors, trainable = [], [], 0
    for n, t in targets.items():
        lc = layer_cfg[t.module]
        shapes = method.factor_shapes(t.out_features, t.in_features, lc)
        factors += [OutTensor(factor_key(method.lora_shaped, t.module, f), "F32", s) for f, s in shapes.items()]
        train = sum(torch.Size(s).numel() for f, s in shapes.items() if f not in method.frozen_factors)
        trainable += train
        rows.append({"module": t.module, "shape": [t.out_features, t.in_features], "rank": lc.rank, "alpha": lc.alpha,
                     "scale": lc.scale, "trainable": train, "transposed": t.transposed})
    if method.per_block:
        from surgeon.pipeline import _hidden_size

        hidden = _hidden_size(model_cfg)
        for b, experts in group_by_block(targets).items():
            for f, s in method.block_shapes(hidden, len(experts), cfg).items():
                factors.append(OutTensor(f"{b}.{f}", "F32", s))
                trainable += torch.Size(s).numel()
    files = _files("model", plan_shards(base, parse_size(opts.shard_size)))
    files += _files(Path(ADAPTER_WEIGHTS if method.lora_shaped else FACTORS).stem, [factors])
    files += _files(Path(INIT_FACTORS).stem, [factors])
    if opts.spectra:
        files += _files(Path(SPECTRA).stem, [[OutTensor(t.module, "F64", (min(t.out_features, t.in_features),)) for t in targets.values()]])
    files.append({"file": "side files (config, tokenizer, ...)", "tensors": 0, "bytes": sum(f.stat().st_size for f in src.side_files)})
    solves = 1 + (qspec.iters if qspec else 0)  # each LoftQ alternation solves once more
    units = sum(distributed.matrix_cost(i.shape, i.nbytes, backend.device.type, solve=False) for i in ckpt.tensors.values())
    units += solves * sum(distributed.matrix_cost(i.shape, 0, backend.device.type, solve=True) for n, i in ckpt.tensors.items() if n in targets)
    rate, per_elem = _rates(backend, _calibration_shape(targets), opts.rank, method.which, qspec)
    workers = opts.workers or (2 if backend.device.type == "cpu" else 1)  # split's solve threads; quantization runs in them
    quant_s = per_elem * (2 + solves) * sum(t.out_features * t.in_features for t in targets.values()) / workers  # plain Q(W), Q per solve, spare
    total = sum(f["bytes"] for f in files)
    return {
        "dry_run": True, "model": model, "out": str(out), "out_exists": Path(out).exists(), "method": method.name,
        "rank": opts.rank, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "quantize": qspec.record() if qspec else None, "targets": rows, "layers": len(rows), "trainable_parameters": trainable,
        "source_bytes": sum(i.nbytes for i in ckpt.tensors.values()), "files": files, "output_bytes": total,
        "free_bytes_at_out": _free_bytes(out), "fits": total < _free_bytes(out), "device": str(backend.device),
        "estimated_seconds": round(units / rate + quant_s, 1),
    }
