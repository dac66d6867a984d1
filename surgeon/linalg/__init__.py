"""The only place that decomposes matrices. Never opens a file, knows no method; imports only
surgeon.errors (and nothing above it in the layers).

    from surgeon.linalg import decompose, get_backend
    t = decompose(W, rank=8, which="minor", backend=get_backend("cpu"))
    s = singular_values(W.double(), get_backend("cpu"))   # every σ, descending (for spectra on demand)
"""

from surgeon.linalg.backends import Backend, get_backend
from surgeon.linalg.decompose import Triplets, auto_route, decompose, singular_values

__all__ = ["Backend", "Triplets", "auto_route", "decompose", "get_backend", "singular_values"]
