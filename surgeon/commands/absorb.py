"""Fold (possibly trained) factors back into plain weights, and export a LoRA for the original base.

    surgeon absorb SPLIT_DIR --out MERGED
    surgeon export SPLIT_DIR --to lora --out LORA_DIR

absorb, per targeted weight, with s the LoRA scaling and B₀A₀ the factors as split:
  * base "original" (default when the source files named in surgeon.json are still there,
    unchanged): W' = W + s·(B'A' − B₀A₀). Untrained factors give back W bit for bit (the
    change is skipped when the factors are identical, and the original tensor is copied).
  * base "residual": W' = W_res + s·B'A', what PEFT's merge_and_unload computes.
For a method whose residual drops part of W on purpose (`Method.truncates`, KaSA: the r minor
components) "auto" means "residual": W' = W_world + ΔW', the model that was trained (the runtime
forward); "original" must be asked for and re-adds the dropped part: W' = W + ΔW' (ΔW₀ = 0).
The output has the source's tensor names and dtypes, streamed tensor by tensor.

export: the PiSSA→LoRA conversion from PEFT's docs: ΔW = s(B'A' − B₀A₀) = s'·[B' | B₀][A' ; −A₀],
a rank-2r adapter for the ORIGINAL model with lora_alpha doubled so that s' = s. A method that is
not LoRA-shaped exports through `Method.lora_change` when it has one (NuSA: lora_B = B,
lora_A = (M − M₀)A: a rank-r LoRA of the trained change on the ORIGINAL model), else through
`Method.lora_form` (KaSA: B diag(d), A: a rank-r LoRA on its RESIDUAL, the split folder itself).

absorb runs under torchrun as split does (surgeon/distributed.py): each rank merges its share of
the tensors into the same pre-laid-out shards; rank 0 writes the rest.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from surgeon.commands.export.peft import adapter_config, publish_adapter, split_plain_targets, split_task_type
from surgeon.engine import distributed, faults
from surgeon.engine.outdir import (
    COMMIT_SECONDS,
    WorkDir,
    copy_side_files,
    finish_completed,
    open_work,
)
from surgeon.engine.progress import NullReporter, Reporter
from surgeon.errors import NumericsError, SourceChangedError, SplitDirError, UsageError
from surgeon.format import Checkpoint, OutTensor, ShardSetWriter, plan_shards, quant
from surgeon.format.card import build_card
from surgeon.format.dtypes import cast_overflow
from surgeon.format.readlock import reads
from surgeon.format.source import confined
from surgeon.format.splitdir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD,
    FACTORS,
    INIT_FACTORS,
    MANIFEST,
    RUN_LOG,
    SPECTRA,
    lora_key,
)
from surgeon.format.writer import (
    check_free_space,
    disk_errors,
    parse_size,
    planned_sizes,
    write_json,
)
from surgeon.methods import Method
from surgeon.methods.folder import SplitDir
from surgeon.model.check import check_output
from surgeon.model.moe import fused_factors
from surgeon.runtime.calibrate import calibration_gates
from surgeon.version import __version__


@dataclass
class AbsorbOptions:
    base: str = "auto"  # auto | original | residual
    shard_size: str = "5GB"
    overwrite: bool = False
    fixed_gates: Path | None = None  # prompt-dependent methods (moe): gates JSON or calibration JSONL


@dataclass
class AbsorbJob:
    sd: SplitDir
    base: str  # "original" or "residual"
    why: str  # why this base (auto picks it): said in the manifest and by the CLI
    ckpt: Checkpoint
    hashes: dict[str, str]  # source tensor -> content hash at split time (verified while reading)
    mult: dict[str, float] | None  # module -> fixed gate multiplying its delta (moe only)
    plan: dict
    side: list[Path]  # config and tokenizer files to copy, checked before any work


def choose_base(sd: SplitDir, wanted: str) -> tuple[str, str]:
    """(base, why). "auto": the original weights when the source files are all there (verified by
    content hash while merging), else the residual, and it says so. KaSA-like methods: residual."""
    if wanted not in ("auto", "original", "residual"):
        raise UsageError(f"--base {wanted!r}: choose auto, original or residual.")
    missing = sd.missing_source_files()
    if wanted == "residual":
        return "residual", "asked for"
    if wanted == "auto" and sd.method.truncates:
        return "residual", f"{sd.method.name} trains on its truncated residual"
    if missing:
        if wanted == "original":
            raise UsageError(f"--base original: the source file {missing[0]} recorded in {MANIFEST} is gone; restore it, or use --base residual.")
        return "residual", f"the source file {missing[0]} is gone"
    if not sd.init_file.exists():
        if wanted == "original":
            raise SplitDirError(f"{sd.path} lacks {INIT_FACTORS} (the untrained factors); use --base residual.")
        return "residual", f"{INIT_FACTORS} is missing"
    if not sd.source_hashes():  # a split by surgeon < 0.2 recorded sizes and mtimes only
        return "original", "the source files are there (checked by size only: this split recorded no content hashes)"
    return "original", "the source files are there (each tensor verified by its content hash)"


def verified_source(sd: SplitDir) -> Checkpoint:
    """The source weights as recorded, refused early when a file's size changed."""
    for f in sd.source_files():
        size = Path(f["path"]).stat().st_size
        if size != f["size"]:
            raise SourceChangedError(f"the source file {f['path']} changed since the split ({f['size']} → {size} bytes); "
                                     "restore it, or absorb with --base residual.")
    files = [Path(f["path"]) for f in sd.source_files()]
    return Checkpoint.open_pickled(files) if sd.manifest["source"].get("pickled") else Checkpoint.open(files)


