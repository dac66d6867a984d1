"""GPU solver probe: which float64 route gives the r minor/principal triplets of a 4096-wide weight fastest.

    python bench/gpu_solver_probe.py            # on a CUDA machine; prints a table, writes $OUT/probe.json

Times (median of repeats, synchronized) for one 4096x4096 and one 11008x4096 weight with a
3-decade log spectrum: Gram GEMM; eigh (cuSOLVER / MAGMA via torch, CuPy); eigvalsh; two eighs on
two streams; block inverse subspace iteration on the Cholesky factor (bottom r) with oversampling;
fp64 SVD. Each route's minor-subspace error vs the float64 SVD is printed next to its time.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

dev = torch.device("cuda")
R = 64


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def weight(m, n, decades=3.0, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, device=dev, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, device=dev, dtype=torch.float64, generator=g))
    s = torch.logspace(0, -decades, k, device=dev, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def sub_err(q_ref, q):
    return float(torch.linalg.matrix_norm(q - q_ref @ (q_ref.T @ q), 2))


def inverse_subspace(g, r, p=64, iters=30):
    """Bottom-r eigenvectors of SPD g by block inverse iteration on its Cholesky factor."""
    L = torch.linalg.cholesky(g)
    x = torch.randn(g.shape[0], r + p, device=dev, dtype=g.dtype)
    x, _ = torch.linalg.qr(x)
    for _ in range(iters):
        x = torch.cholesky_solve(x, L)
        x, _ = torch.linalg.qr(x)
    h = x.T @ g @ x
    lam, z = torch.linalg.eigh(h)
    return lam[:r], x @ z[:, :r]


def main():
    rows = []
    for m, n in [(4096, 4096), (11008, 4096)]:
        w = weight(m, n)
        w64 = w.double()
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        vref = vh[-R:].T
        t, g = timed(lambda: w64.T @ w64)
        rows.append((f"{m}x{n}", "gram f64", t, None))
        for lib in ["cusolver", "magma"]:
            try:
                torch.backends.cuda.preferred_linalg_library(lib)
                t, (lam, vec) = timed(lambda: torch.linalg.eigh(g))
                rows.append((f"{m}x{n}", f"eigh torch/{lib}", t, sub_err(vref, vec[:, :R])))
                t, _ = timed(lambda: torch.linalg.eigvalsh(g))
                rows.append((f"{m}x{n}", f"eigvalsh torch/{lib}", t, None))
            except Exception as e:  # noqa: BLE001
                rows.append((f"{m}x{n}", f"eigh torch/{lib} FAILED {e}", 0, None))
        torch.backends.cuda.preferred_linalg_library("default")
        try:
            import cupy as cp

            gc = cp.from_dlpack(g)
            t, (lam, vec) = timed(lambda: cp.linalg.eigh(gc))
            rows.append((f"{m}x{n}", "eigh cupy", t, sub_err(vref, torch.from_dlpack(vec)[:, :R])))
        except Exception as e:  # noqa: BLE001
            rows.append((f"{m}x{n}", f"eigh cupy FAILED {e}", 0, None))
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        g2 = g.clone()

        def two_streams():
            with torch.cuda.stream(s1):
                a = torch.linalg.eigh(g)
            with torch.cuda.stream(s2):
                b = torch.linalg.eigh(g2)
            return a, b

        t, _ = timed(two_streams)
        rows.append((f"{m}x{n}", "2 eighs on 2 streams (total)", t, None))
        gb = torch.stack([g, g2])
        t, _ = timed(lambda: torch.linalg.eigh(gb))
        rows.append((f"{m}x{n}", "batched eigh of 2 (total)", t, None))
        for iters in (10, 30, 60):
            try:
                t, (lam, vec) = timed(lambda: inverse_subspace(g, R, 64, iters))
                rows.append((f"{m}x{n}", f"inverse subspace it={iters}", t, sub_err(vref, vec)))
            except Exception as e:  # noqa: BLE001
                rows.append((f"{m}x{n}", f"inverse subspace FAILED {e}", 0, None))
        t, _ = timed(lambda: torch.linalg.svd(w64, full_matrices=False, driver="gesvd"), reps=2)
        rows.append((f"{m}x{n}", "svd f64 gesvd", t, None))
        t, _ = timed(lambda: torch.linalg.svd(w, full_matrices=False, driver="gesvd"), reps=2)
        rows.append((f"{m}x{n}", "svd f32 gesvd (PEFT-like)", t, None))
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'shape':>11} {'route':<36} {'seconds':>9} {'minor err':>10}")
    for shape, name, t, err in rows:
        print(f"{shape:>11} {name:<36} {t:9.4f} {'' if err is None else f'{err:10.1e}'}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    main()
