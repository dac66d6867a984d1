"""Which tensors are linear weights to rewrite.

`all-linear` follows PEFT's meaning: every linear layer inside the repeated transformer blocks,
never embeddings, norms or the output head. PEFT's all-linear (tuners_utils.py,
`_maybe_include_all_linear_layers`) takes every nn.Linear/Conv1D except the output embedding, so
on a CLIP-style dual encoder (CLIPModel has no output embedding) it also takes the two projection
heads into the shared space, `text_projection` and `visual_projection`: so does surgeon (HEADS).
The patch embedding is a Conv2d (4-D) and never a target. Otherwise the targets are module names matched as
PEFT matches `target_modules` (exact name, or a `.name` suffix), or one regular expression
full-matched against module names (anything that is not a plain dotted name is taken as one).

GPT-2-style checkpoints store their linear layers as Conv1D, weight (in, out): those are marked
`transposed` and decomposed as their transpose.

With the model skeleton (surgeon/model: the class transformers builds from config.json, on the meta
device, and every checkpoint key mapped to its loaded parameter by transformers' own rules), the
targets are resolved on the LOADED module names, which are the names PEFT sees: `all-linear` is
exactly PEFT's `_maybe_include_all_linear_layers` on that model (every nn.Linear/Conv1D but the
output head: OPT's project_in/out, BERT's pooler and Llava's projector too), names and regular
expressions match loaded module names, and Target.module is the loaded name while Target.tensor
stays the checkpoint key (the residual keeps the checkpoint's names; transformers renames them on
load as it does the input's). Without a skeleton (a config transformers cannot build) the
checkpoint's own names are used, as below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from surgeon.errors import UsageError
from surgeon.format.dtypes import FLOAT_DTYPES
from surgeon.format.reader import TensorInfo
from surgeon.model import targets as loaded
from surgeon.model.patterns import UserRegex

BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")
EXCLUDE = re.compile(r"(embed|wte|wpe|lm_head|norm|ln_|layernorm|rotary|score|relative_attention_bias)", re.IGNORECASE)
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)$")
HEADS = re.compile(r"(^|\.)(text_projection|visual_projection)$")  # linear layers outside the blocks that PEFT takes
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class Target:
    tensor: str  # "model.layers.0.self_attn.q_proj.weight"
    module: str  # "model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int
    transposed: bool  # stored (in, out), GPT-2 Conv1D
    place: object = None  # surgeon.model.Place: where transformers loads it (None without a skeleton)


def _is_linear_weight(info: TensorInfo) -> bool:
    return info.name.endswith(".weight") and len(info.shape) == 2


def select_targets(tensors: dict[str, TensorInfo], spec: list[str] | None, model_type: str | None = None, names=None) -> dict[str, Target]:
    """Map tensor name -> Target for every tensor the spec selects, in checkpoint order; `names`
    (a surgeon.model.NameMap) resolves the spec on the loaded model's module names."""
    spec = list(spec or ["all-linear"])
    _check_spec(spec)
    if names is not None:
        return {n: Target(n, m, o, i, tr, place) for n, (m, o, i, tr, place) in loaded.loaded_targets(tensors, spec, names).items()}
    conv1d = (model_type or "") in CONV1D_MODEL_TYPES
    linear = {n: i for n, i in tensors.items() if _is_linear_weight(i)}

    if spec == ["all-linear"]:
        chosen = [
            n for n in linear
            if (BLOCK.search(n) and not EXCLUDE.search(n[: -len(".weight")].rsplit(".", 1)[-1])) or HEADS.search(n[: -len(".weight")])
        ]
    elif len(spec) == 1 and not PLAIN_NAME.match(spec[0]):
        try:
            rx = UserRegex(spec[0], "--target")  # matched under a time bound (surgeon/patterns.py)
        except re.error as e:
            raise UsageError(f"--target {spec[0]!r} is not a valid regular expression ({e}).") from e
        chosen = [n for n in linear if rx.fullmatch(n[: -len(".weight")])]
    else:
        chosen = [n for n in linear if any(_matches(n[: -len(".weight")], s) for s in spec)]

    if not chosen:
        sample = ", ".join(list(n[: -len(".weight")] for n in linear)[:5]) or "none"
        raise UsageError(
            f"no linear weight matches --target {' '.join(spec)}; module names in this checkpoint look like: {sample}."
        )
    out: dict[str, Target] = {}
    for n in chosen:
        info = linear[n]
        module = n[: -len(".weight")]
        transposed = conv1d and bool(CONV1D_NAMES.search(module))
        rows, cols = info.shape
        out_f, in_f = (cols, rows) if transposed else (rows, cols)
        out[n] = Target(n, module, out_f, in_f, transposed)
    return out


