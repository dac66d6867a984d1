"""4-bit residuals (QLoRA/QPiSSA): bitsandbytes NF4/FP4 quantization in the pre-quantized format
transformers loads, and the LoftQ alternation that fits the factors to the quantization error.

    surgeon split --method pissa MODEL --rank 16 --quantize nf4 [--quantize-iters 4] --out q-split

Format. transformers' `Bnb4BitHfQuantizer` loads a pre-quantized checkpoint (a `quantization_config`
with quant_method "bitsandbytes" in config.json) by handing, per quantized Linear, the tensors
    <module>.weight                                   uint8 (⌈numel/2⌉, 1)  two 4-bit codes a byte
    <module>.weight.absmax                            float32 (blocks,)      (uint8 with double quant)
    <module>.weight.quant_map                         float32 (16,)          the NF4/FP4 code book
    <module>.weight.nested_absmax, .nested_quant_map  float32 (⌈blocks/256⌉,), (256,)  double quant only
    <module>.weight.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape, ...
to `bitsandbytes.nn.Params4bit.from_prequantized`, i.e. `QuantState.as_dict(packed=True)` under the
weight's name (bitsandbytes' Linear4bit._save_to_state_dict writes the same). Every byte of the output
is planned before any data exists (surgeon/io/writer.py), so the JSON tensor has a planned length: the
JSON is padded with spaces (json.loads ignores them); only double quant's float `nested_offset` varies
in length, and its room is the longest float repr. The codes quantize the (out, in) weight, also for
GPT-2's Conv1D (transformers transposes those before quantizing, and does not transpose on loading).

Defaults follow transformers' BitsAndBytesConfig: blocksize 64, no double quant, quant_storage uint8.
The compute dtype written to config.json is the residual's dtype (BitsAndBytesConfig's default is
float32; the residual's own dtype loses nothing and is what a bf16 model wants). Every linear weight of
the checkpoint that is not quantized, and `lm_head`, is listed in `llm_int8_skip_modules`, since
transformers otherwise converts every nn.Linear.

The alternation (PiSSA paper's QPiSSA, LoftQ's Algorithm 1), per weight W with F = s·B A:
    F₀ = principal r of W,  Q₀ = Q(W − F₀)                         (--quantize-iters 0: QPiSSA)
    for t = 1..N:  F_t = principal r of (W − deq(Q_{t−1})),  Q_t = Q(W − F_t)
the error of a pair is e = ‖W − (deq(Q) + F)‖_F/‖W‖_F, measured in float64 on what is written
(the float32 factors, the codes). e₀ pairs (Q₀, F₀), e_t pairs (Q_{t−1}, F_t) (LoftQ's pairing: F_t is
the best rank-r fit to what Q_{t−1} got wrong), and the pair with the smallest e is written; the
manifest keeps every e_t, the chosen t, and e of plain Q(W) for comparison. Only principal factors can
absorb quantization error: the iteration is refused for methods whose factors come from the minor part
(milora, kasa, nusa, moe), whose residual is quantized as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from surgeon.errors import NumericsError, UsageError
from surgeon.format.dtypes import dtype_name
from surgeon.format.writer import OutTensor

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes.functional.quantize_4bit's
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256 (double quant)
FLOAT_ROOM = 24  # the longest repr of a float64: "-2.2250738585072014e-308"
QDTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # what bnb quantizes


@dataclass(frozen=True)
class QuantSpec:
    quant_type: str = "nf4"
    blocksize: int = 64  # BitsAndBytesConfig / Params4bit default
    double_quant: bool = False  # BitsAndBytesConfig's bnb_4bit_use_double_quant default
    iters: int = 0  # LoftQ/QPiSSA alternations after the plain QPiSSA split

    def check(self, method) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise UsageError(f"--quantize {self.quant_type!r}: choose nf4 or fp4.")
        if self.blocksize not in BLOCKSIZES:
            raise UsageError(f"--quant-blocksize {self.blocksize}: choose one of {', '.join(map(str, BLOCKSIZES))} (default 64).")
        if self.iters < 0:
            raise UsageError(f"--quantize-iters {self.iters} must be 0 or more.")
        if self.iters and method.which != "principal":
            raise UsageError(
                f"--quantize-iters refits the factors to the quantization error, which only principal factors can absorb; "
                f"{method.name} takes its factors from the minor part of W. Use --method pissa, or drop --quantize-iters."
            )
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:  # importing it costs seconds (torch.compile): only look
            raise UsageError("--quantize needs bitsandbytes, which is not installed; install it with pip install 'surgeon[quant]'.")

    def record(self) -> dict:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant, "iters": self.iters}


def require_bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise UsageError(f"--quantize needs bitsandbytes ({e}); install it with pip install 'surgeon[quant]'.") from None
    return bnbf


def qdtype_name(stored: str) -> str:
    """The dtype a residual is quantized from (and dequantizes to): its own, float32 for float64."""
    return stored if stored in QDTYPES else "F32"


# --- the serialized tensors ------------------------------------------------------------------
def state_key(spec: QuantSpec) -> str:
    return f"quant_state.bitsandbytes__{spec.quant_type}"


def _meta(spec: QuantSpec, shape: tuple[int, int], qdtype: str, offset: float | None) -> dict:
    """The non-tensor part of QuantState.as_dict, in its key order."""
    meta = {"quant_type": spec.quant_type, "blocksize": spec.blocksize, "dtype": str(QDTYPES[qdtype]).removeprefix("torch."), "shape": list(shape)}
    if spec.double_quant:
        meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset}
    return meta


def _meta_len(spec: QuantSpec, shape: tuple[int, int], qdtype: str) -> int:
    text = json.dumps(_meta(spec, shape, qdtype, 0.0))
    return len(text) + (FLOAT_ROOM - len("0.0") if spec.double_quant else 0)


def plan(weight: str, shape: tuple[int, int], qdtype: str, spec: QuantSpec) -> list[OutTensor]:
    """The tensors that replace `weight` (an (out, in) linear weight), with exact shapes and dtypes."""
    numel = shape[0] * shape[1]
    blocks = math.ceil(numel / spec.blocksize)
    out = [OutTensor(weight, "U8", ((numel + 1) // 2, 1)), OutTensor(f"{weight}.absmax", "U8" if spec.double_quant else "F32", (blocks,)),
           OutTensor(f"{weight}.quant_map", "F32", (16,))]
    if spec.double_quant:
        out += [OutTensor(f"{weight}.nested_absmax", "F32", (math.ceil(blocks / NESTED_BLOCKSIZE),)),
                OutTensor(f"{weight}.nested_quant_map", "F32", (NESTED_BLOCKSIZE,))]
    return out + [OutTensor(f"{weight}.{state_key(spec)}", "U8", (_meta_len(spec, shape, qdtype),))]


def group_names(weight: str, spec: QuantSpec) -> list[str]:
    return [t.name for t in plan(weight, (1, 1), "F32", spec)]


def quantize(weight: str, w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The serialized tensors of Q(w), w (out, in) in its quantization dtype, on its device."""
    bnbf = require_bnb()
    packed, st = bnbf.quantize_4bit(w.contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type)
    qdtype = dtype_name(w.dtype)
    offset = float(st.offset.item()) if spec.double_quant else None
    text = json.dumps(_meta(spec, tuple(w.shape), qdtype, offset)).encode()
    room = _meta_len(spec, tuple(w.shape), qdtype)
    text += b" " * (room - len(text))  # planned length; json.loads skips the padding
    tensors = {weight: packed, f"{weight}.absmax": st.absmax, f"{weight}.quant_map": st.code}
    if spec.double_quant:
        tensors |= {f"{weight}.nested_absmax": st.state2.absmax, f"{weight}.nested_quant_map": st.state2.code}
    tensors[f"{weight}.{state_key(spec)}"] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    for t in plan(weight, tuple(w.shape), qdtype, spec):  # bitsandbytes changed its format: say so, not a writer error
        got = tensors[t.name]
        if tuple(got.shape) != t.shape or dtype_name(got.dtype) != t.dtype:
            raise NumericsError(f"{t.name}: bitsandbytes returned {dtype_name(got.dtype)}{list(got.shape)}, surgeon planned "
                                f"{t.dtype}{list(t.shape)}; this bitsandbytes version writes another format (use bitsandbytes==0.50.2).")
    return tensors


