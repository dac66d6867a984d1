"""The only place that decomposes matrices. Never opens a file, knows no method; imports only
surgeon.errors (and nothing above it in the layers).

    from surgeon.linalg import decompose, get_backend
    t = decompose(W, rank=8, which="minor", backend=get_backend("cpu"))
    s = singular_values(W.double(), get_backend("cpu"))   # every σ, descending (for spectra on demand)
    t, rec = calibrated(W, cov, tokens, rank=8, mode="kpm", backend=get_backend("cpu"))  # data-aware (CorDA/ASVD)
"""

from surgeon.linalg.backends import Backend, get_backend
from surgeon.linalg.calibrated import calibrated, output_share
from surgeon.linalg.decompose import Triplets, auto_route, decompose, singular_values

__all__ = ["Backend", "Triplets", "auto_route", "calibrated", "decompose", "get_backend", "output_share", "singular_values"]