def plan_absorb(split_dir: Path, opts: AbsorbOptions, dist) -> AbsorbJob:
    parse_size(opts.shard_size)  # refused before any folder is made
    sd = SplitDir(split_dir)
    base, why = choose_base(sd, opts.base)
    mult, gates = None, None
    if sd.method.prompt_dependent:
        mult, gates = dist.from_main(lambda: sd.method.fixed_gates(sd, opts.fixed_gates, calibration_gates))  # refuses without --fixed-gates
    elif opts.fixed_gates is not None:
        raise UsageError(f"--fixed-gates is for splits whose update depends on the prompt (method moe); {sd.method.name} has static factors.")
    ckpt = verified_source(sd) if base == "original" else sd.residual()
    if base == "residual" and sd.manifest.get("quantization"):  # quant hook: merge into the dequantized 4-bit residual
        ckpt = quant.DequantCheckpoint(ckpt, sd.manifest)
    plan = {"op": "absorb", "split": str(sd.path.resolve()), "base": base, "shard_size": opts.shard_size, **sd.identity()}
    if gates is not None:
        plan["fixed_gates"] = gates
    return AbsorbJob(sd, base, why, ckpt, sd.source_hashes() if base == "original" else {}, mult, plan, side_files(sd, base))


def side_files(sd: SplitDir, base: str) -> list[Path]:
    """The config and tokenizer files absorb copies: regular files inside the split folder (a link out
    of it is refused, as split refuses one out of the model folder); with the original weights, the
    source's own config.json, which carries the original dtype."""
    side = [confined(sd.path, p.name, "the split folder") for p in sorted(sd.path.iterdir())
            if (p.is_file() or p.is_symlink()) and p.suffix in (".json", ".jinja", ".txt", ".model", ".tiktoken") and "index" not in p.name]
    source = Path(sd.source_files()[0]["path"]).parent
    if base == "original" and (source / "config.json").is_file():
        side = [p for p in side if p.name != "config.json"] + [confined(source, "config.json", "the source model folder")]
    return side


@distributed.collective
@reads("split_dir")
def absorb(split_dir: Path, out: Path, opts: AbsorbOptions | None = None, reporter: Reporter | None = None) -> dict:
    dist = distributed.current()
    opts = opts or AbsorbOptions()
    reporter = reporter or NullReporter()
    job = plan_absorb(split_dir, opts, dist)
    work, writer = open_work(dist, out, job.plan, opts.overwrite, job.sd.inputs(), lambda w: _open_writer(job, w, opts, dist))
    with work:
        if work.complete:  # an earlier run was killed after its rename: only its cleanup was left
            return finish_completed(work, dist)
        t0 = time.perf_counter()
        try:
            _merge_all(job, work, writer, reporter, dist)
        except SourceChangedError:
            work.discard()  # its plan can never complete: a rerun with --base residual must not meet it
            raise
        return _finish(job, work, writer, reporter, dist, time.perf_counter() - t0)


