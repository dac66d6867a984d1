"""The on-disk world, the lowest layer: safetensors reading (strict header validation, content hashes)
and writing (planned shards, fsync, journal), dtypes, the split-folder format (file names, factor keys,
manifest reading, the model card), the content listing of every output (.surgeon.files), the read
lock readers share with writers, source resolution (local folder, file or Hub snapshot), the 4-bit
residual format, the Hub's request deadlines and the folder checks before a push.

Imports only surgeon.errors and surgeon.version: it knows nothing of methods, linear algebra or models.
"""

from surgeon.format.dtypes import DTYPES, dtype_name, torch_dtype
from surgeon.format.reader import Checkpoint, TensorInfo
from surgeon.format.writer import Journal, OutTensor, ShardSetWriter, plan_shards

__all__ = [
    "DTYPES",
    "Checkpoint",
    "Journal",
    "OutTensor",
    "ShardSetWriter",
    "TensorInfo",
    "dtype_name",
    "plan_shards",
    "torch_dtype",
]
