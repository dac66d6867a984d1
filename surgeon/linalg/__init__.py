"""The only place that decomposes matrices. Never opens a file, knows no method.

    from surgeon.linalg import decompose, get_backend
    t = decompose(W, rank=8, which="minor", backend=get_backend("cpu"))
"""

from surgeon.linalg.backends import Backend, get_backend
from surgeon.linalg.decompose import Triplets, decompose

__all__ = ["Backend", "Triplets", "decompose", "get_backend"]
