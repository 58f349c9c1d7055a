"""A tiny random llava-1.5-shaped LVLM (CLIP ViT tower, layer -2, "default" select), saved
to a folder and loaded back through the paper profile's loader; shared by the tests."""
from __future__ import annotations

from pathlib import Path

import torch

from vlmcompress.lvlm.build import ModelSpec, build_clip, build_llava, save_lvlm
from vlmcompress.lvlm.tokenizer import build_tokenizers, build_vocab

WORDS = ("user assistant : what color is the circle square red blue small a of there how many "
         "answer question using single word or phrase provide one-sentence caption for provided image "
         "please bounding box coordinate region this sentence describes yes no").split()

# llava-1.5's shape in miniature: CLIP ViT with CLS and one-conv patches, layer -2, "default" select.
TINY = ModelSpec(image_size=56, patch_size=14, stem_layers=0, vision_hidden=32, vision_layers=3,
                 vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, text_max_len=32,
                 projection_dim=16, lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64,
                 hidden_act="quick_gelu")


def save_tiny_lvlm(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model with random weights and write ``out_dir/{llava,clip}``."""
    torch.manual_seed(seed)
    vocab = build_vocab(WORDS, ["?", ".", ",", "[", "]"])
    tok, clip_tok = build_tokenizers(vocab)
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
    clip = build_clip(TINY, len(vocab), ids["<pad>"], ids["<s>"], ids["</s>"])
    llava = build_llava(TINY, clip, len(vocab), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"])
    return save_lvlm(out_dir, llava, tok, clip, clip_tok)