def _open_writer(job: AbsorbJob, work: WorkDir, opts: AbsorbOptions, dist) -> ShardSetWriter:
    shards = plan_shards([OutTensor(n, i.dtype, i.shape) for n, i in job.ckpt.tensors.items()], parse_size(opts.shard_size))
    if dist.is_main:
        check_free_space(work.path, planned_sizes(work.path, shards))
    return ShardSetWriter(work.path, shards)


def _merge_all(job: AbsorbJob, work: WorkDir, writer: ShardSetWriter, reporter: Reporter, dist) -> None:
    sd, ckpt = job.sd, job.ckpt
    by_tensor = {lay.get("tensor", f"{m}.weight"): m for m, lay in sd.layers.items()}  # checkpoint key -> loaded module
    left = [n for n in ckpt.tensors if n not in work.done]
    rank = sd.cfg.rank * (2 if job.base == "original" else 1)  # B·A once, or twice (current and initial)
    todo = dist.share(left, [distributed.matrix_cost(ckpt.tensors[n].shape, ckpt.tensors[n].nbytes, rank=rank if n in by_tensor else None) for n in left])
    reporter.start(len(ckpt.tensors) - len(left) + len(todo), sum(ckpt.tensors[n].nbytes for n in todo), done=len(ckpt.tensors) - len(left))
    init_file = sd.init_file if job.base == "original" else sd.factors_file
    with safe_open(sd.factors_file, "pt") as cur, safe_open(init_file, "pt") as ini, ThreadPoolExecutor(1, thread_name_prefix="surgeon-writer") as pool:
        batch: list[tuple[Future, dict]] = []  # written (or being written), not yet journaled
        last = time.monotonic()
        try:
            for info, tensor in ckpt.stream(todo, digest=bool(job.hashes)):
                check_hash(job.hashes, job.ckpt, info.name)
                faults.slow()
                module = by_tensor.get(info.name)
                tensor, changed = _merge_one(job, module, tensor, cur, ini) if module is not None else (tensor, False)
                while sum(not f.done() for f, _ in batch) >= 2:
                    next(f for f, _ in batch if not f.done()).result()
                batch.append((pool.submit(writer.write, info.name, tensor), {"name": info.name, "changed": changed}))
                reporter.advance(info.name, info.nbytes)
                faults.point("tensor")
                if time.monotonic() - last >= COMMIT_SECONDS:  # a resume point: a kill loses at most this much
                    _commit(work, writer, batch)
                    last = time.monotonic()
                dist.check_peers()  # another rank failed: stop here
        except BaseException:
            with contextlib.suppress(Exception):  # keep what was written (an error or Ctrl-C): the same command resumes
                _commit(work, writer, batch)
            raise
        _commit(work, writer, batch)
    writer.close()


def _commit(work: WorkDir, writer: ShardSetWriter, batch: list[tuple[Future, dict]]) -> None:
    """A resume point over the batch, which is emptied."""
    work.journal.commit_after(batch, [writer])
    batch.clear()


def check_hash(hashes: dict[str, str], ckpt: Checkpoint, name: str) -> None:
    """An original tensor must be the one that was split: its content hash (read with digest=True)
    against the one split recorded. No-op for splits made before hashes were recorded."""
    if not hashes:
        return
    got, want = ckpt.digests.pop(name), hashes.get(name)
    if got != want:
        raise SourceChangedError(f"the source tensor {name} changed since the split (content hash {got} ≠ {want}); "
                                 "restore the source, or absorb with --base residual.")


def _merge_one(job: AbsorbJob, module: str, tensor: torch.Tensor, cur, ini) -> tuple[torch.Tensor, bool]:
    """W' = W + g·s(B'A' − B₀A₀) into the original, W_res + g·s·B'A' into the residual."""
    sd, lay = job.sd, job.sd.layers[module]
    g = 1.0 if job.mult is None else job.mult[module]
    f_cur, cfg = sd.factors(cur, module), sd.layer_cfg(module)
    if job.base == "residual":
        return _add(tensor, g * sd.method.delta(f_cur, cfg), lay["transposed"], module), True
    f_ini = sd.factors(ini, module)
    if g == 0 or all(torch.equal(f_cur[k], f_ini[k]) for k in f_cur):
        return tensor, False  # untrained: the original, bit for bit
    delta = sd.method.delta(f_cur, cfg) - sd.method.delta(f_ini, cfg)  # (out, in)
    return _add(tensor, g * delta, lay["transposed"], module), True


