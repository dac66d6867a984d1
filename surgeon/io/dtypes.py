"""The safetensors dtype names and their torch equivalents."""

import torch

# safetensors name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), 1)

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

_BY_TORCH = {v[0]: k for k, v in DTYPES.items()}

# user-facing names accepted by --dtype
USER_DTYPES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16", "float64": "F64"}
CONFIG_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name][0]


def dtype_name(dtype: torch.dtype) -> str:
    return _BY_TORCH[dtype]


def itemsize(name: str) -> int:
    return DTYPES[name][1]
