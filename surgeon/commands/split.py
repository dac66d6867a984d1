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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgeon import options
from surgeon.commands.export.peft import adapter_config, load_class, task_type_for
from surgeon.commands.manifest import (
    build_manifest,
    error_meaning,
    method_config,
    truncation_warnings,
)
from surgeon.engine import calibrate, distributed, faults
from surgeon.engine.outdir import (
    COMMIT_SECONDS,
    WorkDir,
    copy_side_files,
    finish_completed,
    open_work,
)
from surgeon.engine.progress import NullReporter, Reporter
from surgeon.engine.runner import SplitRunner
from surgeon.errors import UsageError
from surgeon.format import Checkpoint, OutTensor, ShardSetWriter, plan_shards, quant
from surgeon.format.dtypes import CONFIG_DTYPE, FLOAT_DTYPES, USER_DTYPES
from surgeon.format.source import Source, resolve
from surgeon.format.splitdir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD,
    FACTORS,
    INIT_FACTORS,
    MANIFEST,
    RUN_LOG,
    SPECTRA,
    factor_hashes,
    factor_key,
)
from surgeon.format.writer import (
    check_free_space,
    disk_errors,
    parse_size,
    planned_sizes,
    write_json,
)
from surgeon.linalg import get_backend
from surgeon.linalg.decompose import SOLVERS
from surgeon.methods import MethodConfig, get_method
from surgeon.model import NameMap, load_names, patterns
from surgeon.model.adapter import AdapterPlan, plan_adapter
from surgeon.model.moe import fused_shapes
from surgeon.model.output import fused_targets, load_check, write_fused
from surgeon.model.selection import (
    Target,
    block_of,
    check_targets,
    group_by_block,
    keep_dense,
    peft_target_modules,
    select_targets,
)
from surgeon.model.targets import other_matrices
from surgeon.version import __version__


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
    spectra: bool = False  # also keep every singular value (surgeon.spectra.safetensors): a full eigensolve per weight
    commit_seconds: float = COMMIT_SECONDS  # how often finished tensors are fsynced and journaled (resume points)
    seed: int = 0  # methods with random initial factors (KaSA): per-layer seeds derive from it
    kasa_beta: float = 1e-4  # KaSA's regulariser weights, recorded for the runtime (PEFT's defaults)
    kasa_gamma: float = 1e-3
    top_k: int = 2  # moe: experts kept per prompt and block (0 = all)
    pooling: str = "attention"  # moe: how the router pools the prompt (attention, mean, last)
    quantize: str | None = None  # nf4 | fp4: write the residual as bitsandbytes 4-bit codes (surgeon/quant.py)
    quantize_iters: int = 0  # LoftQ/QPiSSA alternations (pissa)
    quant_blocksize: int = 64
    double_quant: bool = False
    rank_pattern: list[str] = field(default_factory=list)  # "REGEX=R", PEFT's rank_pattern (surgeon/patterns.py)
    alpha_pattern: list[str] = field(default_factory=list)  # "REGEX=A", PEFT's alpha_pattern
    calibrate: str | None = None  # DATA: decompose W as the layer is used on this text (surgeon/engine/calibrate.py)
    calibrate_tokens: int = 65536  # calibration tokens at most
    calibrate_mode: str | None = None  # kpm | ipm | asvd; None: the method's default (options.CALIBRATE_DEFAULT_MODE)
    calibrate_peft: bool = False  # PEFT's covariance and damping settings (its CorDA), instead of ours


def _stem(file_name: str) -> str:
    return file_name[: -len(".safetensors")]


@dataclass
class SplitJob:
    """Everything planned before any data is read."""

    opts: SplitOptions
    method: object
    cfg: MethodConfig
    new_dtype: str | None
    backend: object
    src: Source
    ckpt: Checkpoint
    model_cfg: dict
    targets: dict[str, Target]
    base_plan: list[OutTensor]
    factor_plan: list[OutTensor]
    spectra_plan: list[OutTensor]
    blocks: dict[str, dict]
    plan: dict = field(default_factory=dict)
    qspec: quant.QuantSpec | None = None  # --quantize: the residual as 4-bit codes
    layer_cfgs: dict[str, MethodConfig] = field(default_factory=dict)  # module -> its config (--rank-pattern/--alpha-pattern)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    names: NameMap | None = None  # the skeleton and checkpoint key -> loaded name (None: transformers cannot build it)
    names_why: str = ""  # why there is no skeleton
    dense: dict[str, str] = field(default_factory=dict)  # all-linear layers left dense (module -> why)
    adapter: AdapterPlan | None = None  # the PEFT names of a LoRA-shaped split (None without a skeleton)
    init_plan: list[OutTensor] = field(default_factory=list)  # surgeon.init: per expert matrix where the adapter fuses them
    calib_mode: str | None = None  # --calibrate: the mode in force (None: a plain split)
    calib_data: object = None  # surgeon.model.calibration.CalibrationData
    calib: calibrate.Calibrator | None = None

    def out_dtype(self, stored: str) -> str:
        return self.new_dtype if (self.new_dtype and stored in FLOAT_DTYPES) else stored

    def layer(self, module: str) -> MethodConfig:
        return self.layer_cfgs.get(module, self.cfg)

    def inputs(self) -> list[Path]:
        """What no output may replace, hold or lie inside: the model folder (when one was given) and
        every file read (a model given as one file may have its output beside it)."""
        folder = [self.src.root] if self.src.hub_id or self.src.root.resolve() == Path(self.src.model).expanduser().resolve() else []
        return [*folder, *self.src.weights, *([self.src.config_file] if self.src.config_file else [])]


