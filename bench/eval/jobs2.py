"""The jobs of protocol v2 (bench/eval/grid.py), run inside a worker (bench/eval/runner.py).

Arms beyond v1's methods:
  kasa-authors  KaSA as the authors' script does it (github.com/juyongjiang/KaSA main.py): it keeps
                `in_features − r` components, so a weight with in > out loses max(0, out − in + r) minor
                components instead of r (on SmolLM2: k_proj, v_proj, down_proj keep all of theirs), and
                their GLUE scripts use alpha = 2r. Built from `surgeon split --method kasa --alpha 2r`: the
                residual of every weight the authors would not truncate is replaced by the original.
  milora-cal, kasa-cal
                the calibrated splits of the data-aware issue (CorDA-KPM-style: calibration text = the
                knowledge to keep, bench/eval/general/calibration.txt, disjoint from the measured text).
                Run through the CLI (`python -m surgeon split … --calibrate FILE`) only when
                `surgeon split --help` offers --calibrate; never imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.eval import folders as F
from bench.eval import jobs as J
from bench.eval import latency
from bench.eval.measure import load_plain_model, load_split_model

CALIBRATION = Path(__file__).with_name("general") / "calibration.txt"
_HAS_CALIBRATE: dict[str, bool] = {}


def has_calibrate() -> bool:
    """Whether this checkout's `surgeon split` takes --calibrate (asked once per process)."""
    if "v" not in _HAS_CALIBRATE:
        r = subprocess.run([sys.executable, "-m", "surgeon", "split", "--help"], capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"}, check=False)
        _HAS_CALIBRATE["v"] = "--calibrate" in r.stdout
    return _HAS_CALIBRATE["v"]


def kasa_authors(ctx, model: Path, where: Path, rank: int, targets: str, seed: int) -> Path:
    from safetensors.torch import load_file, save_file

    from surgeon.commands.split import SplitOptions, split

    out = where / f"kasa-authors-{targets}-r{rank}-s{seed}"
    with F.locked(out):
        if (out / "surgeon.json").exists():
            return out
        raw, tmp = out.with_name(out.name + ".raw"), out.with_name(out.name + ".partial")
        for p in (raw, tmp):
            shutil.rmtree(p, ignore_errors=True)
        split(str(model), raw, SplitOptions(method="kasa", rank=rank, alpha=2.0 * rank, target=F.TARGETS[targets], seed=seed, overwrite=True,
                                            device="cpu" if ctx.device == "cpu" else "auto", spectra=False))
        keep = {}
        for mod, (o, i) in F.target_shapes(model, targets).items():
            drop = max(0, min(o, i) - (i - rank))
            if 0 < drop < rank:
                raise ValueError(f"{mod}: the authors' truncation drops {drop} of {rank} components; only 0 or r is built here")
            if drop == 0:
                keep[mod + ".weight"] = True
        orig = {k: v for f in F.weight_files(model) for k, v in load_file(str(f)).items()}
        shutil.copytree(raw, tmp, copy_function=os.link)
        for shard in F.weight_files(raw):
            t = load_file(str(shard))
            if any(k in keep for k in t):
                (tmp / shard.name).unlink()
                save_file({k: (orig[k] if k in keep else v).contiguous() for k, v in t.items()}, str(tmp / shard.name), metadata={"format": "pt"})
        mf = json.loads((tmp / "surgeon.json").read_text())
        mf["eval_methods_note"] = f"KaSA, the authors' truncation (in_features − r kept): untruncated {sorted(keep)}; alpha = 2r"
        (tmp / "surgeon.json").write_text(json.dumps(mf, indent=2))
        os.replace(tmp, out)
        shutil.rmtree(raw, ignore_errors=True)
    return out


def calibrated(ctx, model: Path, where: Path, arm: str, rank: int, targets: str, seed: int) -> Path:
    if not has_calibrate():
        raise RuntimeError("not available: this checkout's `surgeon split` has no --calibrate (the data-aware issue has not landed)")
    method = arm.removesuffix("-cal")
    out = where / f"{arm}-{targets}-r{rank}-s{seed}"
    with F.locked(out):
        if not (out / "surgeon.json").exists():
            cmd = [sys.executable, "-m", "surgeon", "split", str(model), "--method", method, "--rank", str(rank), "--seed", str(seed),
                   "--out", str(out), "--calibrate", str(CALIBRATION), "--overwrite"]
            for t in F.TARGETS[targets]:
                cmd += ["--target", t]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode:
                raise RuntimeError(f"surgeon split --calibrate failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return out


def make_split(ctx, model: Path, arm: str, targets: str, seed: int, where: Path) -> Path:
    if arm == "kasa-authors":
        return kasa_authors(ctx, model, where, ctx.settings["rank"], targets, seed)
    if arm.endswith("-cal"):
        return calibrated(ctx, model, where, arm, ctx.settings["rank"], targets, seed)
    return J.make_split(ctx, model, arm, targets, seed, where)


def ref_job(ctx, job: dict) -> dict:
    m = load_plain_model(ctx.model, ctx.device)
    return ctx.ev.measure(m, ctx.settings["tasks"], ("val", "test")) | {"gen_tokens": int(ctx.ev.gen_windows.numel())}


def train_job(ctx, job: dict) -> dict:
    s, t0 = ctx.settings, time.perf_counter()
    arm, targets, seed, lr = job["method"], job["targets"], job["seed"], job["lr"]
    sdir = make_split(ctx, ctx.model, arm, targets, seed, ctx.work / "splits")
    t_split, split_nll = time.perf_counter() - t0, None
    if seed == s["select_seeds"][0]:  # what the split alone does (KaSA truncates): the same at every lr
        m = load_split_model(sdir, ctx.device)
        split_nll = ctx.ev.window_nll(m)
        split_nll = sum(split_nll) / len(split_nll)
        del m
    out = ctx.work / "runs" / job["id"]
    r = J._train(ctx, sdir, ctx.ev.train_data(s["tasks"]), out, lr, seed, s["steps"])
    m = load_split_model(out, ctx.device)
    r |= ctx.ev.measure(m, s["tasks"], ("val", "test") if job.get("select") else ("test",))
    del m
    r |= {"rank": J.rank_of(ctx, arm, targets), "effective_trainable": F.effective_params(out),
          "split_gen_nll": split_nll, "split_s": round(t_split, 2), "job_s": round(time.perf_counter() - t0, 2)}
    shutil.rmtree(out, ignore_errors=True)
    return r


def seq_job(ctx, job: dict) -> dict:
    """One arm over the task sequence, absorbing after each task; every task's test accuracy after every stage."""
    s, t0 = ctx.settings, time.perf_counter()
    arm, seed, lr, targets = job["method"], job["seed"], job["lr"], job["targets"]
    home = ctx.work / "seq" / job["id"]
    shutil.rmtree(home, ignore_errors=True)
    cur, stages = ctx.model, []
    for k, task in enumerate(s["tasks"]):
        t1 = time.perf_counter()
        sdir = make_split(ctx, cur, arm, targets, 1000 * seed + k, home / f"split{k}")
        out = home / f"trained{k}"
        r = J._train(ctx, sdir, ctx.ev.train_data([task]), out, lr, seed, s["steps"])
        m = load_split_model(out, ctx.device)
        test = ctx.ev.tasks(m, s["tasks"], "test")
        nll = ctx.ev.window_nll(m)
        r |= {"task": task, "test": {t: {"acc": v["acc"]} for t, v in test.items()}, "gen_nll_mean": sum(nll) / len(nll)}
        del m
        merged = F.merge(out, home / f"merged{k}")
        for p in (home / f"split{k}", out) + ((cur,) if cur != ctx.model else ()):
            shutil.rmtree(p, ignore_errors=True)
        cur = merged
        stages.append(r | {"stage_s": round(time.perf_counter() - t1, 2)})
    shutil.rmtree(home, ignore_errors=True)
    return {"stages": stages, "job_s": round(time.perf_counter() - t0, 2)}


def run_job(ctx, job: dict) -> dict:
    res = {"ref": ref_job, "train": train_job, "seq": seq_job, "latency": latency.latency_job}[job["kind"]](ctx, job)
    return res | {"device_name": torch.cuda.get_device_name(torch.device(ctx.device)) if ctx.device.startswith("cuda") else "cpu"}
