"""`surgeon split --calibrate DATA`: the split's side of the data-aware decomposition.

    surgeon split --method kasa MODEL --rank 8 --calibrate default --out split-dir
    surgeon split --method pissa MODEL --rank 8 --calibrate text.jsonl --calibrate-mode ipm --out split-dir

The covariances come from surgeon.model.calibration.BlockCovariances, which runs the calibration
tokens through the model one block at a time; this module asks for them in that block order and
releases each as soon as its weight is solved, so at most one block's covariances (plus those of
the tensors being solved) are held. `order` puts the targeted tensors of the to-do list in block
order (the other tensors keep their places); `fetch` runs on the runner's main loop (the collector
is not thread-safe), before the solve is submitted; the solve threads only read the tensor.
Determinism: the same tokens, float64 sums in a fixed order, a fixed block order, so a resumed run
writes the same bytes as an uninterrupted one. The math is surgeon.linalg.calibrated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from surgeon.linalg import Triplets, calibrated, output_share
from surgeon.model.skeleton import context_length

if TYPE_CHECKING:  # imported on use: the block runner pulls in transformers' modeling code, which a plain split never needs
    from surgeon.model.calibration import BlockCovariances

MAX_LEN = 512  # tokens per calibration sample (one record = one sample, cut to this)
NO_TOKENS = "no calibration token was routed to this expert; split uncalibrated"


def attach(job, mode: str) -> None:
    """Read and tokenize --calibrate DATA with the model's tokenizer (before any output folder
    exists), put what a resumed run must match into the plan, and give the job its Calibrator."""
    from surgeon.model.calibration import load_calibration_data

    opts = job.opts
    job.calib_mode = mode
    max_len = min(MAX_LEN, context_length(job.model_cfg) or MAX_LEN)  # GPT-2-sized contexts: no sample past the position table
    job.calib_data = load_calibration_data(opts.calibrate, job.src.root, max_tokens=opts.calibrate_tokens, max_len=max_len)
    d = job.calib_data
    job.plan["calibration"] = {"sha256": d.sha256, "tokens": d.tokens, "mode": mode, "peft_settings": opts.calibrate_peft}
    job.calib = Calibrator(job)


class Calibrator:
    """Covariances for the runner, in block order, built on first use (a finished run needs none)."""

    def __init__(self, job):
        self.job = job
        self._cov: BlockCovariances | None = None
        self.modules = {name: t.module for name, t in job.targets.items()}  # keyed as the runner asks: the checkpoint tensor
        self.todo: set[str] | None = None  # the tensors this run still solves (a resumed run: fewer)

    @property
    def cov(self) -> BlockCovariances:
        """The collector, for the targets still to solve only: a resumed run holds no covariance of a
        weight it finished before (a sum over the same inputs: the same bytes either way)."""
        if self._cov is None:
            from surgeon.model.calibration import BlockCovariances

            job = self.job
            kw = {"peft": True} if job.opts.calibrate_peft else {}
            left = {t.module: t.tensor for n, t in job.targets.items() if self.todo is None or n in self.todo}
            self._cov = BlockCovariances(job.model_cfg, job.ckpt, left, job.calib_data, job.backend.device, **kw)
        return self._cov

    def order(self, todo: list[str]) -> list[str]:
        """todo with its targeted tensors in the collector's block order (checkpoint order within a
        block; targets the collector skips after them), every other tensor where it was."""
        if self._cov is None:
            self.todo = set(todo)
        rank = {m: i for i, m in enumerate(m for block in self.cov.blocks() for m in block)}
        slots = [i for i, n in enumerate(todo) if n in self.modules]
        targeted = sorted((todo[i] for i in slots), key=lambda n: rank.get(self.modules[n], len(rank)))  # stable
        out = list(todo)
        for i, n in zip(slots, targeted):
            out[i] = n
        return out

    def fetch(self, tensor: str) -> tuple[torch.Tensor, int] | str | None:
        """(covariance, tokens) of a targeted tensor; the collector's reason when it has none; None when not targeted."""
        module = self.modules.get(tensor)
        if module is None:
            return None
        if not self.cov.available(module):  # runs the blocks up to its own: some reasons are known only then
            return self.cov.skipped.get(module, "no calibration covariance")
        tokens = self.cov.tokens(module)
        if tokens == 0:  # an MoE expert no calibration token was routed to
            return NO_TOKENS
        return self.cov.covariance(module), tokens

    def release(self, tensor: str) -> None:
        module = self.modules.get(tensor)
        if module is not None and self._cov is not None:
            self._cov.release(module)


def solve(w64: torch.Tensor, calib: tuple[torch.Tensor, int], job, cfg, spectrum: bool) -> tuple[Triplets, dict]:
    """The calibrated triplets of one weight (out, in) and their record (`calib` from Calibrator.fetch)."""
    cov, tokens = calib
    opts = job.opts
    return calibrated(w64, cov, tokens, cfg.rank, job.calib_mode, job.backend, which=job.method.which, peft=opts.calibrate_peft,
                      tol=opts.tol, solver=opts.solver, spectrum=spectrum)


def carried(w64: torch.Tensor, res) -> torch.Tensor:
    """The part of W whose output share is reported: the trainable part (PiSSA, MiLoRA: W − residual),
    the truncated part (KaSA: W − W_world), or, for NuSA, W restricted to the input directions its
    frozen A reads (W AᵀA; A has orthonormal rows, zero padding rows add nothing)."""
    if "nusa_A" in res.factors:
        a = res.factors["nusa_A"].to(w64.device, torch.float64)  # (r, in)
        return (w64 @ a.mT) @ a  # (out, r) @ (r, in) -> (out, in)
    return w64 - res.residual  # (out, in)


def layer_record(rec: dict, w64: torch.Tensor, res, cov: torch.Tensor) -> dict:
    """The per-layer calibration entry of the manifest (deterministic: no timings)."""
    keep = ("mode", "which", "regularised", "damping", "inverse_error", "back_error")
    out = {k: rec[k] for k in keep if k in rec}
    out["output_share"] = output_share(carried(w64, res), w64, cov)
    return out


def summary(job, layers: dict) -> dict:
    """surgeon.json's "calibration": the data, the mode, and which layers were regularised or skipped."""
    d = job.calib_data
    recs = {m: l.get("calibration", {}) for m, l in layers.items()}
    shares = [r["output_share"] for r in recs.values() if "output_share" in r]
    return {
        "source": d.source, "sha256": d.sha256, "tokens": d.tokens, "samples": len(d.input_ids), "mode": job.calib_mode,
        "peft_settings": job.opts.calibrate_peft,
        "carried": "truncated part" if job.method.truncates else "trainable part",
        "output_share_max": max(shares) if shares else None,
        "regularised": sorted(m for m, r in recs.items() if r.get("regularised")),
        "skipped": {m: r["skipped"] for m, r in recs.items() if "skipped" in r},
        **({"spectra": "the singular values of W·T (the calibrated transform), not of W"} if job.opts.spectra else {}),
    }