@dataclass
class Writers:
    base: ShardSetWriter
    factors: ShardSetWriter
    init: ShardSetWriter  # the untrained factors once more, kept beside the trainable copy for absorb and export
    spectra: ShardSetWriter | None

    @property
    def all(self) -> list[ShardSetWriter]:
        return [w for w in (self.base, self.factors, self.spectra, self.init) if w is not None]


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
        return _finish(job, work, writers, runner, todo, reporter, dist, (t_enter, t_start))


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
    if method.per_block and list(opts.target) == ["all-linear"]:  # a per-block method routes inside the blocks only
        targets = {n: t for n, t in targets.items() if block_of(t.module) is not None} or targets
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
                   names=names, names_why=names_why, dense=dense)
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
        hidden = _hidden_size(job.model_cfg)
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
        "factors": ([job.factor_plan], _stem(ADAPTER_WEIGHTS if lora else FACTORS)),
        "init": ([job.init_plan], _stem(INIT_FACTORS)),
        **({"spectra": ([job.spectra_plan], _stem(SPECTRA))} if job.opts.spectra else {}),
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


def _finish(job: SplitJob, work: WorkDir, w: Writers, runner: SplitRunner, todo: list[str], reporter, dist, times) -> dict | None:
    """Index, side files, adapter config, manifest, card, run log, rename: each step repeatable."""
    t_enter, t_start = times
    elapsed = time.perf_counter() - t_start
    for x in w.all:
        x.close()
    ranks = dist.sync(_rank_record(dist, job.backend, todo, sum(job.ckpt.tensors[n].nbytes for n in todo), elapsed, runner.clock))
    if not dist.is_main:
        reporter.close()
        return None  # rank 0 finishes the folder; every rank returns its manifest
    w.base.write_index()
    if job.adapter and job.adapter.fused:
        write_fused(work.path, job.factor_plan, job.targets, job.adapter.fused)
    faults.point("after-index")
    records = work.records()
    manifest = _manifest(job, records)
    manifest["factor_hashes"] = factor_hashes(work.path / INIT_FACTORS)  # the untrained factors, checked before any use (SplitDir)
    _side_files(job, work.path, manifest["target_modules"])
    load_check(job.names, job.method.lora_shaped, work.path, manifest["layers"])  # before the manifest: a refused output never looks finished
    write_json(work.path / MANIFEST, manifest)
    faults.point("after-manifest")
    from surgeon.format.card import build_card

    with disk_errors(work.path / CARD):
        build_card(manifest).save(work.path / CARD)
    faults.point("after-card")
    run_log = {
        "seconds": round(elapsed, 3), "setup_seconds": round(t_start - t_enter, 3),
        "bytes_read": sum(r["bytes_read"] for r in ranks), "resumed_tensors": work.resumed,
        "peak_gpu_bytes": ranks[0]["peak_gpu_bytes"], "stage_seconds": runner.clock.totals(),
        "layer_seconds": {rec["layer"]["module"]: rec["layer"].get("seconds") for rec in records.values() if "layer" in rec},
    }
    distributed.rank_summary(run_log, ranks)
    run_log["finish_seconds"] = round(time.perf_counter() - t_start - elapsed, 3)  # after the last tensor
    write_json(work.path / RUN_LOG, run_log)
    work.finish(_written_hashes(job, work, w))
    reporter.close()
    return {**manifest, "run": run_log}


def _written_hashes(job: SplitJob, work: WorkDir, w: Writers) -> dict:
    """The content hashes the writers computed while writing (a 7B output is not read again to be
    listed); the adapter's file is left out when write_fused rewrote part of it in place."""
    hashes = {f: h for x in w.all for f, h in x.content_hashes().items()}
    if job.adapter and job.adapter.fused:
        hashes.pop(work.path / ADAPTER_WEIGHTS, None)
    return hashes


