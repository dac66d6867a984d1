"""Checkpoint key → the parameter it becomes in the loaded model, through transformers' own rules.

transformers 5 renames checkpoint keys on load (`conversion_mapping.get_model_conversion_mapping`:
WeightRenaming, plus the base_model_prefix added or dropped) and fuses some of them
(WeightConverter: Mixtral's `experts.N.w1/w3` stacked into one 3-D `experts.gate_up_proj`
(E, 2I, H), `experts.N.w2` into `experts.down_proj` (E, H, I)). `core_model_loading.rename_source_key`
applies them; this module asks it, key by key, exactly as `from_pretrained` does, so no name table
is kept here. A fused key's Place says where its matrix sits in the fused parameter: expert index
(MergeModulelist stacks along dim 0) and part (Concatenate along dim 1, in source-pattern order).
A key transformers converts in any other way (Chunk, Transpose, ...) is `converted` and never split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)

from surgeon.model.skeleton import build_skeleton


@dataclass(frozen=True)
class Place:
    key: str  # checkpoint key: "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    param: str  # loaded parameter: "model.layers.0.mlp.experts.gate_up_proj"
    shape: tuple[int, ...]  # the loaded parameter's shape: (E, 2I, H)
    expert: int | None = None  # index along dim 0 of a fused 3-D parameter
    part: int = 0  # which fused source (w1 = 0, w3 = 1)
    parts: int = 1
    converted: bool = False  # transformers transforms the tensor in a way surgeon does not split

    @property
    def fused(self) -> bool:
        return self.expert is not None

    @property
    def slot(self) -> tuple[int, slice]:
        """Where a fused key's (out, in) matrix sits in its parameter: [expert, the rows of its part]."""
        rows = self.shape[1] // self.parts
        return self.expert, slice(self.part * rows, (self.part + 1) * rows)

    @property
    def module(self) -> str:
        """The module holding the parameter ("model.layers.0.mlp.experts")."""
        return self.param.rpartition(".")[0]


@dataclass
class NameMap:
    model: nn.Module  # the skeleton, on the meta device
    places: dict[str, Place]  # checkpoint key -> Place, for every key the loaded model takes
    unmapped: list[str]  # checkpoint keys the loaded model has no parameter for (transformers drops them)

    def module(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None


def _fused_place(key: str, renamed_key: str, param: str, shape, conv: WeightConverter, pattern: str) -> Place:
    ops = list(conv.operations)
    merge = [o for o in ops if isinstance(o, MergeModulelist)]
    concat = [o for o in ops if isinstance(o, Concatenate)]
    if len(ops) != len(merge) + len(concat) or len(merge) != 1 or merge[0].dim != 0 or any(c.dim != 1 for c in concat) or len(shape) != 3:
        return Place(key, param, shape, converted=True)
    rx = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(rx, renamed_key)
    if m is None or not m.groups():
        return Place(key, param, shape, converted=True)
    return Place(key, param, shape, expert=int(m.group(1)), part=conv.source_patterns.index(pattern), parts=len(conv.source_patterns))


def map_keys(model: nn.Module, keys) -> NameMap:
    """Place of every checkpoint key in `model`, as `from_pretrained` renames and fuses it."""
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    places, unmapped = {}, []
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:  # as transformers: the key may only need the prefix
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        if renamed not in meta:
            unmapped.append(key)
            continue
        shape = tuple(meta[renamed].shape)
        if pattern is None:
            places[key] = Place(key, renamed, shape)
        else:
            pre_converter = rename_source_key(key, renamings, [])[0]
            places[key] = _fused_place(key, pre_converter, renamed, shape, by_pattern[pattern], pattern)
    return NameMap(model, places, unmapped)


def load_names(config: dict, keys) -> tuple[NameMap | None, str]:
    """(NameMap, "") for a config transformers can build, else (None, why)."""
    model, why = build_skeleton(config)
    if model is None:
        return None, why
    return map_keys(model, list(keys)), ""
