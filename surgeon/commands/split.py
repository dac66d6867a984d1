"""The split, as plan → run → finish.

    surgeon split --method milora fixtures/tiny-llama --rank 8 --out /tmp/split

plan: resolve the source, validate every header, choose the targets, and lay out every output
file (names, shapes, byte offsets) before any data is read. run (surgeon/runner.py): stream the
tensors through the solvers into their places. finish: index, config, adapter, manifest, card,
then the atomic rename (surgeon/outdir.py). A kill at any moment resumes with the same command
to byte-identical files.

Under torchrun every rank runs `split` on its share of the tensors, into the same shard files
(surgeon/distributed.py); the calls on `dist` below are no-ops in a single process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import torch

from surgeon import options
from surgeon.commands.manifest import (
    method_config,
)
from surgeon.commands.split_finish import finish_split
from surgeon.commands.split_job import SplitJob, SplitOptions, Writers, file_stem
from surgeon.engine import calibrate, distributed
from surgeon.engine.outdir import (
    WorkDir,
    finish_completed,
    open_work,
)
from surgeon.engine.progress import NullReporter, Reporter
from surgeon.engine.runner import SplitRunner
from surgeon.errors import UsageError
from surgeon.format import OutTensor, ShardSetWriter, plan_shards, quant
from surgeon.format.dtypes import USER_DTYPES
from surgeon.format.source import resolve
from surgeon.format.splitdir import (
    ADAPTER_WEIGHTS,
    FACTORS,
    INIT_FACTORS,
    SPECTRA,
    factor_key,
)
from surgeon.format.writer import (
    check_free_space,
    parse_size,
    planned_sizes,
)
from surgeon.linalg import get_backend
from surgeon.linalg.decompose import SOLVERS
from surgeon.methods import MethodConfig, get_method
from surgeon.model import load_names, patterns
from surgeon.model.adapter import plan_adapter
from surgeon.model.moe import fused_shapes
from surgeon.model.output import fused_targets
from surgeon.model.routed import routed_targets
from surgeon.model.selection import (
    check_targets,
    group_by_block,
    keep_dense,
    select_targets,
)
from surgeon.model.targets import other_matrices
from surgeon.version import __version__


@distributed.collective
def split(model: str, out: Path, opts: SplitOptions | None = None, reporter: Reporter | None = None) -> dict:
    """Split `model` into residual + factors in `out`; returns the manifest (on every rank), with
    this run's timings under "run" (also in surgeon.run.json)."""
    t_enter = time.perf_counter()
    dist = distributed.current()
    reporter = reporter or NullReporter()
    job = plan_split(model, opts or SplitOptions(), dist)
    work, writers = open_work(dist, out, job.plan, job.opts.overwrite, job.inputs(), lambda w: _open_writers(job, w, dist))
    with work:
        if work.complete:  # an earlier run was killed after its rename: only its cleanup was left
            return finish_completed(work, dist)
        runner = SplitRunner(job, work, writers, reporter, dist)
        t_start = time.perf_counter()
        todo = _run(job, work, runner, reporter, dist)
        return finish_split(job, work, writers, runner, todo, reporter, dist, (t_enter, t_start))


def plan_split(model: str, opts: SplitOptions, dist) -> SplitJob:
    """Resolve and validate the source, choose the targets and lay out every output tensor."""
    options.check(("--workers", opts.workers, options.WORKERS), ("--tol", opts.tol, options.POSITIVE))
    options.device(opts.device)
    method = get_method(opts.method)
    if opts.solver not in SOLVERS:  # checked before the work folder exists, not at the first tensor
        raise UsageError(f"--solver {opts.solver!r} unknown; choose {', '.join(SOLVERS)}.")
    for opt in ("null_energy", "null_rank"):
        if getattr(opts, opt) is not None and opt not in method.options:
            raise UsageError(f"--{opt.replace('_', '-')} is an option of --method nusa, not of {method.name}; drop it or choose nusa.")
    alpha = float(opts.alpha if opts.alpha is not None else method.default_alpha(opts.rank))
    cfg = MethodConfig(opts.rank, alpha, opts.use_rslora or method.rslora_scale, seed=opts.seed, kasa_beta=opts.kasa_beta,
                       kasa_gamma=opts.kasa_gamma, moe_top_k=opts.top_k, moe_pooling=opts.pooling,
                       null_energy=opts.null_energy, null_rank=opts.null_rank)
    method.check(cfg)
    calib_mode = options.calibrate_mode(method.name, opts.calibrate, opts.calibrate_tokens, opts.calibrate_mode, opts.calibrate_peft, opts.quantize)
    if calib_mode and dist.world > 1:
        raise UsageError("--calibrate runs in one process for now; start it without torchrun.")
    qspec = quant.spec_from(opts, method)  # None without --quantize
    new_dtype = None
    if opts.dtype:
        if opts.dtype.lower() not in USER_DTYPES:
            raise UsageError(f"--dtype {opts.dtype!r} unknown; choose float32, bfloat16 or float16.")
        new_dtype = USER_DTYPES[opts.dtype.lower()]
    shard_bytes = parse_size(opts.shard_size)
    backend = get_backend(dist.device(opts.device), opts.backend)
    with _meanwhile(backend.warmup, _import_finish):  # CUDA context, solver libraries and late imports load while the headers are read
        job = _plan_source(model, opts, method, cfg, qspec, new_dtype, backend, shard_bytes)
    if calib_mode:  # the data is read and hashed now: a bad --calibrate stops before any folder exists
        calibrate.attach(job, calib_mode)
    return job


