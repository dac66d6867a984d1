"""A 4-bit split as a live model without transformers' bitsandbytes loader.

    sm = surgeon.runtime.load_split("q-split")     # a --quantize split: QuantLinear bases, factors on top

transformers 5.x + bitsandbytes 0.50.2 on CPU give wrong logits for a pre-quantized 4-bit folder (see
README, "4-bit residuals"), and bitsandbytes' CPU Linear4bit fails on weights whose input size is not a
multiple of the blocksize. So the runtime builds the model from its config (no weight initialisation),
replaces each quantized linear by a `QuantLinear` holding the serialized codes as buffers, and loads
every other tensor from the residual shards itself. QuantLinear computes y = x · deq(Q)ᵀ + b with
bitsandbytes.functional.dequantize_4bit, on CPU and CUDA alike: exactly the weights bitsandbytes'
Linear4bit uses. During training only the codes are kept for backward (the dequantized weight is formed
again there, as bitsandbytes' MatMul4Bit does), so activation memory does not grow by full-precision
weights. On CUDA transformers' own loader works as well (`from_pretrained(split)` + PEFT).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SplitDirError
from surgeon.format import quant
from surgeon.model.names import map_keys
from surgeon.model.slots import module_slot


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x deq(W)ᵀ + b; backward gives only ∂/∂x = g · deq(W) (the codes and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return nn.functional.linear(x, layer.dequantized().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized().to(grad.dtype), None, None  # (..., out) @ (out, in)


class QuantLinear(nn.Module):
    """A frozen bitsandbytes 4-bit linear layer (codes + quant state as buffers)."""

    def __init__(self, weight_name: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        st = quant.quant_state(weight_name, tensors)
        self.register_buffer("weight", tensors[weight_name].contiguous())  # uint8 (numel/2, 1)
        self.register_buffer("absmax", st.absmax)
        self.register_buffer("quant_map", st.code)
        self.out_features, self.in_features = (int(d) for d in st.shape)
        self.blocksize, self.quant_type, self.qdtype = st.blocksize, st.quant_type, st.dtype
        self.nested = st.nested
        if st.nested:
            self.register_buffer("nested_absmax", st.state2.absmax)
            self.register_buffer("nested_quant_map", st.state2.code)
            self.register_buffer("nested_offset", torch.as_tensor(st.offset, dtype=torch.float32))
            self.nested_blocksize, self.nested_dtype = st.state2.blocksize, st.state2.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def quant_state(self):
        from bitsandbytes.functional import QuantState

        state2 = QuantState(self.nested_absmax, code=self.nested_quant_map, blocksize=self.nested_blocksize, dtype=self.nested_dtype) if self.nested else None
        return QuantState(self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.quant_map, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.qdtype, offset=self.nested_offset if self.nested else None, state2=state2)

    def dequantized(self) -> torch.Tensor:
        """(out, in) in the quantization dtype."""
        return quant.require_bnb().dequantize_4bit(self.weight, self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Dequant4bitLinear.apply(x, self, bias)
        return nn.functional.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, blocksize={self.blocksize}"


def _no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()  # slower (weights initialised, then overwritten), same result
    return no_init_weights()


def load_quantized_model(path: Path, manifest: dict, ckpt, dtype: torch.dtype = torch.float32, model_cls=None) -> nn.Module:
    """The residual model of a --quantize split: its config without quantization_config, every
    quantized layer a QuantLinear, every other tensor read from the shards (`ckpt`, a Checkpoint)."""
    import transformers

    conf = json.loads((Path(path) / "config.json").read_text())
    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if model_cls is None:
        arch = (conf.get("architectures") or ["AutoModelForCausalLM"])[0]
        model_cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
    with _no_init():  # parameters are allocated, never initialised: all of them are loaded below
        build = model_cls.from_config if hasattr(model_cls, "from_config") else model_cls._from_config
        model = build(config, dtype=dtype)
    model.tie_weights()  # transformers 5 ties inside init_weights, which no_init_weights skips
    spec = quant.QuantSpec(**{k: manifest["quantization"][k] for k in ("quant_type", "blocksize", "double_quant")})
    grouped: set[str] = set()
    for module, lay in manifest["layers"].items():
        weight = lay.get("tensor", f"{module}.weight")  # the checkpoint key (the module is the loaded name)
        names = quant.group_names(weight, spec)
        parent, child, old = module_slot(model, module, path)
        bias_key = weight[: -len(".weight")] + ".bias"
        bias = ckpt.read(bias_key) if bias_key in ckpt else None
        setattr(parent, child, QuantLinear(weight, {n: ckpt.read(n) for n in names}, bias))
        grouped.update(names)
        grouped.add(bias_key)
        del old
    _load_rest(model, ckpt, grouped, path)
    model.eval()
    return model


def _load_rest(model: nn.Module, ckpt, skip: set[str], path: Path) -> None:
    """Every tensor but the quantized groups, put where `from_pretrained` puts it: checkpoint names are
    mapped to loaded parameters by transformers' own rules (surgeon.model.names: Gemma 3's and Llava's
    legacy prefixes, Mixtral's per-expert weights stacked into the fused expert parameters)."""
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    places = map_keys(model, [n for n in ckpt.tensors if n not in skip]).places
    loaded: set[int] = set()
    with torch.no_grad():
        for key, place in places.items():
            p = params.get(place.param)
            if p is None:
                continue  # a tensor the architecture does not use (transformers ignores those too)
            if place.converted:
                raise SplitDirError(f"{path}: transformers converts the residual tensor {key} in a way surgeon's 4-bit loader does not "
                                    "reproduce; load this split on CUDA with from_pretrained + PEFT.")
            t = ckpt.read(key)
            if place.fused:  # one expert matrix of a fused (E, parts·rows, in) parameter
                p[place.slot] = t.to(p.dtype)
            else:
                p.copy_(t.to(p.dtype))
            loaded.add(id(p))
    quantized = {id(t) for m in model.modules() if isinstance(m, QuantLinear) for t in (*m.buffers(), *m.parameters())}
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded and id(p) not in quantized]
    if missing:
        raise SplitDirError(f"{path}: the residual shards lack {len(missing)} tensor(s) of the model, e.g. {missing[0]}; the split is incomplete.")
