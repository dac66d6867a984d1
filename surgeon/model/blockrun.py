"""The model run one decoder block at a time, weights streamed from the checkpoint (the GPTQ / AWQ /
llm-compressor "catcher" scheme), with transformers' own modules: nothing model-specific is written here.

    run = BlockRunner(config, ckpt, device)
    hidden, kwargs = run.capture(batches)          # what every block receives (embeddings freed again)
    with run.block(i):                             # block i materialised on `device`, back on meta after
        out = run.layers[i](hidden[b], **kwargs[i][b])
    logits = run.finish(batches, hidden)            # the model's own forward after the blocks (norm, head)

1. The skeleton (surgeon.model.skeleton) is built on the meta device; checkpoint keys are mapped to
   loaded parameters by transformers' own conversion rules (surgeon.model.names), fused MoE experts
   stacked as `from_pretrained` stacks them.
2. capture: every block of the decoder list is replaced by a catcher that records the positional and
   keyword inputs it is called with (attention mask, position embeddings, ... per block: Gemma 3's
   sliding and full layers get different masks) and passes its input on; the last one raises to stop
   the forward before the final norm and head. Every module the forward calls before the blocks
   (embeddings, rotary embedding, multimodal wrappers) is materialised on first call by a pre-hook,
   and put back on the meta device after.
3. block(i): the block's checkpoint tensors read ahead in file order (Checkpoint.stream), its
   parameters put on `device` (bf16/f16 as float32 on the CPU), its buffers (rotary tables, scales) computed by the model's own `_init_weights`, as
   `from_pretrained` computes buffers a checkpoint lacks.
4. finish: every block replaced by the states the last block returned, the model's forward runs what
   comes after the blocks (final norm, head, logit softcapping) with transformers' own code.

Modules added to the skeleton after it was built (a split's runtime modules, surgeon/runtime/streamed.py)
are neither materialised nor freed: their tensors are their own.

Host memory: one block's tensors at a time (plus the reader's read-ahead); device memory: one block
plus what the caller keeps (hidden states).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections import defaultdict

import torch
from torch import nn
from transformers import PreTrainedModel

from surgeon.errors import SurgeonError, UsageError
from surgeon.format.dtypes import DTYPES
from surgeon.model.names import map_keys
from surgeon.model.skeleton import build_skeleton

HALF = (torch.bfloat16, torch.float16)
CALIBRATION = ("calibration", "split without --calibrate")  # (what runs the blocks, the way around a failure): for the errors


class _Stop(Exception):
    """Raised by the last catcher: the blocks' inputs are recorded, the rest of the forward is not needed."""


def decoder_blocks(model: nn.Module, fallback: str = CALIBRATION[1]) -> tuple[str, nn.ModuleList]:
    """(name, list) of the repeated blocks the text forward runs: the longest ModuleList of modules of
    one class inside the model's decoder (get_decoder(): the language model of a multimodal model)."""
    try:
        root = model.get_decoder()
    except Exception:  # transformers raises for models without a decoder rule
        root = model
    root = root if isinstance(root, nn.Module) else model
    prefix = next((n for n, m in model.named_modules() if m is root), "")
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(c) for c in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (f"{prefix}.{name}".strip("."), mod)
    if best is None:
        raise UsageError(f"{type(model).__name__} has no list of repeated blocks to run block by block; {fallback}.")
    return best


def _owners(model: nn.Module) -> dict[int, PreTrainedModel]:
    """id(module) -> the innermost PreTrainedModel holding it (whose _init_weights knows its buffers)."""
    out: dict[int, PreTrainedModel] = {}

    def walk(m: nn.Module, owner: PreTrainedModel) -> None:
        owner = m if isinstance(m, PreTrainedModel) else owner
        out[id(m)] = owner
        for c in m.children():
            walk(c, owner)

    walk(model, model)
    return out


