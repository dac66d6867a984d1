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


def cast_overflow(name: str, src: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why `out` (a cast of `src`, same shape) cannot be written: values finite in `src` that the cast
    made ±inf or NaN, named with the largest of them and the dtype's range; None when the cast lost
    nothing (values already non-finite in `src` are not the cast's doing)."""
    if not out.is_floating_point() or bool(torch.isfinite(out).all()):
        return None
    lost = torch.isfinite(src) & ~torch.isfinite(out)
    if not bool(lost.any()):
        return None
    big = float(src[lost].abs().max())
    kind = CONFIG_DTYPE.get(_BY_TORCH.get(out.dtype, ""), str(out.dtype))
    return f"{name}: a value of {big:.4g} does not fit {kind} (largest {torch.finfo(out.dtype).max:.5g})"
