"""Where a per-block method routes (the mixture's routers): the blocks of the stack the prompt runs
through, and the width of the hidden states entering them.

    targets, hidden = routed_targets(targets, names, model_cfg, explicit=False)

A router pools the hidden states entering its block over the prompt's positions, so it belongs to the
blocks that see the prompt's tokens: the text decoder of a multimodal model (Gemma 3, Llava, Qwen2-VL:
`model.language_model.layers.N`, width text_config.hidden_size), not its vision tower, whose blocks see
image patches. Under all-linear the other blocks' layers are left out; named with --target they are
refused. An encoder-decoder (T5, BART, Whisper) is refused: its decoder's blocks see the answer being
written, not the prompt, and its encoder's are not where generation's steps run.

The blocks and their width come from the skeleton (surgeon.model.blockrun.decoder_blocks, the decoder's
config); without one (a config transformers cannot build) every repeated block is routed, at the width
config.json gives.
"""

from __future__ import annotations

from surgeon.errors import UsageError
from surgeon.model.blockrun import decoder_blocks
from surgeon.model.selection import block_of

OTHER_METHODS = "milora, pissa, kasa or nusa"


def routed_targets(targets: dict, names, model_cfg: dict, explicit: bool) -> tuple[dict, int]:
    """(the targets inside the routed blocks, the hidden width entering those blocks)."""
    if model_cfg.get("is_encoder_decoder"):
        raise UsageError(f"--method moe routes each block on the prompt, and {model_cfg.get('model_type', 'this model')} is an "
                         f"encoder-decoder, whose decoder blocks never see the prompt's tokens; split it with {OTHER_METHODS}.")
    if names is None:
        return {n: t for n, t in targets.items() if block_of(t.module) is not None} or targets, config_hidden(model_cfg)
    prefix, _ = decoder_blocks(names.model, f"split it with {OTHER_METHODS}")
    inside = {n: t for n, t in targets.items() if (block_of(t.module) or "").rpartition(".")[0] == prefix}
    outside = [t.module for n, t in targets.items() if n not in inside]
    if outside and explicit:
        raise UsageError(f"{outside[0]} is outside {prefix}.N, the blocks the prompt's tokens run through, where --method moe routes "
                         f"({len(outside)} such target(s)); leave it out of --target.")
    if not inside:
        raise UsageError(f"no targeted layer lies in {prefix}.N, the blocks where --method moe routes; target layers there.")
    return inside, skeleton_hidden(names.model) or config_hidden(model_cfg)


def skeleton_hidden(model) -> int | None:
    """The hidden width of the model's decoder (its config's hidden_size: d_model, n_embd, ... by attribute map)."""
    try:
        root = model.get_decoder()
    except Exception:  # transformers raises for models without a decoder rule (encoders)
        root = model
    value = getattr(getattr(root, "config", None), "hidden_size", None)
    return value if isinstance(value, int) else None


def config_hidden(model_cfg: dict) -> int:
    """config.json's hidden width (a multimodal model's text_config's)."""
    for cfg in (model_cfg, model_cfg.get("text_config") if isinstance(model_cfg.get("text_config"), dict) else {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    raise UsageError("config.json gives no hidden size (hidden_size / n_embd / d_model), which this method's per-block "
                     "tensors need; pass --config with a complete config.json.")
