"""GPU solver probe: syevd (Gram-eigh) against the subspace routes, minor and principal, in one go.

    python bench/gpu_solver_probe.py --out "$OUT" 2>&1 | tee "$OUT/probe.log"   # one H200, ≤ 90 s
    python bench/gpu_solver_probe.py --small --out /tmp/probe                    # CPU rehearsal (small shapes)

1. Building blocks at k = 4096 (so the cost model can be checked): fp64 GEMM with 128/256 columns,
   potrf, cholesky_solve (two trsm) with 128/256 right-hand sides, L⁻¹ by trsm, CholeskyQR2 and
   Householder QR of a 4096×128/256 block, eigh of 128/256/512 (Rayleigh–Ritz sizes) on the GPU
   and on the host, syevd and eigvalsh of 4096 (torch and CuPy).
2. For 4096×4096 and 11008×4096 fp64 weights with log spectra of 2, 3 and 4 decades and the
   bench_gpu_7b spectrum (20·10^(−2x)(1 − 0.95x²⁰)), r = 64: the float64 SVD reference (gesvd), then
   Gram + syevd; decompose() by gram-eigh, by the subspace route (minor and principal, raw) and by
   auto (the checked chain, spectrum off; timed only where it falls back); subspace_pairs variants
   (oversampling 64/192/448, G⁻¹ by solves or by an explicit L⁻¹, Rayleigh–Ritz eigh on the host). Each: time (CUDA events, one warm-up, min and median of
   3), sin θ of the right subspace against the SVD's, the check's bound, the route taken.
Every record is written to OUT/probe.json as soon as it exists; a failing measurement records its
error and the rest go on; work stops before --budget seconds (the most telling cases come first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgeon.linalg.subspace as sub  # noqa: E402
from surgeon.linalg import decompose, get_backend  # noqa: E402
from surgeon.linalg.decompose import _gram  # noqa: E402
from surgeon.linalg.subspace import orth, subspace_pairs  # noqa: E402

R = 64
F64 = torch.float64


class Probe:
    def __init__(self, out: Path, dev: torch.device, budget: float):
        self.out, self.dev, self.budget, self.t0 = out, dev, budget, time.perf_counter()
        self.records: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def time(self, fn, reps: int = 3, warm: bool = True):
        """(min ms, median ms, last result): one warm-up, then reps timed by CUDA events (CPU: clock)."""
        out = fn() if warm else None
        ts = []
        for _ in range(reps):
            self.sync()
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                out = fn()
                ts.append(1e3 * (time.perf_counter() - t))
        return min(ts), statistics.median(ts), out

    def record(self, **rec):
        """Run rec['fn'] (if any) under try/except, store the record, rewrite the JSON."""
        fn = rec.pop("fn", None)
        if fn is not None:
            try:
                rec.update(fn())
            except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
                rec["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
        rec["t_s"] = round(time.perf_counter() - self.t0, 1)
        self.records.append(rec)
        print(json.dumps(rec), flush=True)
        tmp = self.out / "probe.json.tmp"
        tmp.write_text(json.dumps(self.records, indent=1))
        tmp.replace(self.out / "probe.json")


def sin_theta(q_ref, q) -> float:
    return float(torch.linalg.matrix_norm(q - q_ref @ (q_ref.mT @ q), 2))


def spectrum(kind: str, k: int, dev) -> torch.Tensor:
    x = torch.linspace(0, 1, k, device=dev, dtype=F64)
    if kind == "bench7b":
        return 20 * 10 ** (-2 * x) * (1 - 0.95 * x**20)
    return 10 ** (-float(kind.removeprefix("log")) * x)  # log2, log3, log4


def components(p: Probe, k: int):
    g0 = torch.randn(k + 64, k, device=p.dev, dtype=F64)
    g = g0.mT @ g0  # (k, k) SPD
    l = torch.linalg.cholesky(g)
    bk = get_backend(p.dev, "torch")
    for b in (128, 256):
        x = torch.randn(k, b, device=p.dev, dtype=F64)
        p.record(what="gemm_GX", k=k, b=b, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: g @ x)[:2])))
        p.record(what="cholesky_solve", k=k, b=b, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.cholesky_solve(x, l))[:2])))
        p.record(what="cholqr2", k=k, b=b, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: orth(x))[:2])))
        p.record(what="householder_qr", k=k, b=b, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.linalg.qr(x).Q)[:2])))
    eye = torch.eye(k, device=p.dev, dtype=F64)
    p.record(what="potrf", k=k, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.linalg.cholesky_ex(g))[:2])))
    p.record(what="trsm_inverse_L", k=k, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.linalg.solve_triangular(l, eye, upper=False))[:2])))
    for b in (128, 256, 512):
        h = g[:b, :b].contiguous()
        p.record(what="eigh_small", k=b, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: bk.eigh(h))[:2])))
    for b in (128, 256, 512):
        h = g[:b, :b].cpu()
        p.record(what="eigh_small_host", k=b, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.linalg.eigh(h))[:2])))
    p.record(what="syevd_torch", k=k, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.linalg.eigh(g))[:2])))
    p.record(what="eigvalsh_torch", k=k, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: torch.linalg.eigvalsh(g))[:2])))
    if p.dev.type == "cuda":
        def cupy_eigh():
            import cupy as cp

            gc = cp.from_dlpack(g)
            return dict(zip(("min_ms", "med_ms"), p.time(lambda: cp.linalg.eigh(gc))[:2]), cupy=cp.__version__)
        p.record(what="syevd_cupy", k=k, fn=cupy_eigh)


def one_case(p: Probe, m: int, n: int, kind: str, bases: dict, full: bool):
    k = min(m, n)
    if (m, n) not in bases:
        gen = torch.Generator(device=p.dev).manual_seed(m)
        u, _ = torch.linalg.qr(torch.randn(m, k, device=p.dev, dtype=F64, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, k, device=p.dev, dtype=F64, generator=gen))
        bases[(m, n)] = (u, v)
    u, v = bases[(m, n)]
    w = (u * spectrum(kind, k, p.dev)) @ v.mT  # (m, n) float64
    case = {"shape": f"{m}x{n}", "spectrum": kind}
    ref = {}

    def svd_ref():
        ms, _, (uu, s, vh) = p.time(lambda: torch.linalg.svd(w, full_matrices=False, driver="gesvd" if w.is_cuda else None), reps=1, warm=False)
        ref["minor"], ref["principal"] = vh[-R:].mT, vh[:R].mT  # (n, r) right singular subspaces
        gap = {"minor": float(s[-R - 1] - s[-R]) / float(s[-R]), "principal": float(s[R - 1] - s[R]) / float(s[R - 1])}
        return {"svd_f64_ms": round(ms, 1), "sigma_range": [float(s[0]), float(s[-1])], "rel_gap_at_r": gap}
    p.record(what="reference", **case, fn=svd_ref)
    if not ref:
        return
    bk = get_backend(p.dev, "torch")
    p.record(what="gram", **case, fn=lambda: dict(zip(("min_ms", "med_ms"), p.time(lambda: _gram(w))[:2])))
    g, _ = _gram(w)

    def syevd():
        mn, md, (lam, vec) = p.time(lambda: torch.linalg.eigh(g))
        return {"min_ms": mn, "med_ms": md, "err_minor": sin_theta(ref["minor"], vec[:, :R]), "err_principal": sin_theta(ref["principal"], vec[:, -R:])}
    p.record(what="syevd", **case, fn=syevd)
    for which in ("minor", "principal"):
        passed = {}
        for solver in ("gram-eigh", "subspace", "auto"):
            if solver == "auto" and passed.get("subspace", True):
                continue  # auto = the subspace route, already timed; timed only where it falls back

            def run(which=which, solver=solver):
                reps, warm = (1, False) if solver == "auto" else (3, True)  # a fallback may end in a 2 s SVD
                mn, md, t = p.time(lambda: decompose(w, R, which, bk, solver=solver, spectrum=False), reps=reps, warm=warm)
                passed[solver] = t.subspace_bound <= 1e-6 and t.orth_error <= 1e-6
                return {"min_ms": mn, "med_ms": md, "route": t.solver, "bound": t.subspace_bound, "orth": t.orth_error,
                        "passes": passed[solver], "err": sin_theta(ref[which], t.Vh.mT)}
            p.record(what="decompose", which=which, solver=solver, **case, fn=run)
    if not full:
        return
    variants = [("minor", 64, "solve"), ("minor", 192, "solve"), ("minor", 64, "explicit"), ("minor", 192, "explicit"),
                ("principal", 64, "solve"), ("principal", 192, "solve"), ("principal", 448, "solve")]
    variants += [("minor", 64, "auto", "host"), ("principal", 64, "auto", "host")]
    for which, over, inv, *host in variants:
        def pairs(which=which, over=over, inv=inv, host=bool(host)):
            sub.RR_ON_HOST_MAX = 512 if host else 0  # Rayleigh–Ritz eigh on the host CPU
            try:
                mn, md, sp = p.time(lambda: subspace_pairs(g, R, which, bk, m_rows=m, oversample=over, inverse=inv))
            finally:
                sub.RR_ON_HOST_MAX = 0
            return {"min_ms": mn, "med_ms": md, "degree": sp.degree, "rounds": sp.rounds, "certified": sp.lam_next_bound is not None,
                    "err": sin_theta(ref[which], sp.vecs)}
        p.record(what="subspace_pairs", which=which, oversample=over, inverse=inv, rr_host=bool(host), **case, fn=pairs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true", help="CPU rehearsal: 512-wide shapes")
    ap.add_argument("--budget", type=float, default=70.0, help="seconds of work before the rest is skipped")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.small else "cuda")
    h, i = (512, 1376) if args.small else (4096, 11008)
    p = Probe(out, dev, args.budget)
    p.record(what="env", torch=torch.__version__, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", threads=torch.get_num_threads())
    components(p, h)
    bases: dict = {}
    plan = [((h, h), "log3", True), ((i, h), "log3", True), ((h, h), "bench7b", True), ((i, h), "bench7b", False),
            ((h, h), "log2", False), ((h, h), "log4", True), ((i, h), "log2", False), ((i, h), "log4", False)]
    for (m, n), kind, full in plan:
        if p.left() < 8:
            p.record(what="skipped", shape=f"{m}x{n}", spectrum=kind, reason="time budget")
            continue
        one_case(p, m, n, kind, bases, full)
    if dev.type == "cuda" and p.left() > 3:
        def cupy_route():
            bc = get_backend(dev, "cupy")
            u, v = bases[(h, h)]
            w = (u * spectrum("log3", h, dev)) @ v.mT
            mn, md, t = p.time(lambda: decompose(w, R, "minor", bc, solver="subspace", spectrum=False))
            return {"min_ms": mn, "med_ms": md, "route": t.solver, "bound": t.subspace_bound}
        p.record(what="decompose_cupy_backend", which="minor", solver="subspace", shape=f"{h}x{h}", spectrum="log3", fn=cupy_route)
    p.record(what="done", wall_s=round(time.perf_counter() - p.t0, 1))


if __name__ == "__main__":
    main()
