"""The minor side of calibrated-like weights: gram-eigh, qr-inverse and the float64 SVD, timed and
compared (CPU or CUDA, the same code).

    python bench/bench_inverse_route.py --device cuda                      # 7B shapes: 4096², 11008×4096, 4096×11008
    python bench/bench_inverse_route.py --device cpu --shapes 576x1536 4096x4096

Each weight is W·C̃ as `--calibrate-mode kpm` forms it: W Gaussian (out, in)/√in, C̃ an input
covariance with a log-spaced spectrum over --decades decades and 4 massive-activation channels
(×30), which makes W·C̃ span ~9-10 decades, past the Gram routes. Prints one line per weight and
route: seconds (after one warm-up on CUDA), the route's own Wedin bound, sin θ of both sides and the
largest |Δσ|/σ₁ against the float64 SVD. `--solver qr-inverse` first runs gram-eigh and starts from
its vectors, so its seconds are what `auto` now pays on such a weight; before the route, auto paid
gram-eigh + svd. The point: the Gram route fails its check on these
weights; qr-inverse passes it with the SVD's accuracy at a fraction of its time.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def weight(out: int, n: int, decades: float, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(out * 7 + n)
    w = torch.randn(out, n, dtype=torch.float64, generator=g) / math.sqrt(n)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    c = (q * torch.logspace(0, -decades, n, dtype=torch.float64)) @ q.mT
    idx = torch.randperm(n, generator=g)[:4]
    c[idx, :] *= 30
    c[:, idx] *= 30
    return (w @ c).to(device)


def sin_theta(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b @ (b.mT @ a), ord=2))


def timed(f, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = f()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--decades", type=float, default=4.0)
    args = ap.parse_args()
    from surgeon.linalg import decompose, get_backend

    device = torch.device(args.device)
    be = get_backend(device)
    if device.type == "cuda":  # warm-up: the first cuSOLVER calls load kernels
        decompose(weight(256, 256, args.decades, device), 4, "minor", be, solver="qr-inverse", spectrum=False)
        decompose(weight(256, 256, args.decades, device), 4, "minor", be, solver="svd", spectrum=False)
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, rank {args.rank}, "
          f"C̃ over {args.decades:g} decades + 4 massive channels")
    for shape in args.shapes:
        out, n = (int(x) for x in shape.split("x"))
        m = weight(out, n, args.decades, device)
        ref, t_svd = timed(lambda: decompose(m, args.rank, "minor", be, solver="svd", spectrum=False), device)
        span = float(ref.spectrum[0] / ref.spectrum[-1]) if ref.spectrum[-1] > 0 else math.inf
        print(f"{out}x{n}: σ₁/σ_min {span:.1e}")
        for solver in ("gram-eigh", "qr-inverse", "svd"):
            t, sec = (ref, t_svd) if solver == "svd" else timed(lambda: decompose(m, args.rank, "minor", be, solver=solver, spectrum=False), device)
            ok = t.subspace_bound <= 1e-6 and t.orth_error <= 1e-6
            err = max(sin_theta(ref.U, t.U), sin_theta(ref.Vh.mT, t.Vh.mT))
            ds = float((t.S - ref.S).abs().max() / ref.spectrum[0])
            print(f"  {solver:10s} route {t.solver:10s} {sec:8.3f} s  bound {t.subspace_bound:.1e} {'pass' if ok else 'FAIL'}  "
                  f"sin θ vs SVD {err:.1e}  |Δσ|/σ₁ {ds:.1e}")


if __name__ == "__main__":
    main()