def quant_state(weight: str, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"):
    """bitsandbytes' QuantState from a serialized group (keys with or without the weight prefix)."""
    from bitsandbytes.functional import QuantState

    stats = {k.removeprefix(weight + "."): v for k, v in tensors.items() if k != weight}
    return QuantState.from_dict(stats, device=torch.device(device))


def dequantize(weight: str, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """(out, in) in the quantization dtype, exactly what bitsandbytes' Linear4bit computes with."""
    bnbf = require_bnb()
    return bnbf.dequantize_4bit(tensors[weight].to(device), quant_state(weight, tensors, device))


# --- the split of one weight, with the alternation -------------------------------------------
def quantized_split(w64: torch.Tensor, res, method, cfg, spec: QuantSpec, solve, weight: str, qdtype: str):
    """Quantize a method's residual (QPiSSA) and run the LoftQ alternation.

    w64 (out, in) float64; res the method's SplitResult of W; solve(M) -> Triplets of the method's
    kind for a float64 (out, in) matrix. Returns (SplitResult with the chosen factors, the serialized
    tensors of the chosen codes, per-layer stats)."""
    dt = QDTYPES[qdtype]
    norm = max(float(torch.linalg.matrix_norm(w64)), 1e-300)

    def codes(res64: torch.Tensor) -> tuple[dict, torch.Tensor]:
        q = quantize(weight, res64.to(dt), spec)
        return q, dequantize(weight, q, w64.device).double()  # (out, in)

    q, deq = codes(res.residual)
    errs = [float(torch.linalg.matrix_norm(w64 - deq - method.delta(res.factors, cfg))) / norm]
    best = (errs[0], 0, q, res)
    for t in range(1, spec.iters + 1):
        target = w64 - deq  # (out, in): what the codes got wrong, plus W's principal part
        fit = method.split(target, solve(target), cfg)  # F_t = principal r of W − deq(Q_{t−1})
        errs.append(float(torch.linalg.matrix_norm(fit.residual)) / norm)  # fit.residual = target − F_t
        if errs[-1] < best[0]:
            fit.residual = w64 - method.delta(fit.factors, cfg)  # the unquantized residual of F_t
            best = (errs[-1], t, q, fit)
        if t < spec.iters:
            q, deq = codes(w64 - method.delta(fit.factors, cfg))
    err, chosen, q, res = best
    _, plain = codes(w64)
    stats = {"quant_error": err, "quant_error_plain": float(torch.linalg.matrix_norm(w64 - plain)) / norm,
             "quant_error_iters": errs, "quant_iter": chosen}
    return res, q, stats


# --- config.json and the folder as a whole -----------------------------------------------------
def quantization_config(spec: QuantSpec, compute_dtype: str, skip: list[str]) -> dict:
    """config.json's `quantization_config`, as transformers' BitsAndBytesConfig.to_dict() writes it."""
    return {
        "quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": spec.quant_type, "bnb_4bit_use_double_quant": spec.double_quant,
        "bnb_4bit_compute_dtype": str(QDTYPES[compute_dtype]).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }


def skip_modules(tensors: dict, quantized: set[str]) -> list[str]:
    """Every 2-D `.weight` module of the checkpoint that is not quantized, and lm_head (often tied,
    so absent from the checkpoint): transformers would otherwise turn those into Linear4bit too."""
    mods = {n[: -len(".weight")] for n, i in tensors.items() if n.endswith(".weight") and len(i.shape) == 2}
    return sorted((mods - quantized) | {"lm_head"})


def base_plan(plan_list: list[OutTensor], quantized: dict[str, tuple[int, int]], qdtypes: dict[str, str], spec: QuantSpec) -> list[OutTensor]:
    """The residual checkpoint's plan with each quantized weight (tensor name -> (out, in)) replaced
    by its serialized group, in place."""
    out = []
    for t in plan_list:
        out += plan(t.name, quantized[t.name], qdtypes[t.name], spec) if t.name in quantized else [t]
    return out


def summary(spec: QuantSpec, qconf: dict, layers: dict[str, dict]) -> dict:
    """The manifest's "quantization": settings, and the per-layer errors summed up (does it help?)."""
    n = max(len(layers), 1)
    err = [lay["quant_error"] for lay in layers.values()]
    plain = [lay["quant_error_plain"] for lay in layers.values()]
    per_iter = [sum(lay["quant_error_iters"][t] for lay in layers.values()) / n for t in range(spec.iters + 1)]
    return {
        **spec.record(),
        "format": "bitsandbytes 4-bit, pre-quantized (transformers from_pretrained; Params4bit.from_prequantized)",
        "compute_dtype": qconf["bnb_4bit_compute_dtype"],
        "skip_modules": qconf["llm_int8_skip_modules"],
        "error": "||W - (deq(Q(W_res)) + s*B*A)||_F / ||W||_F per layer (quant_error); plain: ||W - deq(Q(W))||_F / ||W||_F",
        "mean_quant_error": sum(err) / n,
        "mean_quant_error_plain": sum(plain) / n,
        "worst_quant_error": max(err, default=0.0),
        "layers_better_than_plain": sum(e < p for e, p in zip(err, plain)),
        "mean_error_per_iter": per_iter,  # [QPiSSA, after 1 alternation, ...], every layer's error at that step
        "iterating_helps": bool(spec.iters) and min(per_iter) < per_iter[0],
    }


def spec_of(manifest: dict) -> QuantSpec:
    q = manifest["quantization"]
    return QuantSpec(q["quant_type"], q["blocksize"], q["double_quant"], q.get("iters", 0))


class DequantCheckpoint:
    """The residual shards of a --quantize split as plain float tensors (absorb --base residual): each
    quantized weight is read with its quant state and dequantized (in its stored orientation), the
    state tensors disappear; everything else passes through. Same interface as io.Checkpoint."""

    def __init__(self, ckpt, manifest: dict):
        from surgeon.format.reader import TensorInfo

        spec = spec_of(manifest)
        self.ckpt, self.groups, self.transposed = ckpt, {}, {}
        members = set()
        for module, lay in manifest["layers"].items():
            weight = lay.get("tensor", f"{module}.weight")  # the checkpoint key (the module is the loaded name)
            self.groups[weight] = group_names(weight, spec)
            self.transposed[weight] = lay["transposed"]
            members.update(self.groups[weight])
        self.tensors = {}
        for name, info in ckpt.tensors.items():
            if name in self.groups:
                meta = json.loads(bytes(ckpt.read(self.groups[name][-1]).numpy()).decode())
                out, inp = meta["shape"]
                shape = (inp, out) if self.transposed[name] else (out, inp)
                dt = dtype_name(getattr(torch, meta["dtype"]))
                self.tensors[name] = TensorInfo(name, dt, shape, info.file, info.offset, out * inp * QDTYPES[dt].itemsize)
            elif name not in members:
                self.tensors[name] = info

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        if name not in self.groups:
            return self.ckpt.read(name)
        w = dequantize(name, {n: self.ckpt.read(n) for n in self.groups[name]})  # (out, in)
        return (w.mT if self.transposed[name] else w).contiguous()

    def stream(self, names, prefetch: int = 2, pin: bool = False, digest: bool = False):
        if digest:  # absorb hashes only the original weights; a residual is never verified by hash
            raise ValueError("a dequantized residual has no recorded content hashes")
        for name in names:
            yield self.tensors[name], self.read(name)


def strip_config(path) -> None:
    """Drop quantization_config from a config.json (a dequantized folder is a plain float model)."""
    from surgeon.format.writer import write_json

    conf = json.loads(path.read_text())
    if conf.pop("quantization_config", None) is not None:
        write_json(path, conf)


def spec_from(opts, method) -> QuantSpec | None:
    """The checked 4-bit settings of --quantize, or None (the other quantization options refused without it)."""
    if opts.quantize is None:
        if opts.quantize_iters or opts.double_quant or opts.quant_blocksize != 64:
            raise UsageError("--quantize-iters, --double-quant and --quant-blocksize go with --quantize nf4|fp4; add it or drop them.")
        return None
    spec = QuantSpec(opts.quantize.lower(), opts.quant_blocksize, opts.double_quant, opts.quantize_iters)
    spec.check(method)
    return spec
