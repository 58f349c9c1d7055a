"""Build (untrained) LLaVA-architecture models of any size, and save them as HF folders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerBase)

from vlmcompress.io import atomic_path
from vlmcompress.lvlm.vision import VlmcCLIPConfig, VlmcCLIPModel, VlmcVisionConfig


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the three parts. ``stem_layers=0`` gives CLIP's own one-conv patch embedding."""

    image_size: int = 128
    patch_size: int = 8
    stem_layers: int = 3
    stem_context: int = 0
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_max_len: int = 48
    projection_dim: int = 128
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 768
    vision_feature_layer: int = -2
    hidden_act: str = "gelu"   # CLIP's own is quick_gelu; exact GELU is one fused op on CPU


def build_clip(spec: ModelSpec, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> CLIPModel:
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.projection_dim,
                  hidden_act=spec.hidden_act)
    text = dict(vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=4 * spec.text_hidden,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                max_position_embeddings=spec.text_max_len, pad_token_id=pad_id, bos_token_id=bos_id,
                eos_token_id=eos_id, projection_dim=spec.projection_dim, hidden_act=spec.hidden_act)
    if spec.stem_layers > 0:
        vcfg = VlmcVisionConfig(stem_layers=spec.stem_layers, stem_context=spec.stem_context, **vision)
        return VlmcCLIPModel(VlmcCLIPConfig(text_config=text, vision_config=vcfg.to_dict(),
                                            projection_dim=spec.projection_dim))
    return CLIPModel(CLIPConfig(text_config=text, vision_config=CLIPVisionConfig(**vision).to_dict(),
                                projection_dim=spec.projection_dim))


def build_llava(spec: ModelSpec, clip: CLIPModel, vocab_size: int, image_token_id: int, pad_id: int,
                bos_id: int, eos_id: int) -> LlavaForConditionalGeneration:
    """A LLaVA whose vision tower is a copy of ``clip``'s (llava-1.5 layout: layer -2, no CLS)."""
    lm = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.lm_hidden, intermediate_size=spec.lm_intermediate,
                     num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads,
                     num_key_value_heads=spec.lm_heads, max_position_embeddings=1024,
                     pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=clip.config.vision_config, text_config=lm, image_token_id=image_token_id,
                      vision_feature_layer=spec.vision_feature_layer, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", pad_token_id=pad_id)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    return model


def save_lvlm(out_dir: str | Path, llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
              clip: CLIPModel, clip_tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write ``out_dir/llava`` and ``out_dir/clip`` (safetensors + configs + tokenizers), atomically.

    The CLIP folder gets the LLaVA tower's current weights, so the two stay one encoder.
    """
    out_dir = Path(out_dir)
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    with atomic_path(out_dir) as tmp:
        llava.save_pretrained(tmp / "llava")
        tokenizer.save_pretrained(tmp / "llava")
        clip.save_pretrained(tmp / "clip")
        clip_tokenizer.save_pretrained(tmp / "clip")
    return out_dir


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
