"""Peak host memory of one calibrated solve (issue 24), in a fresh process: what surgeon.linalg.calibrated
adds above its inputs for a weight (OUT, IN) with a singular (regularised) covariance.

    python bench/bench_calibrated_memory.py 3072 1024 kpm      # IN OUT MODE
    # kpm 3072 1024 extra peak MiB 192 n^2 float64 MiB 72 True gram-eigh

A 7B down_proj has IN = 11008: one (in, in) float64 buffer is 0.97 GB, so each buffer the solve holds
at once costs that much on the device (GPU) or the host (CPU).
"""
import resource, sys, torch
from surgeon.linalg import get_backend
from surgeon.linalg.calibrated import calibrated
n, m, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
w = torch.randn(m, n, generator=g, dtype=torch.float64)
x = torch.randn(n // 2, n, generator=g, dtype=torch.float64)  # rank n/2: regularised
cov = x.mT @ x
del x
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, rec = calibrated(w, cov, n // 2, 8, mode, get_backend(torch.device("cpu"), "torch"), solver="gram-eigh")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(mode, n, m, "extra peak MiB", round((peak - base) / 1024), "n^2 float64 MiB", round(n * n * 8 / 2**20), rec["regularised"], rec["solver"])
