"""Tiny random checkpoints of many architectures, from transformers' own config classes (issue 22's matrix).

    from archmodels import ARCHS, Zoo
    src = Zoo(tmp).path("mixtral")            # built once, saved with save_pretrained (safetensors)
    ARCHS["mixtral"].auto                     # the Auto class that loads it: "AutoModelForCausalLM"
    inputs(ARCHS["mixtral"], config)          # the fixed forward inputs (ids, pixel_values, ...)

Every model: hidden 32, 2 layers, intermediate 64, 4 heads, vocab 320 (the byte-level BPE tokenizer of
fixtures/make_fixtures.py, saved beside every model so `surgeon train` can run on any of them). Weights
are re-drawn N(0, 0.2) (biases N(0, 0.1), norms left at their init) under a fixed seed, so the logits are
O(1) and a missing factor shows clearly. `TABLE` (below) is the one place that says per architecture:
the model class written, the Auto class a user loads it with, which inputs the forward needs, and the
tolerance (`rtol`, relative to the original's max |logit|).

Checkpoint names: transformers 5.25's save_pretrained writes Gemma 3 and Llava in the legacy Hub names
(`language_model.model.layers.N…`, `vision_tower.…`, `multi_modal_projector.…`, `language_model.lm_head…`,
as google/gemma-3-4b-it and llava-hf ship them), which it renames on load to `model.language_model.layers.N…`;
and MoE experts per expert (`experts.N.w1`), which it fuses on load. `gemma3-hub` and `llava-hub` are the
other Hub form: the same models with their keys already in the loaded module names.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
if str(FIXTURES) not in sys.path:  # make_fixtures.py (conftest.py adds it too)
    sys.path.insert(0, str(FIXTURES))
from make_fixtures import _tokenizer  # noqa: E402

V = 320  # vocabulary (the tokenizer of fixtures/make_fixtures.py has exactly 320 entries)
IMG, BOI, EOI, VSTART = V - 1, V - 2, V - 3, V - 4  # special ids of the multimodal models, inside the vocab
TEXT_HI = V - 8  # plain text ids are drawn from [3, TEXT_HI)
SEQ = 8
STD = 0.2
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)


@dataclass(frozen=True)
class Arch:
    name: str
    model_cls: str  # the transformers class that writes the checkpoint
    auto: str  # the Auto class a user loads it with
    inputs: str  # "text" | "seq2seq" | "whisper" | "gemma3" | "llava" | "qwen2_vl" (see `inputs`)
    config: object  # () -> PreTrainedConfig
    rename: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied to the saved keys
    family: str = "dense"  # dense | encoder | seq2seq | speech | moe | multimodal | hub-names
    dtype: torch.dtype = torch.float32  # the dtype the checkpoint is written in
    shard: str | None = None  # save_pretrained's max_shard_size (several shards + index)
    rtol: float = 1e-4  # max |Δ output| allowed, relative to the original's max |logit|

    def cfg(self):
        return self.config()


def _c(name: str, **kw):
    return lambda: getattr(transformers, name)(**kw)


def _dec(name: str, **extra):
    return _c(name, **{**DEC, **extra})


# save_pretrained writes these models in the legacy names (`language_model.model.layers.N…`, as google/gemma-3-4b-it
# and llava-hf ship them); checkpoints written in the loaded module names exist on the Hub too (this rewrite).
_LOADED_NAMES_VLM = ((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                     (r"^vision_tower\.", "model.vision_tower."), (r"^multi_modal_projector\.", "model.multi_modal_projector."))

_GEMMA3 = _c("Gemma3Config", text_config=dict(**{**DEC, "num_key_value_heads": 2}, head_dim=8, sliding_window=16),
             vision_config=dict(TINY_VISION, model_type="siglip_vision_model"), mm_tokens_per_image=4,
             image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI, bos_token_id=0, eos_token_id=0, pad_token_id=1)
_LLAVA = _c("LlavaConfig", text_config=dict(DEC, model_type="llama"),
            vision_config=dict(TINY_VISION, model_type="clip_vision_model", projection_dim=32),
            image_token_index=IMG, vision_feature_layer=-1, projector_hidden_act="gelu")

TABLE: list[Arch] = [
    # dense decoders
    Arch("llama", "LlamaForCausalLM", "AutoModelForCausalLM", "text", _dec("LlamaConfig")),
    Arch("llama-bf16-sharded", "LlamaForCausalLM", "AutoModelForCausalLM", "text", _dec("LlamaConfig", tie_word_embeddings=True),
         dtype=torch.bfloat16, shard="20KB", rtol=2e-2),  # the residual is rounded to bf16 (the default --dtype):
    # measured 9e-3 relative on the logits (2.5e-6 absolute with --dtype float32); a lost factor is ~0.5
    Arch("mistral", "MistralForCausalLM", "AutoModelForCausalLM", "text", _dec("MistralConfig", sliding_window=16)),
    Arch("qwen2", "Qwen2ForCausalLM", "AutoModelForCausalLM", "text", _dec("Qwen2Config")),
    Arch("qwen3", "Qwen3ForCausalLM", "AutoModelForCausalLM", "text", _dec("Qwen3Config", head_dim=8)),
    Arch("gemma", "GemmaForCausalLM", "AutoModelForCausalLM", "text", _dec("GemmaConfig", head_dim=8)),
    Arch("gemma2", "Gemma2ForCausalLM", "AutoModelForCausalLM", "text", _dec("Gemma2Config", head_dim=8, sliding_window=16)),
    Arch("phi", "PhiForCausalLM", "AutoModelForCausalLM", "text", _dec("PhiConfig")),
    Arch("phi3", "Phi3ForCausalLM", "AutoModelForCausalLM", "text", _dec("Phi3Config")),  # fused qkv_proj, gate_up_proj
    Arch("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM", "text",  # Conv1D (in, out), tied
         _c("GPT2Config", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "AutoModelForCausalLM", "text",  # fused query_key_value
         _c("GPTNeoXConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=0)),
    Arch("gptj", "GPTJForCausalLM", "AutoModelForCausalLM", "text",
         _c("GPTJConfig", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0)),
    Arch("opt", "OPTForCausalLM", "AutoModelForCausalLM", "text",  # project_in/out: word_embed_proj_dim 16 != hidden 32
         _c("OPTConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=16, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    Arch("falcon", "FalconForCausalLM", "AutoModelForCausalLM", "text",
         _c("FalconConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=0)),
    Arch("stablelm", "StableLmForCausalLM", "AutoModelForCausalLM", "text", _dec("StableLmConfig")),
    Arch("olmo2", "Olmo2ForCausalLM", "AutoModelForCausalLM", "text", _dec("Olmo2Config")),
    Arch("starcoder2", "Starcoder2ForCausalLM", "AutoModelForCausalLM", "text", _dec("Starcoder2Config", sliding_window=16)),
    # encoders
    Arch("bert", "BertModel", "AutoModel", "text",  # with its pooler (a Linear outside the blocks)
         _c("BertConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, pad_token_id=1), family="encoder"),
    Arch("roberta", "RobertaForMaskedLM", "AutoModelForMaskedLM", "text",
         _c("RobertaConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=66, pad_token_id=1), family="encoder"),
    Arch("distilbert", "DistilBertForMaskedLM", "AutoModelForMaskedLM", "text",
         _c("DistilBertConfig", vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            pad_token_id=1), family="encoder"),
    # seq2seq, speech
    Arch("t5", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", "seq2seq",
         _c("T5Config", vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
            pad_token_id=1, eos_token_id=0), family="seq2seq"),
    Arch("bart", "BartForConditionalGeneration", "AutoModelForSeq2SeqLM", "seq2seq",
         _c("BartConfig", vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=1, decoder_start_token_id=0), family="seq2seq"),
    Arch("whisper", "WhisperForConditionalGeneration", "AutoModelForSpeechSeq2Seq", "whisper",
         _c("WhisperConfig", vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
            max_target_positions=32, bos_token_id=0, eos_token_id=0, pad_token_id=1, decoder_start_token_id=0,
            begin_suppress_tokens=None, suppress_tokens=None), family="speech"),
    # mixture of experts
    Arch("mixtral", "MixtralForCausalLM", "AutoModelForCausalLM", "text",  # 8 experts: router gate is 8 x hidden
         _dec("MixtralConfig", num_local_experts=8, num_experts_per_tok=2), family="moe"),
    Arch("qwen2_moe", "Qwen2MoeForCausalLM", "AutoModelForCausalLM", "text",  # shared_expert + 1 x hidden shared_expert_gate
         _dec("Qwen2MoeConfig", moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
              num_experts_per_tok=2), family="moe"),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", "AutoModelForCausalLM", "text",
         _dec("Qwen3MoeConfig", head_dim=8, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2), family="moe"),
    Arch("deepseek_v3", "DeepseekV3ForCausalLM", "AutoModelForCausalLM", "text",  # layer 0 dense, layer 1 MoE + shared expert
         _dec("DeepseekV3Config", num_key_value_heads=4, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
              qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8), family="moe"),
    # multimodal
    Arch("gemma3", "Gemma3ForConditionalGeneration", "AutoModelForImageTextToText", "gemma3", _GEMMA3, family="multimodal"),
    Arch("llava", "LlavaForConditionalGeneration", "AutoModelForImageTextToText", "llava", _LLAVA, family="multimodal"),
    Arch("qwen2_vl", "Qwen2VLForConditionalGeneration", "AutoModelForImageTextToText", "qwen2_vl",
         _c("Qwen2VLConfig", text_config=dict(DEC, model_type="qwen2_vl_text",
                                              rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=IMG, video_token_id=BOI, vision_start_token_id=VSTART, vision_end_token_id=EOI), family="multimodal"),
    # Hub-style checkpoint names: the same models with their keys in the loaded module names
    Arch("gemma3-hub", "Gemma3ForConditionalGeneration", "AutoModelForImageTextToText", "gemma3", _GEMMA3,
         rename=_LOADED_NAMES_VLM, family="hub-names"),
    Arch("llava-hub", "LlavaForConditionalGeneration", "AutoModelForImageTextToText", "llava", _LLAVA,
         rename=_LOADED_NAMES_VLM, family="hub-names"),
]
ARCHS: dict[str, Arch] = {a.name: a for a in TABLE}


def _ids(n: int = SEQ, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, TEXT_HI, (batch, n), generator=torch.Generator().manual_seed(seed))


def inputs(arch: Arch, config) -> dict[str, torch.Tensor]:
    """The fixed forward inputs of `arch` (deterministic; every part of the model is on the path)."""
    g = torch.Generator().manual_seed(1)
    if arch.inputs == "text":
        return {"input_ids": _ids()}
    if arch.inputs == "seq2seq":
        return {"input_ids": _ids(), "decoder_input_ids": _ids(5, seed=2)}
    if arch.inputs == "whisper":  # (batch, mel bins, 2 * max_source_positions)
        return {"input_features": torch.randn(1, 16, 32, generator=g), "decoder_input_ids": _ids(5, seed=2)}
    if arch.inputs in ("gemma3", "llava"):
        n_img = 4 if arch.inputs == "gemma3" else (16 // 4) ** 2  # gemma3: mm_tokens_per_image; llava: patches (CLS dropped)
        pre = [BOI] if arch.inputs == "gemma3" else []
        post = [EOI] if arch.inputs == "gemma3" else []
        ids = torch.tensor([[0, *pre, *[IMG] * n_img, *post]])
        out = {"input_ids": torch.cat([ids, _ids(6)], 1), "pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
        out["token_type_ids"] = (out["input_ids"] == IMG).long()
        if arch.inputs == "llava":
            del out["token_type_ids"]
        return out
    if arch.inputs == "qwen2_vl":  # one 8x8 image, temporal 2: grid (1, 2, 2) patches of 3*2*4*4, merged 2x2 -> 1 token
        ids = torch.tensor([[0, VSTART, IMG, EOI]])
        ids = torch.cat([ids, _ids(6)], 1)
        return {"input_ids": ids, "mm_token_type_ids": (ids == IMG).long(), "pixel_values": torch.randn(4, 96, generator=g),
                "image_grid_thw": torch.tensor([[1, 2, 2]])}
    raise ValueError(arch.inputs)


def forward(model, arch: Arch, config) -> torch.Tensor:
    """float32 outputs on the fixed inputs: logits, or for a bare encoder its hidden states and pooler output."""
    model.eval()
    with torch.no_grad():
        out = model(**inputs(arch, config))
    if getattr(out, "logits", None) is not None:
        return out.logits.float()
    parts = [out.last_hidden_state.flatten()]
    if getattr(out, "pooler_output", None) is not None:
        parts.append(out.pooler_output.flatten())
    return torch.cat(parts).float()


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                p.normal_(0, STD)
            elif name.endswith("bias") and "norm" not in name.lower() and "ln" not in name.split(".")[-2].lower():
                p.normal_(0, 0.1)


def _renamed(key: str, rules) -> str:
    for pat, rep in rules:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    return key


def _rename_keys(folder: Path, rules) -> None:
    """Rewrite the saved safetensors' keys by the first matching rule (and the index, if any)."""
    for f in sorted(folder.glob("model*.safetensors")):
        save_file({_renamed(k, rules): t.contiguous() for k, t in load_file(f).items()}, f, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_renamed(k, rules): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def build(arch: Arch, dest: Path, seed: int = 0) -> Path:
    """Write `arch`'s tiny model (float32 safetensors + the fixtures' tokenizer) to `dest`."""
    torch.manual_seed(seed)
    config = arch.cfg()
    model = getattr(transformers, arch.model_cls)(config).to(torch.float32)
    _randomize(model)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(arch.dtype).save_pretrained(tmp, **({"max_shard_size": arch.shard} if arch.shard else {}))
    _tokenizer(V).save_pretrained(tmp)
    if arch.rename:
        _rename_keys(tmp, arch.rename)
    tmp.rename(dest)
    return dest


class Zoo:
    """Each architecture built once into `root` (a session-scoped tmp folder), on first use."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._made: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self._made:
            self._made[name] = build(ARCHS[name], self.root / name)
        return self._made[name]