def _finish(job: AbsorbJob, work: WorkDir, writer: ShardSetWriter, reporter: Reporter, dist, seconds: float) -> dict | None:
    dist.sync()  # every rank's tensors are written
    if not dist.is_main:
        reporter.close()
        return None  # rank 0 finishes the folder; every rank returns its manifest
    sd = job.sd
    writer.write_index()
    changed = sum(1 for rec in work.records().values() if rec.get("changed"))
    skip = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, INIT_FACTORS, SPECTRA, FACTORS, MANIFEST, RUN_LOG, CARD}
    copy_side_files(job.side, work.path, skip)
    if (work.path / "config.json").exists():  # quant hook: the merged weights are plain floats
        quant.strip_config(work.path / "config.json")
    manifest = {
        "surgeon_version": __version__, "operation": "absorb", "split": str(sd.path.resolve()), "method": sd.method.name,
        "base": job.base, "base_reason": job.why, "layers_changed": changed if job.base == "original" else len(sd.layers),
        "layers": len(sd.layers), "source": sd.manifest["source"],
    }
    if "fixed_gates" in job.plan:
        manifest["fixed_gates"] = job.plan["fixed_gates"]
    write_json(work.path / MANIFEST, manifest)
    with disk_errors(work.path / CARD):
        build_card(manifest).save(work.path / CARD)
    write_json(work.path / RUN_LOG, {"seconds": round(seconds, 3), "resumed_tensors": work.resumed})
    faults.point("after-manifest")
    work.finish(writer.content_hashes())  # hashed while written: the merged model is not read again to be listed
    reporter.close()
    return manifest


def _add(stored: torch.Tensor, delta: torch.Tensor, transposed: bool, module: str) -> torch.Tensor:
    d = delta.mT if transposed else delta  # stored layout
    merged = stored.double() + d
    out = merged.to(stored.dtype)
    if why := cast_overflow(f"{module}.weight", merged, out):  # a trained change too large for a float16 base
        raise NumericsError(f"{why} once merged; the trained change is too large for this dtype (retrain with a lower --lr, "
                            "or split a float32 copy of the model).")
    return out


@reads("split_dir")
def export_lora(split_dir: Path, out: Path, overwrite: bool = False) -> dict:
    """A PEFT LoRA for the original model: rank 2r [B' | B₀] [A' ; −A₀] with lora_alpha doubled for
    LoRA-shaped splits, the method's rank-r `lora_change` otherwise (or `lora_form` on the residual)."""
    sd = SplitDir(split_dir)
    change = type(sd.method).lora_change is not Method.lora_change
    if not sd.lora and not change:
        return _export_residual_lora(sd, out, overwrite)
    if not sd.init_file.exists():
        raise SplitDirError(f"{sd.path} lacks {INIT_FACTORS} (the untrained factors) needed for the conversion.")
    cfg = sd.cfg
    tensors = {}
    with safe_open(sd.factors_file, "pt") as cur, safe_open(sd.init_file, "pt") as ini:
        if sd.lora and sd.manifest.get("fused"):
            tensors.update(_export_fused(sd, cur, ini))
        for module, lay in sd.manifest["layers"].items():
            if "fused" in lay:
                continue
            if not sd.lora:
                a, b = sd.method.lora_change(sd.factors(cur, module), sd.factors(ini, module), sd.layer_cfg(module))
                tensors[lora_key(module, "lora_A")], tensors[lora_key(module, "lora_B")] = a.contiguous(), b.contiguous()
                continue
            a1, b1 = cur.get_tensor(lora_key(module, "lora_A")), cur.get_tensor(lora_key(module, "lora_B"))
            a0, b0 = ini.get_tensor(lora_key(module, "lora_A")), ini.get_tensor(lora_key(module, "lora_B"))
            tensors[lora_key(module, "lora_A")] = torch.cat([a1, -a0], 0)  # (2r, in)
            tensors[lora_key(module, "lora_B")] = torch.cat([b1, b0], 1)  # (out, 2r)
    # s' = alpha'/r' must equal s: r' = 2r, so alpha' = 2·alpha (√2·alpha with rsLoRA), per module too
    r_mult, a_mult = (2, 2**0.5 if cfg.use_rslora else 2) if sd.lora else (1, 1)
    r_out, alpha2 = r_mult * cfg.rank, a_mult * cfg.alpha
    rp, ap = sd.patterns or (sd.manifest.get("rank_pattern", {}), sd.manifest.get("alpha_pattern", {}))
    src = sd.manifest["source"]
    modules, params = (sd.manifest["target_modules"], sd.manifest.get("target_parameters")) if sd.lora else split_plain_targets(sd)
    conf = adapter_config(
        r=r_out,
        alpha=alpha2,
        target_modules=modules,
        fan_in_fan_out=sd.manifest.get("transposed", False),
        use_rslora=cfg.use_rslora,
        base_model=src.get("hub_id") or str(Path(src["files"][0]["path"]).parent),
        revision=src.get("revision") if src.get("hub_id") else None,
        task_type=split_task_type(sd.path),
        rank_pattern={k: r_mult * v for k, v in rp.items()}, alpha_pattern={k: a_mult * v for k, v in ap.items()},
        target_parameters=params,
    )
    return publish_adapter(out, {"op": "export", "split": str(sd.path.resolve()), **sd.identity()}, overwrite, sd.inputs(), conf, tensors,
                           check=lambda folder: check_output(folder, sd.manifest, sd.path))