def _manifest(job: SplitJob, records: dict[str, dict]) -> dict:
    """surgeon.json: deterministic (no timings), so a resumed run writes the same bytes."""
    layers = {rec["layer"]["module"]: {k: v for k, v in rec["layer"].items() if k != "seconds"} for rec in records.values() if "layer" in rec}
    layers = {t.module: layers[t.module] for t in job.targets.values()}  # checkpoint order
    hashes = {n: records[n]["hash"] for n in job.ckpt.tensors}
    target_modules = job.adapter.target_modules if job.adapter else peft_target_modules(job.ckpt.tensors, job.targets, job.names)
    manifest = build_manifest(job.src, job.method, job.cfg, job.opts, job.new_dtype, job.backend, layers, target_modules, job.targets, hashes)
    base_dtype = job.out_dtype(job.ckpt.tensors[next(iter(job.targets))].dtype)
    manifest["summary"]["base_dtype"] = base_dtype
    manifest["summary"]["error_meaning"] = error_meaning(job.method, base_dtype, job.qspec is not None)
    if job.method.options or job.method.notes:
        manifest["method_options"] = {k: getattr(job.cfg, k) for k in job.method.options}
        manifest["method_notes"] = dict(job.method.notes)
    if job.blocks:
        manifest["blocks"] = job.blocks
    if job.rank_pattern or job.alpha_pattern:
        manifest["rank_pattern"], manifest["alpha_pattern"] = job.rank_pattern, job.alpha_pattern
    if job.qspec is not None:  # quant hook: the settings and the errors measured per layer, summed up
        manifest["quantization"] = quant.summary(job.qspec, _quant_config(job), layers)
    manifest["load_class"] = load_class(job.model_cfg)
    if job.adapter and job.adapter.target_parameters:
        manifest["target_parameters"] = job.adapter.target_parameters
    if job.adapter and job.adapter.fused:
        manifest["fused"] = job.adapter.fused
    if job.dense:
        manifest["dense"] = job.dense
    if job.calib_mode:
        manifest["calibration"] = calibrate.summary(job, layers)
    if job.names is None:
        manifest["names"] = f"checkpoint names ({job.names_why}); no load check"
    if warnings := truncation_warnings(job.method, layers):
        manifest["warnings"] = warnings
    return manifest


def _quant_config(job: SplitJob) -> dict | None:
    """config.json's quantization_config of a --quantize split (what transformers' loader reads)."""
    if job.qspec is None:
        return None
    qdt = quant.qdtype_name(job.out_dtype(job.ckpt.tensors[next(iter(job.targets))].dtype))
    return quant.quantization_config(job.qspec, qdt, quant.skip_modules(job.ckpt.tensors, {t.tensor[: -len(".weight")] for t in job.targets.values()}))


def _side_files(job: SplitJob, folder: Path, target_modules: list[str]) -> None:
    """config (with the new dtype), tokenizer files and the PEFT adapter config."""
    copied = copy_side_files(job.src.side_files, folder, {CARD, ADAPTER_CONFIG})
    qconf = _quant_config(job)
    if (job.new_dtype or qconf) and "config.json" in copied:
        conf = dict(job.model_cfg)
        if job.new_dtype:
            conf["dtype" if "dtype" in conf else "torch_dtype"] = CONFIG_DTYPE[job.new_dtype]
        if qconf:
            conf["quantization_config"] = qconf
        write_json(folder / "config.json", conf)
    if job.method.lora_shaped:
        cfg, any_t = job.cfg, next(iter(job.targets.values()))
        ad = job.adapter
        conf = adapter_config(r=ad.r if ad else cfg.rank, alpha=ad.alpha if ad else cfg.alpha, target_modules=target_modules, fan_in_fan_out=any_t.transposed,
                              use_rslora=cfg.use_rslora, task_type=task_type_for(job.model_cfg),
                              rank_pattern=ad.rank_pattern if ad else job.rank_pattern, alpha_pattern=ad.alpha_pattern if ad else job.alpha_pattern,
                              target_parameters=ad.target_parameters if ad else None)
        write_json(folder / ADAPTER_CONFIG, conf)


def split_cost(info, targeted: bool, device_type: str) -> int:
    """How long a tensor keeps a rank busy (distributed.matrix_cost), to balance the ranks."""
    return distributed.matrix_cost(info.shape, info.nbytes, device_type, solve=targeted)


def _rank_record(dist, backend, todo: list[str], nbytes: int, seconds: float, clock) -> dict:
    """What this rank did, for the run log of a distributed run."""
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