def _check_spec(spec: list[str]) -> None:
    if len(spec) == 1 and not PLAIN_NAME.match(spec[0]):
        try:
            re.compile(spec[0])
        except re.error as e:
            raise UsageError(f"--target {spec[0]!r} is not a valid regular expression ({e}).") from e
    elif "all-linear" in spec and spec != ["all-linear"]:
        raise UsageError("--target all-linear cannot be combined with module names.")


def _matches(module: str, pattern: str) -> bool:
    return module == pattern or module.endswith("." + pattern)


def block_of(module: str) -> str | None:
    """The repeated transformer block a module sits in ("model.layers.3.mlp.up_proj" -> "model.layers.3")."""
    m = BLOCK.search(module)
    return module[: m.end() - 1] if m else None


def group_by_block(targets: dict[str, Target]) -> dict[str, list[str]]:
    """block name -> its targeted modules, in checkpoint order; refuses targets outside any block."""
    blocks: dict[str, list[str]] = {}
    for t in targets.values():
        b = block_of(t.module)
        if b is None:
            raise UsageError(f"{t.module} is not inside a repeated transformer block (layers.N / h.N / blocks.N); "
                             "this method routes per block: exclude it with --target.")
        blocks.setdefault(b, []).append(t.module)
    return blocks


def check_targets(tensors: dict[str, TensorInfo], targets: dict[str, Target], rank: int, ranks: dict[str, int] | None = None) -> None:
    """Refuse targets that cannot be split at this rank (or their own, `ranks`: module -> rank) or in this dtype, naming them."""
    for name, t in targets.items():
        rank_t = (ranks or {}).get(t.module, rank)
        dt = tensors[name].dtype
        if dt not in FLOAT_DTYPES:
            raise UsageError(
                f"{name} is stored as {dt} (a quantized or integer format); surgeon splits float weights only. "
                "Dequantize the checkpoint first, or exclude it with --target."
            )
        k = min(t.out_features, t.in_features)
        if k == 0:
            raise UsageError(f"{name} is empty ({t.out_features}x{t.in_features}): there is nothing to split; exclude {t.module} with --target.")
        if rank_t >= k:
            what = f"--rank {rank_t}" if rank_t == rank else f"rank {rank_t} (from --rank-pattern)"
            raise UsageError(f"{what} is not below min(out, in) = {k} of {t.module} ({t.out_features}x{t.in_features}); choose a rank below {k}.")
    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}.")


def keep_dense(targets: dict[str, Target], rank: int, ranks: dict[str, int] | None = None) -> tuple[dict[str, Target], dict[str, str]]:
    """For --target all-linear: (targets, {module: why}) with every layer whose smaller side is not
    above the rank left dense (a MoE router: experts × hidden), rather than refusing the split. A
    rank the user gave the layer (--rank-pattern) is still checked by check_targets."""
    kept, dense = {}, {}
    for name, t in targets.items():
        r = (ranks or {}).get(t.module, rank)
        if min(t.out_features, t.in_features) == 0:
            kept[name] = t  # an empty weight is no router: check_targets names it
        elif r == rank and min(t.out_features, t.in_features) <= r:
            dense[t.module] = f"{t.out_features}x{t.in_features} is not above rank {r}"
        else:
            kept[name] = t
    return kept, dense


def peft_target_modules(tensors: dict[str, TensorInfo], targets: dict[str, Target], names=None) -> list[str]:
    """The shortest PEFT target_modules list that selects exactly `targets`.

    Last name components ("q_proj") when every linear module with that ending is targeted, else
    full module names (PEFT matches a full name only to itself). With the skeleton (`names`), on
    the loaded model's module names.
    """
    if names is not None:
        return loaded.peft_target_modules(names, {t.module for t in targets.values()})
    modules = {t.module for t in targets.values()}
    all_linear = {n[: -len(".weight")] for n, i in tensors.items() if _is_linear_weight(i)}
    by_leaf: dict[str, set[str]] = {}
    for m in all_linear:
        by_leaf.setdefault(m.rsplit(".", 1)[-1], set()).add(m)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if all(by_leaf[leaf] <= modules for leaf in leaves):
        return leaves
    return sorted(modules)
