"""The finish of a split: index, fused adapter pairs, manifest, side files, load check, card, run log,
then the content listing (from the writers' own hashes) and the atomic rename. Each step repeatable.

    surgeon split --method milora fixtures/tiny-llama --rank 8 --out /tmp/split   # its last step
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from surgeon.commands.export.peft import adapter_config, load_class, task_type_for
from surgeon.commands.manifest import (
    build_manifest,
    error_meaning,
    truncation_warnings,
)
from surgeon.commands.split_job import SplitJob, Writers
from surgeon.engine import calibrate, distributed, faults
from surgeon.engine.outdir import (
    WorkDir,
    copy_side_files,
)
from surgeon.engine.runner import SplitRunner
from surgeon.format import quant
from surgeon.format.dtypes import CONFIG_DTYPE
from surgeon.format.splitdir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD,
    INIT_FACTORS,
    MANIFEST,
    RUN_LOG,
    factor_hashes,
)
from surgeon.format.writer import (
    disk_errors,
    write_json,
)
from surgeon.model.output import load_check, write_fused
from surgeon.model.selection import (
    peft_target_modules,
)


def finish_split(job: SplitJob, work: WorkDir, w: Writers, runner: SplitRunner, todo: list[str], reporter, dist, times) -> dict | None:
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


def _rank_record(dist, backend, todo: list[str], nbytes: int, seconds: float, clock) -> dict:
    """What this rank did, for the run log of a distributed run."""
    return {
        "rank": dist.rank, "device": str(backend.device), "tensors": len(todo), "bytes_read": nbytes,
        "cost": dist.loads[dist.rank], "seconds": round(seconds, 3), "stage_seconds": clock.totals(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(backend.device) if backend.device.type == "cuda" else None,
    }
