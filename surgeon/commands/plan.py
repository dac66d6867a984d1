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
work too. With --calibrate, the data is read and tokenized as the split does (so a bad DATA fails
here too), and the estimate adds the calibration: the forward of its tokens through the blocks it
runs (2·tokens·parameters at a GEMM rate timed here; the stacks that hold targets up to the last
targeted block, not a vision tower), the covariance sums (2·tokens·in² per target times the share
the upper-triangle sums do, calibhooks.gram_share) and the extra work per target (Cholesky, inverse
and its check ≈ 3·in³, whiten's L⁻¹ one more in³, W·T and the output share 6·out·in², at a float64
GEMM rate); "calibration" reports them with an estimate of the device memory the calibration adds:
hidden states in and out of a block, one block's weights, one block's covariances (no sharing of
q/k/v or gate/up inputs counted), the float64 buffers of the widest calibrated solve, one batch's
inputs in float64 and its activations.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import torch

from surgeon.engine import distributed
from surgeon.format import OutTensor, plan_shards, quant
from surgeon.format.writer import _header_bytes, shard_names
from surgeon.linalg import decompose

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


def _rates(backend, shape: tuple[int, int], rank: int, which: str, qspec, solver: str, spectrum: bool) -> tuple[float, float]:
    """(cost units per second of a solve here, by the route the split takes, seconds per element of one
    quantize + dequantize)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(backend.device)
    backend.warmup()
    r = max(1, min(rank, min(shape) - 1))
    units = distributed.matrix_cost(shape, 0, backend.device.type, solve=True) / _fastest(lambda: decompose(w, r, which, backend, solver=solver, spectrum=spectrum), backend.device)
    if qspec is None:
        return units, 0.0
    w32 = w.float()
    per_elem = _fastest(lambda: quant.dequantize("w", quant.quantize("w", w32, qspec), backend.device), backend.device) / w.numel()
    return units, per_elem


_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # a name's block: its path up to the first numbered part


def _gemm_rate(device, dtype) -> float:
    """FLOP/s of one 1024³ matrix product here, in `dtype`."""
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return 2 * 1024**3 / _fastest(lambda: a @ a, device)


def _blocks(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        if m := _BLOCK.match(n):
            out.setdefault(m.group(1), []).append(n)
    return out


def _run_blocks(by_block: dict[str, list[str]], target_blocks: dict[str, list[str]]) -> dict[str, list[str]]:
    """The blocks a calibration run executes (`target_blocks`: _blocks of the targets): those of the
    stacks that hold targets (a multimodal model's text decoder, not its vision tower), up to the last
    targeted one (blockrun stops there)."""
    last: dict[str, int] = {}
    for b in target_blocks:
        parent, idx = b.rsplit(".", 1)
        last[parent] = max(last.get(parent, -1), int(idx))
    keep = {}
    for b, names in by_block.items():
        parent, idx = b.rsplit(".", 1)
        if parent in last and int(idx) <= last[parent]:
            keep[b] = names
    return keep


def _compute_dtype(job, names, device) -> torch.dtype:
    """The dtype the block runner computes in: the blocks' weight dtype (float32 for half weights on the CPU)."""
    from surgeon.format.dtypes import DTYPES

    kinds = [job.ckpt.tensors[n].dtype for n in names if job.ckpt.tensors[n].dtype in ("F32", "F16", "BF16", "F64")]
    dt = DTYPES[max(set(kinds), key=kinds.count)][0] if kinds else torch.float32
    return torch.float32 if device.type == "cpu" and dt in (torch.float16, torch.bfloat16) else dt


def _calibration(job, backend) -> dict:
    """--calibrate's share of the time and its device memory (module docstring), for the dry run."""
    from surgeon.model.calibhooks import gram_share  # only with --calibrate

    data, dev, tensors = job.calib_data, backend.device, job.ckpt.tensors
    tok, whiten = data.tokens, job.calib_mode == "whiten"
    targets = _blocks(job.targets)  # keyed by checkpoint tensor
    by_block = _run_blocks(_blocks(n for n, i in tensors.items() if len(i.shape) >= 2), targets)  # 3-D: fused MoE experts
    compute = _compute_dtype(job, [n for names in by_block.values() for n in names], dev)
    width = torch.tensor([], dtype=compute).element_size()
    numel = {n: torch.Size(tensors[n].shape).numel() for names in by_block.values() for n in names}
    dims = [(t.out_features, t.in_features) for t in job.targets.values()]
    # float64 per target: covariance sums, Cholesky + inverse + its check, W·T, the output share (+ whiten's L⁻¹)
    f64 = sum(2 * tok * n * n * gram_share(n) + (4 if whiten else 3) * n**3 + 6 * m * n * n for m, n in dims)
    seconds = 2 * tok * sum(numel.values()) / _gemm_rate(dev, compute) + f64 / _gemm_rate(dev, torch.float64)
    cfg = job.model_cfg.get("text_config") or job.model_cfg
    hidden, inter = cfg.get("hidden_size") or 0, cfg.get("intermediate_size") or 0
    block = max((sum(numel[n] for n in names) for names in by_block.values()), default=0)
    covs = max((sum(job.targets[n].in_features ** 2 for n in names) for names in targets.values()), default=0)
    wide = max(((n, m) for m, n in dims), default=(0, 0))  # the widest input: the largest (in, in) buffers
    batch = 4096  # BlockCovariances' batch of tokens
    solve = 8 * 3 * wide[0] ** 2  # the solve's float64 buffers above its inputs: 2.7 (in, in) measured (bench_calibrated_memory.py)
    estimate = (2 * tok * hidden * width + block * width + 8 * covs + solve
                + batch * wide[0] * 8 + 4 * batch * max(hidden, inter) * width)  # a batch's float64 rows, its activations
    return {"source": data.source, "tokens": tok, "samples": len(data.input_ids), "mode": job.calib_mode,
            "estimated_seconds": round(seconds, 1), "device_bytes_estimate": estimate}


def dry_run(model: str, out: Path, opts) -> dict:
    """The plan of `split(model, out, opts)` as one JSON-ready object (pipeline.plan_split, then sizes and time)."""
    from surgeon.commands.split import plan_split
    from surgeon.format.splitdir import ADAPTER_WEIGHTS, FACTORS, INIT_FACTORS, SPECTRA
    from surgeon.format.writer import parse_size

    job = plan_split(model, opts, distributed.current())
    method, targets, backend, qspec = job.method, job.targets, job.backend, job.qspec
    rows, trainable = [], 0
    for t in targets.values():
        lc = job.layer(t.module)
        shapes = method.factor_shapes(t.out_features, t.in_features, lc)
        train = sum(torch.Size(s).numel() for f, s in shapes.items() if f not in method.frozen_factors)
        trainable += train
        rows.append({"module": t.module, "shape": [t.out_features, t.in_features], "rank": lc.rank, "alpha": lc.alpha,
                     "scale": lc.scale, "trainable": train, "transposed": t.transposed})
    block_keys = {f"{b}.{f}" for b in job.blocks for f in method.block_shapes(1, 1, job.cfg)}  # moe routers: all trained
    trainable += sum(torch.Size(t.shape).numel() for t in job.factor_plan if t.name in block_keys)
    files = _files("model", plan_shards(job.base_plan, parse_size(opts.shard_size)))
    files += _files(Path(ADAPTER_WEIGHTS if method.lora_shaped else FACTORS).stem, [job.factor_plan])
    files += _files(Path(INIT_FACTORS).stem, [job.init_plan])
    if opts.spectra:
        files += _files(Path(SPECTRA).stem, [job.spectra_plan])
    files.append({"file": "side files (config, tokenizer, ...)", "tensors": 0, "bytes": sum(f.stat().st_size for f in job.src.side_files)})
    solves = 1 + (qspec.iters if qspec else 0)  # each LoftQ alternation solves once more
    units = sum(distributed.matrix_cost(i.shape, i.nbytes, backend.device.type, solve=False) for i in job.ckpt.tensors.values())
    units += solves * sum(distributed.matrix_cost(i.shape, 0, backend.device.type, solve=True) for n, i in job.ckpt.tensors.items() if n in targets)
    spectrum = opts.spectra or method.needs_spectrum
    rate, per_elem = _rates(backend, _calibration_shape(targets), opts.rank, method.which, qspec, opts.solver, spectrum)
    workers = opts.workers or (2 if backend.device.type == "cpu" else 1)  # split's solve threads; quantization runs in them
    quant_s = per_elem * (2 + solves) * sum(t.out_features * t.in_features for t in targets.values()) / workers  # plain Q(W), Q per solve, spare
    calib = _calibration(job, backend) if job.calib_data is not None else None
    total = sum(f["bytes"] for f in files)
    free = _free_bytes(out)
    return {
        "dry_run": True, "model": model, "out": str(out), "out_exists": Path(out).exists(), "method": method.name,
        "rank": opts.rank, "alpha": job.cfg.alpha, "rank_pattern": job.rank_pattern, "alpha_pattern": job.alpha_pattern,
        "quantize": qspec.record() if qspec else None, "targets": rows, "layers": len(rows), "trainable_parameters": trainable,
        "source_bytes": sum(i.nbytes for i in job.ckpt.tensors.values()), "files": files, "output_bytes": total,
        "free_bytes_at_out": free, "fits": total < free, "device": str(backend.device),
        "estimated_seconds": round(units / rate + quant_s + (calib["estimated_seconds"] if calib else 0), 1),
        "calibration": calib,
    }
