"""The streaming part of a split: read → decompose → method → write, overlapped.

Reader threads prefetch the next tensors and a hash thread hashes them while the current ones are
decomposed on solve threads, and a writer thread puts finished tensors into the pre-planned
shards. Every `commit_seconds` the writer thread, after the writes queued before, fsyncs the
shards and appends the finished tensors to the journal: a resume point that costs the main loop
nothing. Host memory stays at a few tensors. Used by pipeline.split; knows no file format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from surgeon.engine import calibrate, faults
from surgeon.engine.stages import HostCopy, StageClock, write_all
from surgeon.errors import NumericsError
from surgeon.format import quant
from surgeon.format.dtypes import cast_overflow, torch_dtype
from surgeon.format.reader import tensor_hash
from surgeon.format.splitdir import factor_key
from surgeon.linalg import decompose

DTYPE_FIX = "split with --dtype float32 or bfloat16 (bfloat16 has float32's range), or keep the checkpoint's dtype."


class SplitRunner:
    """Streams this rank's tensors through the solvers into the writers; `run(todo)` returns stats."""

    def __init__(self, job, work, writers, reporter, dist):
        self.job, self.work, self.w, self.reporter, self.dist = job, work, writers, reporter, dist
        self.clock = StageClock()
        self.device_type = job.backend.device.type
        self.workers = job.opts.workers or (2 if self.device_type == "cpu" else 1)
        self.solving: deque[tuple] = deque()
        self.pending: deque[Future] = deque()
        self.unjournaled: list[tuple[Future, dict]] = []  # written (or being written), not yet journaled
        self.streams = threading.local()
        self.last_commit = time.monotonic()

    def run(self, todo: list[str]) -> None:
        # CPU: two solves at once, one BLAS thread each (LAPACK's tridiagonal reduction scales poorly
        # over threads). CUDA: one, on its own stream; transfers are asynchronous. Two eigensolvers at
        # once on one GPU run no faster in total (bench/RESULTS.md), so a second worker only adds contention.
        threads = torch.get_num_threads()
        if self.workers > 1 and self.device_type == "cpu":
            torch.set_num_threads(max(1, threads // self.workers))
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="surgeon-writer") as wpool, \
                    ThreadPoolExecutor(self.workers, thread_name_prefix="surgeon-solve") as spool:
                try:
                    self._loop(todo, wpool, spool)
                except BaseException:
                    # Ctrl-C or an error: keep what is already written, so that repeating the command
                    # resumes after it. A failed write makes the commit raise before it journals.
                    with contextlib.suppress(BaseException):
                        self._wait_pending()
                        self._commit_now()
                    raise
        finally:
            torch.set_num_threads(threads)

    def _loop(self, todo: list[str], wpool, spool) -> None:
        job = self.job
        # digest: each tensor's content hash on the reader's hash thread, beside the solve of the one before
        stream = job.ckpt.stream(todo, prefetch=job.opts.prefetch, pin=self.device_type == "cuda", digest=True)
        while True:
            with self.clock("wait_read"):
                item = next(stream, None)
            if item is None:
                break
            info, tensor = item
            digest = job.ckpt.digests.pop(info.name, None)
            calib = job.calib.fetch(info.name) if job.calib is not None else None  # main loop: the collector is not thread-safe
            self.solving.append((info, spool.submit(self._process, info, tensor, digest, calib)))
            if len(self.solving) > self.workers:
                self._drain_one(wpool)
            if time.monotonic() - self.last_commit >= job.opts.commit_seconds:
                self._commit_async(wpool)
            self.dist.check_peers()  # another rank failed: stop (what is committed stays done)
        while self.solving:
            self._drain_one(wpool)
        with self.clock("wait_commit"):
            self._wait_pending()
            self._commit_now()

    def _drain_one(self, wpool) -> None:
        info, fut = self.solving.popleft()
        with self.clock("wait_solve"):
            record, outputs = fut.result()
        if self.job.calib is not None:
            self.job.calib.release(info.name)  # solved: its covariance may go
        with self.clock("wait_write"):
            while len(self.pending) >= 4:
                self.pending.popleft().result()
        write = wpool.submit(write_all, outputs, self.clock)
        self.pending.append(write)
        self.unjournaled.append((write, record))
        self.reporter.advance(info.name, info.nbytes)
        faults.point("tensor")

    def _commit_async(self, wpool) -> None:
        """A resume point: on the writer thread, after every write queued so far."""
        batch, self.unjournaled = self.unjournaled, []
        self.pending.append(wpool.submit(self._sync_and_journal, batch))
        self.last_commit = time.monotonic()

    def _commit_now(self) -> None:
        batch, self.unjournaled = self.unjournaled, []
        self._sync_and_journal(batch)

    def _sync_and_journal(self, batch: list[tuple[Future, dict]]) -> None:
        """fsync, then journal the batch's tensors, but none if any of their writes failed (the
        executor runs this even after an earlier write raised: a failed tensor must never be "done")."""
        with self.clock("commit_busy"):
            self.work.journal.commit_after(batch, self.w.all)

    def _wait_pending(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    # --- on the solve threads -----------------------------------------------------------------
    def _process(self, info, tensor, digest: str | None, calib=None) -> tuple[dict, list]:
        stream = contextlib.nullcontext()
        if self.device_type == "cuda":  # each solve thread works on a stream of its own
            if not hasattr(self.streams, "s"):
                self.streams.s = torch.cuda.Stream(self.job.backend.device)
            stream = torch.cuda.stream(self.streams.s)
        if digest is None:  # a source that hashes nothing while it reads
            with self.clock("hash_busy"):
                digest = tensor_hash(tensor)
        with stream, self.clock("solver_busy"):
            record, outputs = self._outputs(info, tensor, calib)
        record["hash"] = digest
        return record, outputs

    def _outputs(self, info, tensor, calib=None) -> tuple[dict, list]:
        """(journal record, [(writer, name, tensor)]) of one input tensor."""
        job, w = self.job, self.w
        record: dict = {"name": info.name}
        target = job.targets.get(info.name)
        out_dt = job.out_dtype(info.dtype)
        if target is None:
            cast = tensor.to(torch_dtype(out_dt))
            if out_dt != info.dtype and (why := cast_overflow(info.name, tensor, cast)):
                raise NumericsError(f"{why}; {DTYPE_FIX}")
            return record, [(w.base, info.name, cast)]
        record["layer"], outs = split_one(target, tensor, job, out_dt, self.clock, calib)
        residual = outs.pop("__residual__")  # a tensor, or {name: tensor} of a quantized weight's group
        outputs = [(w.base, n, t) for n, t in (residual.items() if isinstance(residual, dict) else [(info.name, residual)])]
        if job.opts.spectra:
            outputs.append((w.spectra, target.module, outs.pop("__spectrum__")))
        for fname, f in outs.items():
            key = factor_key(job.method.lora_shaped, target.module, fname)
            fused = target.place is not None and target.place.fused  # the adapter's fused pair is assembled at the finish
            outputs += [(w.init, key, f)] if fused else [(w.factors, key, f), (w.init, key, f)]
        return record, outputs


def split_one(target, stored: torch.Tensor, job, out_dtype: str, clock: StageClock, calib=None) -> tuple[dict, dict]:
    """Decompose one targeted weight and apply the method: (layer record, {name: tensor}).
    calib: --calibrate's (covariance, tokens) of this weight (surgeon/engine/calibrate.py), or why it has none."""
    t0 = time.perf_counter()
    backend, opts, method = job.backend, job.opts, job.method
    cfg = dataclasses.replace(job.layer(target.module), module=target.module)  # its own rank/alpha (--rank-pattern)
    faults.slow()
    w64 = stored.to(backend.device, non_blocking=True).double()
    w64 = w64.mT if target.transposed else w64  # (out, in)
    with clock("decompose"):
        try:
            spectrum = opts.spectra or method.needs_spectrum
            crec = None
            if isinstance(calib, tuple):
                trip, crec = calibrate.solve(w64, calib, job, cfg, spectrum)
            else:
                trip = decompose(w64, cfg.rank, method.which, backend, tol=opts.tol, solver=opts.solver, spectrum=spectrum)
        except NumericsError as e:  # name the tensor: a damaged checkpoint is fixed one tensor at a time
            raise NumericsError(f"{target.tensor}: {e}") from e
    qstats: dict = {}
    with clock("method"):
        res = method.split(w64, trip, cfg)
        if job.qspec is not None:  # quant hook: 4-bit codes of the residual, LoftQ alternation (surgeon/quant.py)
            def solve(m64):
                return decompose(m64, cfg.rank, method.which, backend, tol=opts.tol, solver=opts.solver, spectrum=False)
            res, residual, qstats = quant.quantized_split(w64, res, method, cfg, job.qspec, solve, target.tensor, quant.qdtype_name(out_dtype))
        else:
            residual = res.residual.to(torch_dtype(out_dtype))  # (out, in), cast once
            if why := cast_overflow(target.tensor, res.residual, residual):  # e.g. a weight of 1e5 as float16
                raise NumericsError(f"{why} in its residual; {DTYPE_FIX}")
        for fname, f in res.factors.items():
            if not bool(torch.isfinite(f).all()):
                raise NumericsError(f"{target.tensor}: its factor {fname} holds non-finite values; lower --alpha or --rank for this module.")
    err, cast_err = _errors(w64, res, residual, trip, method, cfg, qstats, job.qspec is not None)
    layer = _layer_record(target, cfg, trip, res, qstats, err, cast_err, method, opts.spectra, t0)
    if crec is not None:
        layer["calibration"] = calibrate.layer_record(crec, w64, res, calib[0])
    elif isinstance(calib, str):  # the collector has no covariance for it: decomposed as without --calibrate
        layer["calibration"] = {"skipped": calib}
    if job.qspec is not None:  # bitsandbytes codes always quantize the (out, in) orientation
        outs = {"__residual__": residual}
    else:
        outs = {"__residual__": (residual.mT if target.transposed else residual).contiguous()}
    if opts.spectra:
        outs["__spectrum__"] = trip.spectrum
    outs.update(res.factors)
    # to the host in the order of this thread's stream, so the writer never reads a tensor that
    # is still being computed
    with clock("to_host"):
        if w64.is_cuda:
            return layer, {k: ({n: HostCopy(t) for n, t in v.items()} if isinstance(v, dict) else HostCopy(v)) for k, v in outs.items()}
        return layer, outs


def _errors(w64, res, residual, trip, method, cfg, qstats: dict, quantized: bool) -> tuple[float, float | None]:
    """(reconstruction error, cast error), relative to ‖W‖_F.

    What a reader of the files reconstructs is cast residual + s·(stored factors). The method formed
    the float64 residual from the stored (rounded) factors, W = res64 + s·BA exactly, so
    ‖W − (cast(res) + s·BA)‖ = ‖res64 − cast(res)‖: no product needed to measure it. Quantized:
    deq(codes) + s·BA, measured in quant.quantized_split. A truncating method (KaSA) drops part of W
    on purpose: its error is measured against the ORIGINAL W, with the initial factors, so the
    summary shows what the truncation removed."""
    norm = max(trip.energy**0.5, 1e-300)  # energy = ‖W‖_F²
    cast_err = None if quantized else float(torch.linalg.matrix_norm(res.residual - residual.double())) / norm
    if quantized:
        return qstats["quant_error"], cast_err
    if method.truncates:
        init = {k: v.to(w64.device) for k, v in res.factors.items()}
        return float(torch.linalg.matrix_norm(w64 - residual.double() - method.delta(init, cfg))) / norm, cast_err  # (out, in)
    return cast_err, cast_err


def _layer_record(target, cfg, trip, res, qstats: dict, err: float, cast_err: float | None, method, spectra: bool, t0: float) -> dict:
    """The manifest's record of one split layer."""
    total = trip.energy
    return {
        "module": target.module,
        "tensor": target.tensor,
        "shape": [target.out_features, target.in_features],
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scale": cfg.scale,
        "transposed": target.transposed,
        "solver": trip.solver,
        "subspace_bound": trip.subspace_bound,
        "orth_error": trip.orth_error,
        "reconstruction_error": err,
        **({"target_error": cast_err} if method.truncates and cast_err is not None else {}),
        "factor_energy": float(trip.S.square().sum()) / total if total > 0 else 0.0,
        "sigma_max": float(trip.spectrum[0]) if spectra else None,
        "sigma_min": float(trip.spectrum[-1]) if spectra else None,
        "factor_sigma": [float(trip.S[0]), float(trip.S[-1])],
        "seconds": round(time.perf_counter() - t0, 4),  # run-dependent: goes to the run log, not the manifest
        **res.stats,
        **qstats,
        **({"fused": {"param": target.place.param, "expert": target.place.expert, "part": target.place.part,
                      "parts": target.place.parts}} if target.place is not None and target.place.fused else {}),
    }