@contextlib.contextmanager
def _meanwhile(*work):
    """Run each of `work` on a thread of its own during the block; all have ended when it exits,
    also on an error (a thread still inside native code when the interpreter exits aborts it)."""
    threads = [threading.Thread(target=w, name=f"surgeon-{w.__name__}", daemon=True) for w in work]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        for t in threads:
            t.join()


def _plan_source(model, opts, method, cfg, qspec, new_dtype, backend, shard_bytes) -> SplitJob:
    alpha = cfg.alpha
    src = resolve(model, opts.revision, opts.config, opts.allow_pickle)
    src.card_metadata()  # the model card is read at the finish: a link out of the folder is refused now, not after the work
    ckpt = src.checkpoint()
    model_cfg = src.config()
    names, names_why = load_names(model_cfg, ckpt.tensors)
    targets = select_targets(ckpt.tensors, opts.target, model_cfg.get("model_type"), names)
    hidden = None
    if method.per_block:  # a per-block method routes inside the blocks the prompt runs through (surgeon/model/routed.py)
        targets, hidden = routed_targets(targets, names, model_cfg, explicit=list(opts.target) != ["all-linear"])
    targets, dense = fused_targets(targets, method.lora_shaped and qspec is None)
    layer_cfgs, rank_pattern, alpha_pattern = patterns.layer_configs(targets, cfg, method, opts)
    layer_cfgs.update({t.module: cfg for t in targets.values() if t.place is not None and t.place.fused})  # one rank per fused parameter
    ranks = {m: c.rank for m, c in layer_cfgs.items()}
    if list(opts.target) == ["all-linear"]:
        targets, small = keep_dense(targets, opts.rank, ranks)
        dense.update(small)
        if names is not None:
            dense.update(other_matrices(ckpt.tensors, names))
        if not targets:
            raise UsageError(f"--rank {opts.rank} is not below the smaller side of any linear layer ({next(iter(dense.values()))}); choose a smaller --rank.")
    check_targets(ckpt.tensors, targets, opts.rank, ranks=ranks)
    job = SplitJob(opts, method, cfg, new_dtype, backend, src, ckpt, model_cfg, targets, [], [], [], {}, qspec=qspec,
                   layer_cfgs=layer_cfgs, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   names=names, names_why=names_why, dense=dense, block_hidden=hidden)
    if names is not None and method.lora_shaped:
        job.adapter = plan_adapter(names, targets, model_cfg.get("model_type"), cfg.rank, cfg.alpha, rank_pattern, alpha_pattern, cfg.use_rslora)
    _layout(job)
    job.plan = {
        "op": "split", "surgeon": __version__, "method": method.name, "rank": opts.rank, "alpha": alpha,
        "use_rslora": cfg.use_rslora, "method_config": method_config(cfg), **method.manifest_extra(cfg),
        "targets": sorted(targets), "dtype": new_dtype, "solver": opts.solver, "tol": opts.tol,
        "spectra": opts.spectra, "shard_bytes": shard_bytes, "source": src.fingerprint(),
        **({"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern} if rank_pattern or alpha_pattern else {}),
        **({"quantize": qspec.record()} if qspec else {}),
    }
    return job


def _import_finish() -> None:
    """What only the finish needs (the model card pulls in huggingface_hub), imported off the main
    thread while the tensors stream."""
    import surgeon.format.card  # noqa: F401


def _layout(job: SplitJob) -> None:
    """Every output tensor's name, dtype and shape, from the input headers alone."""
    method, cfg = job.method, job.cfg
    job.base_plan = [OutTensor(n, job.out_dtype(i.dtype), i.shape) for n, i in job.ckpt.tensors.items()]
    fused = job.adapter.fused if job.adapter else {}
    for t in job.targets.values():
        for fname, shape in method.factor_shapes(t.out_features, t.in_features, job.layer(t.module)).items():
            key = factor_key(method.lora_shaped, t.module, fname)
            job.init_plan.append(OutTensor(key, "F32", shape))
            if t.place is None or not t.place.fused:
                job.factor_plan.append(OutTensor(key, "F32", shape))
            elif t.place.expert == 0 and t.place.part == 0:  # the fused parameter's pair, once
                info = fused[t.place.param]
                shape = fused_shapes(t.place, job.cfg.rank, t.out_features, t.in_features)[fname]
                job.factor_plan.append(OutTensor(factor_key(True, info["module"], fname), "F32", shape))
        if job.opts.spectra:
            job.spectra_plan.append(OutTensor(t.module, "F64", (min(t.out_features, t.in_features),)))
    if job.qspec is not None:  # quant hook: each targeted weight becomes its group of 4-bit tensors
        job.base_plan = quant.base_plan(job.base_plan, {n: (t.out_features, t.in_features) for n, t in job.targets.items()},
                                        {n: quant.qdtype_name(job.out_dtype(job.ckpt.tensors[n].dtype)) for n in job.targets}, job.qspec)
    if method.per_block:  # per-block tensors (moe routers): fixed shapes, planned too
        hidden = job.block_hidden
        for b, experts in group_by_block(job.targets).items():
            job.blocks[b] = {"experts": experts, "hidden": hidden}
            for fname, shape in method.block_shapes(hidden, len(experts), cfg).items():
                job.factor_plan.append(OutTensor(f"{b}.{fname}", "F32", shape))
                job.init_plan.append(OutTensor(f"{b}.{fname}", "F32", shape))


def _open_writers(job: SplitJob, work: WorkDir, dist) -> Writers:
    """Lay out (or reopen) every output file, after refusing at once when they cannot fit on the disk."""
    lora = job.method.lora_shaped
    specs = {
        "base": (plan_shards(job.base_plan, job.plan["shard_bytes"]), "model"),
        "factors": ([job.factor_plan], file_stem(ADAPTER_WEIGHTS if lora else FACTORS)),
        "init": ([job.init_plan], file_stem(INIT_FACTORS)),
        **({"spectra": ([job.spectra_plan], file_stem(SPECTRA))} if job.opts.spectra else {}),
    }
    if dist.is_main:
        check_free_space(work.path, [f for shards, prefix in specs.values() for f in planned_sizes(work.path, shards, prefix)])
    w = Writers(**{k: ShardSetWriter(work.path, shards, prefix=prefix) for k, (shards, prefix) in specs.items()}, **({} if job.opts.spectra else {"spectra": None}))
    if dist.is_main:
        for i, (b, info) in enumerate(job.blocks.items()):  # deterministic, cheap: (re)written on every run
            for fname, t in job.method.init_block(i, info["hidden"], len(info["experts"]), job.cfg).items():
                w.factors.write(f"{b}.{fname}", t)
                w.init.write(f"{b}.{fname}", t)
    return w


def _run(job: SplitJob, work: WorkDir, runner: SplitRunner, reporter: Reporter, dist) -> list[str]:
    """Stream this rank's share of the tensors not yet done; returns that share."""
    left = [n for n in job.ckpt.tensors if n not in work.done]
    device_type = job.backend.device.type
    todo = dist.share(left, [split_cost(job.ckpt.tensors[n], n in job.targets, device_type) for n in left])  # this rank's, in file order
    if job.calib is not None and any(n in job.targets for n in todo):
        todo = job.calib.order(todo)  # the covariances come block by block
    done = len(job.ckpt.tensors) - len(left)
    reporter.start(done + len(todo), sum(job.ckpt.tensors[n].nbytes for n in todo), done=done)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.backend.device)
    runner.run(todo)
    return todo


def split_cost(info, targeted: bool, device_type: str) -> int:
    """How long a tensor keeps a rank busy (distributed.matrix_cost), to balance the ranks."""
    return distributed.matrix_cost(info.shape, info.nbytes, device_type, solve=targeted)
