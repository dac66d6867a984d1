"""The split, in a straight line: read → decompose → method → write.

    surgeon split --method milora fixtures/build/tiny-llama --rank 8 --out /tmp/split

Tensors stream in checkpoint order; a reader thread prefetches the next ones while the current
one is decomposed, and a writer thread puts finished tensors into pre-planned shards, so reading,
solving and writing overlap and host memory stays at a few tensors.

Under torchrun every rank runs `split` on its share of the tensors, into the same shard files
(surgeon/distributed.py); the calls on `dist` below are no-ops in a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgeon import __version__, distributed
from surgeon.card import build_card
from surgeon.errors import NumericsError, UsageError
from surgeon.export.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, lora_key, task_type_for
from surgeon.io import Checkpoint, OutTensor, ShardSetWriter, plan_shards
from surgeon.io.dtypes import CONFIG_DTYPE, FLOAT_DTYPES, USER_DTYPES, torch_dtype
from surgeon.io.writer import write_json
from surgeon.linalg import decompose, get_backend
from surgeon.methods import MethodConfig, get_method
from surgeon.outdir import WorkDir, copy_side_files
from surgeon.manifest import build_manifest, method_config
from surgeon.progress import NullReporter, Reporter
from surgeon.stages import HostCopy, StageClock, write_all
from surgeon.source import Source, resolve
from surgeon.targets import Target, check_targets, group_by_block, peft_target_modules, select_targets

MANIFEST = "surgeon.json"
INIT_FACTORS = "surgeon.init.safetensors"  # the untrained factors, kept for absorb and export
SPECTRA = "surgeon.spectra.safetensors"  # every targeted weight's singular values
FACTORS = "surgeon.factors.safetensors"  # factors of methods that are not LoRA-shaped


@dataclass
class SplitOptions:
    method: str = "milora"
    rank: int = 64
    alpha: float | None = None  # default: the method's (rank, scale 1, as the MiLoRA authors; nusa: 2)
    use_rslora: bool = False
    null_energy: float | None = None  # nusa: energy cutoff ρ (default 0.95)
    null_rank: int | None = None  # nusa: fixed null-space size
    target: list[str] = field(default_factory=lambda: ["all-linear"])
    dtype: str | None = None  # residual dtype ("bfloat16", ...); None keeps the checkpoint's
    device: str = "auto"
    backend: str = "auto"
    solver: str = "auto"
    tol: float = 1e-6
    shard_size: str = "5GB"
    revision: str | None = None
    config: Path | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    prefetch: int = 2
    workers: int = 0  # concurrent solves (threads; CUDA: one stream each); 0 = 2 on CPU, 1 on CUDA
    spectra: bool = True  # keep every singular value (surgeon.spectra.safetensors, plots)
    commit_seconds: float = 30.0  # how often finished tensors are fsynced and journaled (resume points)
    seed: int = 0  # methods with random initial factors (KaSA): per-layer seeds derive from it
    kasa_beta: float = 1e-4  # KaSA's regulariser weights, recorded for the runtime (PEFT's defaults)
    kasa_gamma: float = 1e-3
    top_k: int = 2  # moe: experts kept per prompt and block (0 = all)
    pooling: str = "attention"  # moe: how the router pools the prompt (attention, mean, last)


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num) :]]
    except (ValueError, KeyError) as e:
        raise UsageError(f"--shard-size {text!r} is not a size like 5GB, 500MB or 2GiB.") from e
    if value < 1:
        raise UsageError("--shard-size must be positive.")
    return int(value)


def factor_key(lora: bool, module: str, fname: str) -> str:
    """Where a factor lives in the factor file: PEFT's key for LoRA-shaped methods, else "<module>.<factor>"."""
    return lora_key(module, fname) if lora else f"{module}.{fname}"


def _stem(file_name: str) -> str:
    return file_name[: -len(".safetensors")]


def _out_dtype(stored: str, wanted: str | None) -> str:
    return wanted if (wanted and stored in FLOAT_DTYPES) else stored


