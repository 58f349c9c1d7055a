"""A tiny random llava-1.5-shaped LVLM for tests (saved and loaded like the paper's model)."""
from __future__ import annotations

import dataclasses
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


def save_tiny_lvlm(out_dir: Path, spec: ModelSpec = TINY, kv_heads: int | None = None, seed: int = 0) -> Path:
    """Build a random model of ``spec`` (``kv_heads``: grouped-query attention in the LM) and
    save it as ``out_dir/{llava,clip}``."""
    torch.manual_seed(seed)
    vocab = build_vocab(WORDS, ["?", ".", ",", "[", "]"])
    tok, clip_tok = build_tokenizers(vocab)
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
    clip = build_clip(spec, len(vocab), ids["<pad>"], ids["<s>"], ids["</s>"])
    llava = build_llava(spec, clip, len(vocab), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"])
    if kv_heads is not None:
        cfg = llava.config
        cfg.text_config.num_key_value_heads = kv_heads
        tower = llava.model.vision_tower.state_dict()
        llava = type(llava)(cfg)
        llava.model.vision_tower.load_state_dict(tower)
    return save_lvlm(out_dir, llava, tok, clip, clip_tok)


def with_lm(spec: ModelSpec = TINY, **changes) -> ModelSpec:
    return dataclasses.replace(spec, **changes)


# --- stock transformers LVLMs under attach(): inputs and greedy runs -----------------------------

def gen(model, inputs: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` of up to 6 tokens -> (new ids ``[B, T]``, their logits ``[B, T, V]``);
    with ``input_ids`` the prompt is cut off (from ``inputs_embeds`` ``generate`` returns new ids only)."""
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kw)
    ids = out.sequences[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out.sequences
    return ids, torch.stack(out.logits, 1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> left-padded ids ``[B, L]`` (``pad_id``) and their attention mask ``[B, L]``."""
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for r, e in enumerate(rows):
        ids[r, L - len(e):] = torch.tensor(e)
        mask[r, L - len(e):] = 1
    return ids, mask


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L_r, D]`` rows -> left-padded ``[B, L, D]`` (zeros) and mask ``[B, L]``."""
    L = max(len(x) for x in rows)
    out = rows[0].new_zeros(len(rows), L, rows[0].shape[-1])
    m = torch.zeros(len(rows), L, dtype=torch.long)
    for r, x in enumerate(rows):
        out[r, L - len(x):], m[r, L - len(x):] = x, 1
    return out, m
