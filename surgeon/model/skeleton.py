"""The model skeleton: transformers' model class built from config.json on the meta device (no
weights, no memory), the same class `from_pretrained` would build for the folder.

The class is config.json's first `architectures` entry when transformers has it, else
AutoModelForCausalLM, else AutoModel. A config transformers cannot build (no or unknown
model_type, custom code) has no skeleton: `build_skeleton` returns (None, why).
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
import transformers
from torch import nn


def model_class(config: dict):
    """The transformers class `from_pretrained` builds for this config (architectures[0]), or None."""
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return None


def context_length(config: dict) -> int | None:
    """The most positions the model embeds (config.json's max_position_embeddings, GPT-2's n_positions /
    n_ctx, a multimodal model's text_config's), or None when the config does not say."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for cfg in (config, text):
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None


def not_causal_lm(config: dict) -> str | None:
    """Why next-token predictions of this model are not its own forward's output, or None: an
    encoder-decoder (T5, BART, Whisper: its forward needs decoder inputs) or a class that cannot
    generate (BERT's encoder, a masked LM). None too when transformers does not know the class."""
    cls = model_class(config)
    name = cls.__name__ if cls is not None else str((config.get("architectures") or ["this model"])[0])
    if config.get("is_encoder_decoder"):
        return f"{name} is an encoder-decoder"
    if cls is not None and hasattr(cls, "can_generate") and not cls.can_generate():
        return f"{name} has no causal language-model head"
    return None


def _config(config: dict):
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        return None
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(model_type, **fields)


def build_skeleton(config: dict) -> tuple[nn.Module | None, str]:
    """(model on the meta device, "") or (None, why transformers cannot build it)."""
    try:
        conf = _config(config)
    except Exception as e:  # transformers raises many kinds on a config it cannot read
        return None, f"transformers cannot read config.json ({type(e).__name__}: {str(e)[:120]})"
    if conf is None:
        return None, f"config.json's model_type {config.get('model_type')!r} is not one transformers knows"
    cls = model_class(config)
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
            if cls is not None:
                return cls._from_config(conf), ""
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                with contextlib.suppress(ValueError, KeyError):
                    return auto.from_config(conf), ""
    except Exception as e:
        return None, f"transformers cannot build {config.get('model_type')} from config.json ({type(e).__name__}: {str(e)[:120]})"
    finally:
        quiet.setLevel(level)
    return None, f"no transformers model class for {config.get('model_type')!r}"