@distributed.collective
def split(model: str, out: Path, opts: SplitOptions | None = None, reporter: Reporter | None = None) -> dict:
    """Split `model` into residual + factors in `out`; returns the manifest (on every rank)."""
    t_enter = time.perf_counter()
    dist = distributed.current()
    opts = opts or SplitOptions()
    reporter = reporter or NullReporter()
    method = get_method(opts.method)
    for opt in ("null_energy", "null_rank"):
        if getattr(opts, opt) is not None and opt not in method.options:
            raise UsageError(f"--{opt.replace('_', '-')} is an option of --method nusa, not of {method.name}; drop it or choose nusa.")
    alpha = float(opts.alpha if opts.alpha is not None else method.default_alpha(opts.rank))
    cfg = MethodConfig(opts.rank, alpha, opts.use_rslora or method.rslora_scale, seed=opts.seed, kasa_beta=opts.kasa_beta,
                       kasa_gamma=opts.kasa_gamma, moe_top_k=opts.top_k, moe_pooling=opts.pooling,
                       null_energy=opts.null_energy, null_rank=opts.null_rank)
    method.check(cfg)
    new_dtype = None
    if opts.dtype:
        if opts.dtype.lower() not in USER_DTYPES:
            raise UsageError(f"--dtype {opts.dtype!r} unknown; choose float32, bfloat16 or float16.")
        new_dtype = USER_DTYPES[opts.dtype.lower()]
    shard_bytes = parse_size(opts.shard_size)
    backend = get_backend(dist.device(opts.device), opts.backend)

    src: Source = resolve(model, opts.revision, opts.config, opts.allow_pickle)
    ckpt: Checkpoint = src.checkpoint()
    model_cfg = src.config()
    targets = select_targets(ckpt.tensors, opts.target, model_cfg.get("model_type"))
    check_targets(ckpt.tensors, targets, opts.rank)

    base_plan = [OutTensor(n, _out_dtype(i.dtype, new_dtype), i.shape) for n, i in ckpt.tensors.items()]
    factor_plan, spectra_plan = [], []
    for t in targets.values():
        for fname, shape in method.factor_shapes(t.out_features, t.in_features, cfg).items():
            factor_plan.append(OutTensor(factor_key(method.lora_shaped, t.module, fname), "F32", shape))
        if opts.spectra:
            spectra_plan.append(OutTensor(t.module, "F64", (min(t.out_features, t.in_features),)))
    blocks: dict[str, dict] = {}  # per-block tensors (methods with per_block): fixed shapes, planned too
    if method.per_block:
        hidden = _hidden_size(model_cfg)
        for b, experts in group_by_block(targets).items():
            blocks[b] = {"experts": experts, "hidden": hidden}
            for fname, shape in method.block_shapes(hidden, len(experts), cfg).items():
                factor_plan.append(OutTensor(f"{b}.{fname}", "F32", shape))
    method_options = {k: getattr(cfg, k) for k in method.options}

    plan = {
        "op": "split",
        "surgeon": __version__,
        "method": method.name,
        "rank": opts.rank,
        "alpha": alpha,
        "use_rslora": cfg.use_rslora,
        "method_config": method_config(cfg),
        **method.manifest_extra(cfg),
        "targets": sorted(targets),
        "dtype": new_dtype,
        "solver": opts.solver,
        "tol": opts.tol,
        "spectra": opts.spectra,
        "shard_bytes": shard_bytes,
        "source": src.fingerprint(),
    }
    with dist.main_first():  # rank 0 creates the folder and lays out every file, then the others open them
        work = WorkDir(out, plan, opts.overwrite, rank=dist.journal_rank)
        base_w = ShardSetWriter(work.path, plan_shards(base_plan, shard_bytes))
        fac_w = ShardSetWriter(work.path, [factor_plan], prefix=_stem(ADAPTER_WEIGHTS if method.lora_shaped else FACTORS))
        spec_w = ShardSetWriter(work.path, [spectra_plan], prefix=_stem(SPECTRA)) if opts.spectra else None
        # the untrained factors once more, kept beside the trainable copy for absorb and export
        init_w = ShardSetWriter(work.path, [factor_plan], prefix=_stem(INIT_FACTORS))
        writers = [w for w in (base_w, fac_w, spec_w, init_w) if w is not None]
        for i, (b, info) in enumerate(blocks.items() if dist.is_main else ()):  # deterministic, cheap: (re)written on every run
            for fname, t in method.init_block(i, info["hidden"], len(info["experts"]), cfg).items():
                fac_w.write(f"{b}.{fname}", t)
                init_w.write(f"{b}.{fname}", t)

    left = [n for n in ckpt.tensors if n not in work.done]
    todo = dist.share(left, [split_cost(ckpt.tensors[n], n in targets, backend.device.type) for n in left])  # this rank's, in file order
    total_bytes = sum(ckpt.tensors[n].nbytes for n in todo)
    reporter.start(len(ckpt.tensors) - len(left) + len(todo), total_bytes, done=len(ckpt.tensors) - len(left))
    clock = StageClock()
    backend.warmup()
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    t_start = time.perf_counter()
    pending: list[Future] = []
    last_commit = time.monotonic()

    def commit() -> None:
        for f in pending:
            f.result()
        pending.clear()
        for w in writers:
            w.sync()
        work.journal.commit()

    streams = threading.local()

    def process(info, tensor) -> tuple[dict, list[tuple[ShardSetWriter, str, torch.Tensor]]]:
        stream = contextlib.nullcontext()
        if backend.device.type == "cuda":  # each solve thread works on a stream of its own
            if not hasattr(streams, "s"):
                streams.s = torch.cuda.Stream(backend.device)
            stream = torch.cuda.stream(streams.s)
        with stream, clock("solver_busy"):
            return _process(info, tensor)

    def _process(info, tensor) -> tuple[dict, list[tuple[ShardSetWriter, str, torch.Tensor]]]:
        record: dict = {"name": info.name}
        outputs: list[tuple[ShardSetWriter, str, torch.Tensor]] = []
        target = targets.get(info.name)
        out_dt = _out_dtype(info.dtype, new_dtype)
        if target is None:
            outputs.append((base_w, info.name, tensor.to(torch_dtype(out_dt))))
            return record, outputs
        record["layer"], outs = _split_one(target, tensor, method, cfg, backend, opts, out_dt, clock)
        outputs.append((base_w, info.name, outs.pop("__residual__")))
        if opts.spectra:
            outputs.append((spec_w, target.module, outs.pop("__spectrum__")))
        for fname, f in outs.items():
            key = factor_key(method.lora_shaped, target.module, fname)
            outputs.append((fac_w, key, f))
            outputs.append((init_w, key, f))
        return record, outputs

    # CPU: two solves at once, one BLAS thread each (LAPACK's tridiagonal reduction scales poorly
    # over threads). CUDA: one, on its own stream; transfers are asynchronous. Two eigensolvers at
    # once on one GPU run no faster in total (bench/RESULTS.md), so a second worker only adds contention.
    workers = opts.workers or (2 if backend.device.type == "cpu" else 1)
    threads = torch.get_num_threads()
    if workers > 1 and backend.device.type == "cpu":
        torch.set_num_threads(max(1, threads // workers))
    solving: deque[tuple] = deque()

    def drain_one(pool) -> None:
        info, fut = solving.popleft()
        with clock("wait_solve"):
            record, outputs = fut.result()
        with clock("wait_write"):
            while len(pending) >= 4:
                pending.pop(0).result()
        pending.append(pool.submit(write_all, outputs, clock))
        work.journal.add(record)
        reporter.advance(info.name, info.nbytes)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="surgeon-writer") as wpool, ThreadPoolExecutor(workers, thread_name_prefix="surgeon-solve") as spool:
            stream = ckpt.stream(todo, prefetch=opts.prefetch, pin=backend.device.type == "cuda")
            while True:
                with clock("wait_read"):
                    item = next(stream, None)
                if item is None:
                    break
                info, tensor = item
                solving.append((info, spool.submit(process, info, tensor)))
                if len(solving) > workers:
                    drain_one(wpool)
                if time.monotonic() - last_commit >= opts.commit_seconds:
                    with clock("wait_commit"):
                        commit()
                    last_commit = time.monotonic()
                dist.check_peers()  # another rank failed: stop (what is committed stays done)
            while solving:
                drain_one(wpool)
            with clock("wait_commit"):
                commit()
    except BaseException:
        # Ctrl-C or an error: keep what is already written (the executors above have finished their
        # work), so that repeating the command resumes after it. If a write failed, commit() raises
        # before journaling anything, and nothing unsafe is recorded.
        with contextlib.suppress(Exception):
            commit()
        raise
    finally:
        torch.set_num_threads(threads)
    for w in writers:
        w.close()
    ranks = dist.sync(_rank_record(dist, backend, todo, total_bytes, time.perf_counter() - t_start, clock))  # all written
    if not dist.is_main:
        reporter.close()
        return None  # rank 0 finishes the folder; every rank returns its manifest
    base_w.write_index()
    elapsed = time.perf_counter() - t_start

    layers = {rec["layer"]["module"]: rec["layer"] for rec in work.records().values() if "layer" in rec}
    layers = {t.module: layers[t.module] for t in targets.values()}  # checkpoint order
    target_modules = peft_target_modules(ckpt.tensors, targets)
    manifest = build_manifest(src, method, cfg, opts, new_dtype, backend, layers, target_modules, targets, elapsed, sum(r["bytes_read"] for r in ranks), work.resumed)
    manifest["summary"]["stage_seconds"] = clock.totals()
    distributed.rank_summary(manifest["summary"], ranks)
    if method.options or method.notes:
        manifest["method_options"], manifest["method_notes"] = method_options, dict(method.notes)
    if blocks:
        manifest["blocks"] = blocks

    skip = {"README.md", ADAPTER_CONFIG}
    copied = copy_side_files(src.side_files, work.path, skip)
    if new_dtype and "config.json" in copied:
        conf = dict(model_cfg)
        key = "dtype" if "dtype" in conf else "torch_dtype"
        conf[key] = CONFIG_DTYPE[new_dtype]
        write_json(work.path / "config.json", conf)
    if method.lora_shaped:
        any_t = next(iter(targets.values()))
        write_json(
            work.path / ADAPTER_CONFIG,
            adapter_config(
                r=cfg.rank, alpha=cfg.alpha, target_modules=target_modules, fan_in_fan_out=any_t.transposed,
                use_rslora=cfg.use_rslora, task_type=task_type_for(model_cfg),
            ),
        )
    manifest["summary"]["setup_seconds"] = round(t_start - t_enter, 3)  # before the first tensor
    manifest["summary"]["finish_seconds"] = round(time.perf_counter() - t_start - elapsed, 3)  # after the last
    write_json(work.path / MANIFEST, manifest)
    build_card(manifest).save(work.path / "README.md")
    work.finish()
    reporter.close()
    return manifest


def split_cost(info, targeted: bool, device_type: str) -> int:
    """How long a tensor keeps a rank busy (distributed.matrix_cost), to balance the ranks."""
    return distributed.matrix_cost(info.shape, info.nbytes, device_type, solve=targeted)


def _rank_record(dist, backend, todo: list[str], nbytes: int, seconds: float, clock: StageClock) -> dict:
    """What this rank did, for the manifest of a distributed run."""
    return {
        "rank": dist.rank, "device": str(backend.device), "tensors": len(todo), "bytes_read": nbytes,
        "cost": dist.loads[dist.rank], "seconds": round(seconds, 3), "stage_seconds": clock.totals(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(backend.device) if backend.device.type == "cuda" else None,
    }


def _hidden_size(model_cfg: dict) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(model_cfg.get(key), int):
            return model_cfg[key]
    raise UsageError("config.json gives no hidden size (hidden_size / n_embd / d_model), which this method's per-block "
                     "tensors need; pass --config with a complete config.json.")



def _split_one(target: Target, stored: torch.Tensor, method, cfg: MethodConfig, backend, opts: SplitOptions, out_dtype: str, clock):
    t0 = time.perf_counter()
    w64 = stored.to(backend.device, non_blocking=True).double()
    w64 = w64.mT if target.transposed else w64  # (out, in)
    with clock("decompose"):
        try:
            trip = decompose(w64, cfg.rank, method.which, backend, tol=opts.tol, solver=opts.solver, spectrum=opts.spectra or method.needs_spectrum)
        except NumericsError as e:  # name the tensor: a damaged checkpoint is fixed one tensor at a time
            raise NumericsError(f"{target.tensor}: {e}") from e
    with clock("method"):
        res = method.split(w64, trip, dataclasses.replace(cfg, module=target.module))
        residual = res.residual.to(torch_dtype(out_dtype))  # (out, in), cast once
    # What a reader of the files reconstructs is cast residual + s·(stored factors). The method
    # formed the float64 residual from the stored (rounded) factors, W = res64 + s·BA exactly, so
    # ‖W − (cast(res) + s·BA)‖ = ‖res64 − cast(res)‖: no product needed to measure it.
    total = trip.energy  # = ‖W‖_F²
    err = float(torch.linalg.matrix_norm(res.residual - residual.double())) / max(total**0.5, 1e-300)
    kept = float(trip.S.square().sum())
    layer = {
        "module": target.module,
        "shape": [target.out_features, target.in_features],
        "transposed": target.transposed,
        "solver": trip.solver,
        "subspace_bound": trip.subspace_bound,
        "orth_error": trip.orth_error,
        "reconstruction_error": err,
        "factor_energy": kept / total if total > 0 else 0.0,
        "sigma_max": float(trip.spectrum[0]) if opts.spectra else None,
        "sigma_min": float(trip.spectrum[-1]) if opts.spectra else None,
        "factor_sigma": [float(trip.S[0]), float(trip.S[-1])],
        "seconds": round(time.perf_counter() - t0, 4),
        **res.stats,
    }
    outs = {"__residual__": (residual.mT if target.transposed else residual).contiguous()}
    if opts.spectra:
        outs["__spectrum__"] = trip.spectrum
    outs.update(res.factors)
    # to the host in the order of this thread's stream, so the writer never reads a tensor that
    # is still being computed
    with clock("to_host"):
        if w64.is_cuda:
            return layer, {k: HostCopy(v) for k, v in outs.items()}
        return layer, outs
