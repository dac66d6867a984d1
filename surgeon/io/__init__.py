"""Checkpoint I/O: reading safetensors shards one tensor at a time, writing planned shards.

Knows nothing about methods or linear algebra.
"""

from surgeon.io.dtypes import DTYPES, dtype_name, torch_dtype
from surgeon.io.reader import Checkpoint, TensorInfo
from surgeon.io.writer import Journal, OutTensor, ShardSetWriter, plan_shards

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