class BlockRunner:
    """The skeleton of `config` with one block (or the pre-block modules) materialised at a time."""

    def __init__(self, config: dict, ckpt, device: torch.device, purpose: tuple[str, str] = CALIBRATION):
        self.what, self.fallback = purpose  # for the errors: "calibration", "split without --calibrate"
        model, why = build_skeleton(config)
        if model is None:
            raise UsageError(f"{self.what} runs the model as transformers builds it, and {why}; {self.fallback}.")
        self.model = model.eval()
        self.ckpt, self.device = ckpt, torch.device(device)
        self._host: dict[str, torch.Tensor] = {}  # the block's checkpoint tensors, read ahead
        self.places: dict[str, list] = defaultdict(list)  # loaded parameter -> the checkpoint places filling it
        for p in map_keys(model, list(ckpt.tensors)).places.values():
            self.places[p.param].append(p)
        self.ties = self._ties()
        self.prefix, self.layers = decoder_blocks(model, self.fallback)
        self.changes_between_blocks = False  # known after capture
        self._owner = _owners(model)
        self._names = {id(m): n for n, m in model.named_modules()}

    def _ties(self) -> dict[str, str]:
        try:
            ties = self.model.get_expanded_tied_weights_keys(all_submodels=True)
        except Exception:  # older or custom models: no tie table
            return {}
        return {k: v for k, v in ties.items() if isinstance(k, str) and isinstance(v, str)}

    def streamable(self) -> bool:
        """Every tensor the checkpoint fills is one surgeon loads as transformers does (none converted)."""
        return not any(p.converted for places in self.places.values() for p in places)

    def _groups(self) -> tuple[dict[int, list], list]:
        """The checkpoint places each block materialises (by index), and those outside the blocks (a tied
        head repeats its source's: a second copy)."""
        blocks: dict[int, list] = defaultdict(list)
        outside: list = []
        head = self.prefix + "."
        for param, places in self.places.items():
            index = param[len(head):].split(".", 1)[0] if param.startswith(head) else ""
            (blocks[int(index)] if index.isdigit() else outside).extend(places)
        for tied, source in self.ties.items():
            if tied not in self.places and source in self.places:
                outside.extend(self.places[source])
        return blocks, outside

    def working_numel(self) -> int:
        """The most checkpoint values materialised at once: the largest block plus every module outside
        the blocks (embeddings, final norm, head), which are read again for the forward after the blocks."""
        blocks, outside = self._groups()
        size = lambda places: sum(self.ckpt.tensors[p.key].numel for p in places)  # noqa: E731
        return max(map(size, blocks.values()), default=0) + size(outside)

    def working_bytes(self, itemsize: int = 4) -> int:
        """Host bytes at the peak, materialising at `itemsize` bytes a value: the largest block (its values,
        its read-ahead in the checkpoint's dtype, the stacking buffer of fused experts) plus the modules
        outside the blocks and the largest of their reads."""
        blocks, outside = self._groups()
        info = lambda p: self.ckpt.tensors[p.key]  # noqa: E731

        def block(places) -> int:
            return sum(itemsize * info(p).numel + info(p).nbytes * (2 if p.fused else 1) for p in places)

        return (max(map(block, blocks.values()), default=0) + sum(itemsize * info(p).numel for p in outside)
                + max((info(p).nbytes for p in outside), default=0))

    def eager_experts(self) -> None:
        """transformers' eager experts forward (one F.linear per routed expert) instead of grouped_mm."""
        try:
            self.model.set_experts_implementation("eager")
        except (AttributeError, ValueError, RuntimeError):  # a model without switchable experts: left as built
            pass

    def block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    # ------------------------------------------------------------------ materialise / free

    def _tensor(self, param: str, like: torch.Tensor) -> torch.Tensor:
        places = self.places.get(param) or self.places.get(self.ties.get(param, ""))
        if not places:
            raise SurgeonError(f"{self.what} needs {param}, which the checkpoint does not hold; {self.fallback}.")
        if any(p.converted for p in places):
            raise UsageError(f"{self.what} cannot load {param}: transformers converts its checkpoint tensor in a way surgeon does not "
                             f"reproduce; {self.fallback}.")
        if len(places) == 1 and not places[0].fused:
            t = self._read(places[0].key)
        else:  # fused MoE experts: stacked along dim 0, parts concatenated along dim 1, as from_pretrained does
            first = self.ckpt.tensors[places[0].key]
            t = torch.zeros(places[0].shape, dtype=self._dtype_of(first.dtype))
            for p in places:
                t[p.slot] = self._read(p.key)  # (out, in)
        if tuple(t.shape) != tuple(like.shape):
            raise SurgeonError(f"{self.what}: {param} is {tuple(t.shape)} in the checkpoint, {tuple(like.shape)} in the model.")
        half_on_cpu = self.device.type == "cpu" and t.dtype in HALF  # CPU kernels: float32 compute
        return t.to(self.device, torch.float32 if half_on_cpu else t.dtype)

    def _read(self, key: str) -> torch.Tensor:
        """A checkpoint tensor: from the block's read-ahead when there, else one positioned read."""
        t = self._host.pop(key, None)
        return t if t is not None else self.ckpt.read(key)

    @staticmethod
    def _dtype_of(name: str) -> torch.dtype:
        return DTYPES[name][0]

    def materialise(self, module: nn.Module) -> None:
        """`module`'s own parameters from the checkpoint and its buffers by its model's _init_weights."""
        name = self._names.get(id(module))
        if name is None:  # a module added to the skeleton after it was built (a split's runtime): its tensors are its own
            return
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            for k, b in module._buffers.items():
                if b is not None:
                    module._buffers[k] = torch.empty_like(b, device=self.device)
            with torch.no_grad():
                self._owner[id(module)]._init_weights(module)
            for k, b in module._buffers.items():  # a persistent buffer the checkpoint holds: its stored value
                full = f"{name}.{k}".strip(".")
                if b is not None and full in self.places:
                    module._buffers[k] = self._tensor(full, b)
        for k, p in module._parameters.items():
            if p is not None and p.is_meta:
                full = f"{name}.{k}".strip(".")
                module._parameters[k] = nn.Parameter(self._tensor(full, p), requires_grad=False)

    @staticmethod
    def free(module: nn.Module) -> None:
        """`module`'s own tensors back on the meta device."""
        module.to_empty(device="meta", recurse=False)

    @contextlib.contextmanager
    def block(self, i: int):
        """Block i materialised on the device for the duration."""
        mods = list(self.layers[i].modules())
        head = self.block_name(i) + "."
        keys = [p.key for name, places in self.places.items() if name.startswith(head) for p in places]
        try:
            for info, t in self.ckpt.stream(sorted(keys, key=lambda k: (str(self.ckpt.tensors[k].file), self.ckpt.tensors[k].offset)),
                                            pin=self.device.type == "cuda"):
                self._host[info.name] = t
            for m in mods:
                self.materialise(m)
            yield self.layers[i]
        finally:
            self._host.clear()
            for m in mods:
                if id(m) in self._names:  # the skeleton's own modules only: an added module keeps its tensors
                    self.free(m)
            release_host_memory()

    # ------------------------------------------------------------------ capture

    def capture(self, batches: list[dict]) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """(hidden states entering block 0 per batch, [block][batch] keyword inputs of every block);
        batches: the model's forward inputs ({"input_ids", "attention_mask"}) per batch."""
        n = len(self.layers)
        hidden: list[torch.Tensor] = []
        kwargs: list[list[dict]] = [[] for _ in range(n)]
        passed = {"out": None, "changed": False}  # what the last catcher returned; whether the model altered it on the way
        with self._outside_blocks(lambda i, real: _Catcher(real, i, i == n - 1, hidden, kwargs[i], passed)):
            for b in batches:
                with torch.no_grad(), contextlib.suppress(_Stop), failing(self.model, "before its first block", (self.what, self.fallback)):
                    self.model(**{k: v.to(self.device) for k, v in b.items()}, use_cache=False)
        if len(hidden) != len(batches) or any(len(k) != len(batches) for k in kwargs):
            raise SurgeonError(f"{self.what}: the forward of {type(self.model).__name__} did not reach every block; {self.fallback}.")
        self.changes_between_blocks = passed["changed"]  # the model's code between blocks is not run block by block
        return hidden, kwargs

    def finish(self, batches: list[dict], hidden: list[torch.Tensor], tuples: bool = False) -> list[torch.Tensor]:
        """The logits per batch: the model's own forward with every block replaced by the hidden states the
        last block returned (hidden[b]), so what comes after the blocks (final norm, head, softcapping) is
        transformers' code. tuples: the blocks return tuples (their output's first element is the states)."""
        out: list[torch.Tensor] = []
        current: list[torch.Tensor] = []
        with self._outside_blocks(lambda i, real: _Replay(real, i, current, tuples)):
            for b, batch in enumerate(batches):
                current[:] = [hidden[b]]
                with torch.no_grad(), failing(self.model, "after its last block", (self.what, self.fallback)):
                    out.append(self.model(**{k: v.to(self.device) for k, v in batch.items()}, use_cache=False).logits)
        return out

    @contextlib.contextmanager
    def _outside_blocks(self, stand_in):
        """Every block replaced by stand_in(i, block) and every module outside the blocks materialised on
        its first call, for the duration; the blocks put back and those modules freed after."""
        real = list(self.layers)
        made: list[nn.Module] = []
        inside = {id(m) for layer in real for m in layer.modules()}
        hooks = [m.register_forward_pre_hook(self._on_first_call(made)) for m in self.model.modules() if id(m) not in inside]
        try:
            for i in range(len(real)):
                self.layers[i] = stand_in(i, real[i])
            yield
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
            for h in hooks:
                h.remove()
            for m in made:
                self.free(m)

    def _on_first_call(self, made: list):
        def hook(module, args):
            if id(module) in self._names and any(t is not None and t.is_meta for t in [*module._parameters.values(), *module._buffers.values()]):
                made.append(module)  # first: freed again even when materialising fails halfway
                self.materialise(module)
        return hook


