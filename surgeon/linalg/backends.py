"""Dense symmetric eigensolver and SVD backends: torch (CPU or CUDA) and CuPy (CUDA).

A backend only runs `eigh` and `svd` on float64 torch tensors that already sit on its device;
everything around them (Gram products, checks) is plain torch, so the CPU path runs the same
code as the GPU one. CuPy arrays are exchanged with torch through DLPack (no copy).
"""

from __future__ import annotations

import torch

from surgeon.errors import UsageError


class Backend:
    name = "base"

    def __init__(self, device: torch.device):
        self.device = device

    def eigh(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ascending (k,), eigenvectors as columns (k, k)."""
        raise NotImplementedError

    def svd(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD: U (m, k), S (k,) descending, Vh (k, n)."""
        raise NotImplementedError

    def eigvalsh(self, g: torch.Tensor) -> torch.Tensor:
        """Eigenvalues ascending (k,), no vectors (the tridiagonal reduction and its values only)."""
        return self.eigh(g)[0]

    def eigh_range(self, g: torch.Tensor, lo: int, hi: int, all_values: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Eigenpairs lo..hi-1 (ascending order) of symmetric g: (every eigenvalue or None, values (hi-lo,), vectors (k, hi-lo)).

        The default computes all pairs and slices; a backend with a subset solver overrides it.
        """
        lam, vecs = self.eigh(g)
        return lam, lam[lo:hi], vecs[:, lo:hi]

    def warmup(self) -> None:
        """Run each solver (and the subspace route's Cholesky, solves, QR) once on this thread: torch loads its CUDA linear-algebra libraries
        lazily, and that first load is not safe from several threads at once."""
        x = torch.eye(2, dtype=torch.float64, device=self.device)
        self.eigh(x)
        self.svd(x)
        l, _ = torch.linalg.cholesky_ex(x)  # the subspace route's factorizations and solves
        torch.cholesky_solve(x, l)
        torch.linalg.solve_triangular(l, x, upper=False, left=False)
        torch.linalg.qr(x)
        self.synchronize()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        return f"{self.name}:{self.device}"


class TorchBackend(Backend):
    name = "torch"

    def eigh(self, g):
        return torch.linalg.eigh(g)

    def eigvalsh(self, g):
        return torch.linalg.eigvalsh(g)

    def svd(self, w):
        # gesvd is the accurate cuSOLVER driver; CPU LAPACK ignores the argument
        driver = "gesvd" if w.is_cuda else None
        return torch.linalg.svd(w, full_matrices=False, driver=driver)


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, device: torch.device):
        super().__init__(device)
        import cupy  # noqa: PLC0415 - optional extra

        self.cp = cupy

    def _in(self, t):
        return self.cp.from_dlpack(t.contiguous())

    def _out(self, a):
        return torch.from_dlpack(a)

    def eigh(self, g):
        with self.cp.cuda.Device(self.device.index or 0):
            w, v = self.cp.linalg.eigh(self._in(g))
            return self._out(w), self._out(v)

    def eigvalsh(self, g):
        with self.cp.cuda.Device(self.device.index or 0):
            return self._out(self.cp.linalg.eigvalsh(self._in(g)))

    def svd(self, w):
        with self.cp.cuda.Device(self.device.index or 0):
            u, s, vh = self.cp.linalg.svd(self._in(w), full_matrices=False)
            return self._out(u), self._out(s), self._out(vh)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu (or auto).")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a device torch knows; use auto, cpu or cuda[:N].") from e


def get_backend(device: str | torch.device = "auto", name: str = "auto") -> Backend:
    dev = resolve_device(device) if isinstance(device, str) else device
    if name == "auto":
        name = "torch"
    if name == "torch":
        return TorchBackend(dev)
    if name == "cupy":
        if dev.type != "cuda":
            raise UsageError("--backend cupy needs a CUDA device; use --backend torch on the CPU.")
        try:
            return CupyBackend(dev)
        except ImportError as e:
            raise UsageError("--backend cupy needs CuPy: pip install 'surgeon[cuda]' (or cupy-cuda13x).") from e
    raise UsageError(f"unknown backend {name!r}; choose auto, torch or cupy (CUDA).")