def _export_fused(sd: SplitDir, cur, ini) -> dict[str, torch.Tensor]:
    """The rank-2R pair [B' | B₀], [A' ; −A₀] of every fused expert parameter, per expert in PEFT's layout
    (lora_A expert-major (E·R, in), lora_B rank-major (out, R·E): surgeon/model/moe.py)."""
    init = fused_factors(ini, sd.layers, sd.manifest["fused"], lora_key)
    out = {}
    for info in sd.manifest["fused"].values():
        m, e = info["module"], info["experts"]
        a1, b1 = sd._fused(cur, m)["lora_A"], sd._fused(cur, m)["lora_B"]
        a0, b0 = init[lora_key(m, "lora_A")], init[lora_key(m, "lora_B")]
        a = torch.cat([a1.reshape(e, -1, a1.shape[1]), -a0.reshape(e, -1, a0.shape[1])], 1)  # (E, 2R, in)
        out[lora_key(m, "lora_A")] = a.reshape(-1, a1.shape[1]).contiguous()
        out[lora_key(m, "lora_B")] = torch.cat([b1, b0], 1).contiguous()  # (out, 2R·E)
    return out


def _export_residual_lora(sd: SplitDir, out: Path, overwrite: bool) -> dict:
    """A rank-r PEFT LoRA on the split's residual (`Method.lora_form`), same r and alpha; its base
    model is the split folder itself."""
    with safe_open(sd.factors_file, "pt") as cur:
        first = next(iter(sd.manifest["layers"]))
        if sd.method.lora_form(sd.factors(cur, first), sd.cfg) is None:
            raise UsageError(f"method {sd.method.name} has no LoRA form; export --to lora needs a LoRA-shaped split.")
        tensors = {}
        for module in sd.manifest["layers"]:
            f = sd.method.lora_form(sd.factors(cur, module), sd.layer_cfg(module))
            tensors[lora_key(module, "lora_A")] = f["lora_A"]  # (r, in)
            tensors[lora_key(module, "lora_B")] = f["lora_B"]  # (out, r)
    modules, params = split_plain_targets(sd)
    conf = adapter_config(
        r=sd.cfg.rank,
        alpha=sd.cfg.alpha,
        target_modules=modules,
        fan_in_fan_out=sd.manifest.get("transposed", False),
        use_rslora=sd.cfg.use_rslora,
        base_model=str(sd.path.resolve()),
        task_type=split_task_type(sd.path),
        rank_pattern=sd.manifest.get("rank_pattern"), alpha_pattern=sd.manifest.get("alpha_pattern"),
        target_parameters=params,
    )
    return publish_adapter(out, {"op": "export", "split": str(sd.path.resolve()), "to": "lora-on-residual", **sd.identity()}, overwrite, sd.inputs(),
                           conf, tensors, check=lambda folder: check_output(folder, sd.manifest, sd.path))