@contextlib.contextmanager
def failing(model: nn.Module, where: str, purpose: tuple[str, str] = CALIBRATION):
    """Any error of transformers' forward (a model this scheme cannot run) as one SurgeonError line."""
    try:
        yield
    except (_Stop, SurgeonError, KeyboardInterrupt):
        raise
    except Exception as e:  # torch and transformers raise many kinds
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise SurgeonError(f"{purpose[0]}: the forward of {type(model).__name__} {where} failed ({type(e).__name__}: {first}); "
                           f"{purpose[1]}; please report it with the model's config.json.") from None


@functools.cache
def _glibc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


def release_host_memory() -> None:
    """Hand the heap pages freed by a block back to the OS (glibc's malloc_trim). Without it glibc keeps
    them: measured on SmolLM2 on the CPU, the resident size grew by ~30 MiB a block (1.3 GiB after 30
    blocks, 0.45 GiB after a trim) though no tensor stayed alive."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


class _Catcher(nn.Module):
    """Stands in for block i during capture: records its inputs, passes the hidden states on."""

    def __init__(self, real: nn.Module, i: int, last: bool, hidden: list, kwargs: list, passed: dict | None = None):
        super().__init__()
        self.i, self.last, self.hidden, self.kwargs = i, last, hidden, kwargs
        self.passed = passed if passed is not None else {"out": None, "changed": False}
        object.__setattr__(self, "_real", real)  # not a submodule: its attributes only (attention_type, ...)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args, **kwargs):
        kw = dict(kwargs)
        x = args[0] if args else kw.pop("hidden_states")
        if isinstance(x, tuple):  # a block returning a tuple, passed on as-is by its model
            x = x[0]
        kw.update({f"__arg{j}": a for j, a in enumerate(args[1:], 1)})
        self.kwargs.append(kw)
        if self.i == 0:
            self.hidden.append(x)
        elif not _passed_on(self.passed["out"], x):  # the model changed the states between blocks
            self.passed["changed"] = True
        self.passed["out"] = x
        if self.last:
            raise _Stop
        return x


def _passed_on(sent: torch.Tensor | None, got: torch.Tensor) -> bool:
    """Whether the next block received what the last one returned: the same tensor, or its first element
    (a model that takes `outputs[0]` of blocks returning tuples, as Falcon does, indexes the tensor the
    catcher returned in their place)."""
    if got is sent:
        return True
    return (isinstance(sent, torch.Tensor) and isinstance(got, torch.Tensor) and got.data_ptr() == sent.data_ptr()
            and tuple(got.shape) == tuple(sent.shape[1:]))


class _Replay(_Catcher):
    """Stands in for block i after the blocks ran: block 0 returns the states the last block returned
    (current[0]), every later one passes its input on."""

    def __init__(self, real: nn.Module, i: int, current: list, tuples: bool):
        super().__init__(real, i, False, [], [])
        self.current, self.tuples = current, tuples

    def forward(self, *args, **kwargs):
        x = self.current[0] if self.i == 0 else (args[0] if args else kwargs["hidden_states"])
        if isinstance(x, tuple):
            x = x[0]
        return (x,) if self.tuples else x


def call_block(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """block(x, **kw) with recorded positional inputs restored; the hidden states it returns."""
    return run_block(block, x, kw)[0]


def run_block(block: nn.Module, x: torch.Tensor, kw: dict) -> tuple[torch.Tensor, bool]:
    """(the hidden states block(x, **kw) returns, whether it returned them inside a tuple)."""
    pos = [kw[k] for k in sorted((k for k in kw if k.startswith("__arg")), key=lambda k: int(k[5:]))]
    named = {k: v for k, v in kw.items() if not k.startswith("__arg")}
    out = block(x, *pos, **named)
    return (out[0], True) if isinstance(out, (tuple, list)) else (out, False)
