"""A miniature paper world: the paper profile's architectures, tokenizers and data, offline.

* **Models**: tiny random checkpoints of the real architectures (llava-1.5 with its CLIP
  ViT-L/14-336 layout, LLaVA-NeXT anyres, Qwen2-VL), saved with ``save_pretrained`` together
  with real-format processors, so tests load them exactly as they would load the hub's.
* **Tokenizers** in the real formats, built here: a Llama-style SentencePiece BPE model
  (digits split, byte fallback) trained on generated LLaVA-style text; CLIP's own BPE
  vocabulary from the merges file that ships in the ``open_clip_torch`` wheel; a Qwen2-style
  byte-level BPE trained with ``tokenizers``.
* **Archives** in the official COCO 2017 / VQAv2 / RefCOCO layouts with COCO-like mixed
  image sizes (:func:`official_archives`).

Everything is deterministic given ``seed``; nothing runs at import.
"""
from __future__ import annotations

import functools
import gzip
import importlib.metadata
import io
import json
import pickle
import random
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw
from tokenizers import trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                          CLIPTokenizer, CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaImageProcessor, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor,
                          LlavaProcessor, Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)
from transformers.tokenization_utils_base import AddedToken, generate_merges

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = 3                                   # PIL.Image.Resampling.BICUBIC, as the hub configs store it

# llava-hf/llava-1.5-7b-hf's processor chat template (USER/ASSISTANT, images before text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# Qwen2-VL-Instruct's template, without the video and vision-id branches.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


# --- text the tokenizers are trained on ------------------------------------------------

OBJECTS = ("person man woman child dog cat horse bus train truck car bicycle motorcycle airplane boat bird "
           "giraffe zebra elephant bear sheep cow pizza sandwich banana umbrella kite surfboard skateboard "
           "bench chair couch bed table laptop phone clock vase bottle cup bowl toilet sink oven "
           "refrigerator frisbee tennis racket baseball bat glove traffic light fire hydrant").split()
COLORS = "red blue green yellow white black brown orange pink gray purple".split()
PLACES = ("street kitchen beach field park room table road sky water grass snow city desk "
          "living room bathroom airport track").split()
VERBS = "sitting standing walking riding holding eating playing lying parked flying looking".split()
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")     # LLaVA-1.5's system prompt


def corpus(seed: int = 0, n: int = 120) -> list[str]:
    """LLaVA-1.5-style prompts, VQAv2 questions and answers, COCO-like captions and RefCOCO
    expressions with box answers: the text the paper's LVLM reads and writes."""
    rng = random.Random(seed)

    def obj() -> str:
        return rng.choice(OBJECTS)

    def col() -> str:
        return rng.choice(COLORS)

    def place() -> str:
        return rng.choice(PLACES)

    def verb() -> str:
        return rng.choice(VERBS)

    def box() -> str:                        # LLaVA-1.5's grounding answer: fractions, two decimals
        return "[" + ", ".join(f"{rng.random():.2f}" for _ in range(4)) + "]"

    out = []
    for k in range(n):
        q = rng.choice([f"What color is the {obj()}?", f"How many {obj()}s are there?",
                        f"Is there a {obj()} in the image?", f"What is the {obj()} {verb()}?",
                        f"Where is the {obj()}?", f"What is on the {place()}?", f"Is the {obj()} {col()}?"])
        a = rng.choice([col(), str(rng.randint(0, 12)), "yes", "no", obj(), place()])
        cap = f"A {col()} {obj()} {verb()} on the {place()} next to a {obj()}."
        ref = rng.choice([f"{col()} {obj()} on the left", f"the {obj()} in the middle",
                          f"{obj()} right", f"big {obj()} behind the {obj()}"])
        out += [
            (SYSTEM + " " if k % 4 == 0 else "")
            + f"USER: <image>\n{q}\nAnswer the question using a single word or phrase. ASSISTANT: {a}",
            f"USER: <image>\n{q}\nanswer the question using a single word or phrase. ASSISTANT:",
            f"USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT: {cap}",
            cap, cap.lower(), q, a,
            f"USER: <image>\nPlease provide the bounding box coordinate of the region this sentence "
            f"describes: {ref}. ASSISTANT: {box()}",
            f"{ref} {box()} {rng.randint(0, 640)}x{rng.randint(0, 640)} {rng.randint(1990, 2024)}",
        ]
    return out


# --- Llama-style SentencePiece ---------------------------------------------------------

@functools.lru_cache(maxsize=4)
def sentencepiece_model(seed: int = 0, vocab_size: int = 1000) -> bytes:
    """A serialized SentencePiece BPE model trained like Llama's (digits split, byte fallback,
    dummy prefix, whitespace kept as is; <unk>=0, <s>=1, </s>=2, then the 256 byte pieces).

    Trained without newlines, so a newline falls back to the byte ``<0x0A>`` as in Llama's vocabulary.
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t.replace("\n", " ") for t in corpus(seed)), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, split_digits=True, byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    return buf.getvalue()


def llama_tokenizer(seed: int = 0) -> LlamaTokenizer:
    """The SentencePiece model as transformers' Llama tokenizer (the tokenizers-backed one:
    BPE with byte fallback, merges in the pieces' score order, as the hub's ``tokenizer.json``),
    plus llava-hf's added ``<image>`` and ``<pad>``."""
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(seed))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False,
                         legacy=False, padding_side="left")
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    return tok


def save_llama_tokenizer(tok: LlamaTokenizer, out: Path, seed: int = 0) -> None:
    """``save_pretrained`` plus what llava-hf's folders carry besides: the SentencePiece
    ``tokenizer.model`` and the BOS/EOS flags in ``tokenizer_config.json`` (a generic loader
    reads them from there, not from the tokenizer class)."""
    tok.save_pretrained(out)
    (Path(out) / "tokenizer.model").write_bytes(sentencepiece_model(seed))
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=True, add_eos_token=False, legacy=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for ``n`` tokens, padded like llava-hf's 32064 for 32002 tokens."""
    return -(-n // multiple) * multiple


# --- CLIP's BPE --------------------------------------------------------------------------

def clip_merges_file() -> Path:
    """``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip_torch`` (not imported)."""
    path = Path(importlib.metadata.distribution("open_clip_torch").locate_file(
        "open_clip/bpe_simple_vocab_16e6.txt.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP's BPE merges missing; install open_clip_torch")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's 49408-token vocabulary and its 48894 merges, built as CLIP's ``SimpleTokenizer`` does."""
    with gzip.open(clip_merges_file()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    pairs = [m.split() for m in lines[1:49152 - 256 - 2 + 1]]    # line 0 is the version header
    merges = tuple((a, b) for a, b in pairs)
    symbols = list(bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def save_clip_tokenizer(tok: CLIPTokenizer, out: Path) -> None:
    """``save_pretrained`` plus the ``vocab.json``/``merges.txt`` pair the hub folder carries."""
    vocab, merges = clip_vocab()
    tok.save_pretrained(out)
    (Path(out) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (Path(out) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


# --- Qwen2-style byte-level BPE -----------------------------------------------------------

def qwen2_tokenizer(seed: int = 0, vocab_size: int = 1000) -> Qwen2Tokenizer:
    """A byte-level BPE trained on :func:`corpus` with Qwen2's own pre-tokenizer, as
    ``Qwen2Tokenizer`` (vocab + merges), then Qwen2-VL's special tokens after the vocabulary."""
    base = Qwen2Tokenizer()                 # empty vocabulary, Qwen2's normalizer and pre-tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(),
                                  show_progress=False)
    backend = base.backend_tokenizer
    backend.train_from_iterator(corpus(seed), trainer=trainer)
    state = json.loads(backend.to_str())["model"]
    vocab = {k: v for k, v in state["vocab"].items() if k != "<|endoftext|>"}
    vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.__getitem__))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", padding_side="left",
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL], special_tokens=True)
    return tok


# --- llava-1.5 ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiny:
    """Sizes of the tiny networks (the architectures are the real ones)."""

    vision_hidden: int = 32
    vision_layers: int = 3          # layer -2 is then a middle layer, as in the 24-layer tower
    vision_heads: int = 2
    projection_dim: int = 16
    lm_hidden: int = 32
    lm_layers: int = 2
    lm_heads: int = 2
    lm_intermediate: int = 64
    clip_text_layers: int = 2


TINY = Tiny()


def clip_vision_config(image_size: int = 336, patch_size: int = 14, t: Tiny = TINY) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336's layout in miniature (CLS token, one-conv patches, quick_gelu)."""
    return CLIPVisionConfig(hidden_size=t.vision_hidden, intermediate_size=4 * t.vision_hidden,
                            num_hidden_layers=t.vision_layers, num_attention_heads=t.vision_heads,
                            image_size=image_size, patch_size=patch_size, projection_dim=t.projection_dim,
                            hidden_act="quick_gelu")


def llama_config(tok: LlamaTokenizer, t: Tiny = TINY) -> LlamaConfig:
    return LlamaConfig(vocab_size=padded_vocab(len(tok)), hidden_size=t.lm_hidden,
                       intermediate_size=t.lm_intermediate, num_hidden_layers=t.lm_layers,
                       num_attention_heads=t.lm_heads, num_key_value_heads=t.lm_heads,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)


def llava_family_config(tok: LlamaTokenizer, image_size: int, patch_size: int) -> dict:
    """Config keys llava-1.5 and LLaVA-NeXT share: the tiny CLIP tower and Llama LM, features of
    layer -2 without CLS ("default"), a GELU projector, ``(image_size // patch_size) ** 2`` tokens
    per (base) image."""
    return {"vision_config": clip_vision_config(image_size, patch_size).to_dict(),
            "text_config": llama_config(tok).to_dict(), "image_seq_length": (image_size // patch_size) ** 2,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu", "pad_token_id": tok.pad_token_id}


def save_llava_family(out: Path, model, processor_cls: type, image_processor, tok: LlamaTokenizer,
                      patch_size: int) -> Path:
    """Save ``model`` into ``out`` with a ``processor_cls`` processor (llava-1.5's chat template;
    ``<image>`` expanded to the tokens left after CLS is dropped) and the SentencePiece tokenizer."""
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    save_llama_tokenizer(tok, out)
    return out


def build_llava15(out: Path, *, image_size: int = 336, patch_size: int = 14, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` shaped like llava-1.5-7b-hf, with its processor.

    ``(image_size // patch_size) ** 2`` visual tokens (576 by default; ``image_size=98`` gives
    an odd 7x7 grid); CLIP tower with CLS, features of layer -2 without CLS ("default"), a
    two-layer GELU projector, a Llama LM. The processor pads to a square with the mean colour
    and resizes (llava-1.5's ``expand2square``) and expands ``<image>`` into the visual tokens.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = llama_tokenizer()
    cfg = LlavaConfig(image_token_id=tok.convert_tokens_to_ids("<image>"),
                      **llava_family_config(tok, image_size, patch_size))
    model = LlavaForConditionalGeneration(cfg).eval()
    image_processor = LlavaImageProcessor(
        do_pad=True, do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, resample=BICUBIC, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, do_convert_rgb=True)
    return save_llava_family(out, model, LlavaProcessor, image_processor, tok, patch_size)


def build_clip(out: Path, vision_from: Path | None = None, *, seed: int = 0) -> Path:
    """A random ``CLIPModel`` (text tower, projections, CLIP's BPE tokenizer and image processor).

    With ``vision_from`` (a :func:`build_llava15` folder) the vision tower has that LLaVA's
    config and weights, as openai/clip-vit-large-patch14-336 is llava-1.5's tower.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    if vision_from is not None:
        llava = LlavaForConditionalGeneration.from_pretrained(vision_from)
        vision = llava.config.vision_config
    else:
        llava, vision = None, clip_vision_config()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=TINY.vision_hidden,
                          intermediate_size=4 * TINY.vision_hidden, num_hidden_layers=TINY.clip_text_layers,
                          num_attention_heads=TINY.vision_heads, max_position_embeddings=77,
                          projection_dim=TINY.projection_dim, hidden_act="quick_gelu",
                          pad_token_id=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=TINY.projection_dim)).eval()
    if llava is not None:
        model.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    size = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         resample=BICUBIC, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    save_clip_tokenizer(tok, out)
    return out


def build_llava15_pair(root: Path, *, image_size: int = 336, patch_size: int = 14, seed: int = 0
                       ) -> tuple[Path, Path]:
    """``root/llava`` and ``root/clip`` sharing one vision tower: what ``load_lvlm`` reads."""
    llava = build_llava15(Path(root) / "llava", image_size=image_size, patch_size=patch_size, seed=seed)
    return llava, build_clip(Path(root) / "clip", llava, seed=seed)


# --- LLaVA-NeXT -----------------------------------------------------------------------------

def build_llava_next(out: Path, *, image_size: int = 56, patch_size: int = 14, seed: int = 0) -> Path:
    """A random ``LlavaNextForConditionalGeneration`` (llava-v1.6-vicuna's layout) with its processor.

    AnyRes with pinpoints of 1x2, 2x1 and 2x2 tiles of ``image_size``: the base image's
    ``(image_size // patch_size) ** 2`` tokens, then the unpadded tile grid with one newline
    token per row.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tok = llama_tokenizer()
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    cfg = LlavaNextConfig(image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          **llava_family_config(tok, s, patch_size))
    model = LlavaNextForConditionalGeneration(cfg).eval()
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=pinpoints, size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        do_pad=True, resample=BICUBIC, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    return save_llava_family(out, model, LlavaNextProcessor, image_processor, tok, patch_size)


# --- Qwen2-VL -------------------------------------------------------------------------------

def build_qwen2_vl(out: Path, *, min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16,
                   seed: int = 0) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` with its processor (byte-level BPE tokenizer,
    dynamic resolution between ``min_pixels`` and ``max_pixels``: 4 to 16 merged visual
    tokens of 2x2 patches of 14 px by default) and Qwen2-VL-Instruct's chat template."""
    out = Path(out)
    torch.manual_seed(seed)
    tok = qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    t = TINY
    head_dim = t.lm_hidden // t.lm_heads
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]      # temporal, height, width; sums to head_dim/2
    vision = dict(depth=2, embed_dim=t.vision_hidden, hidden_size=t.lm_hidden, num_heads=t.vision_heads,
                  mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=padded_vocab(len(tok)), hidden_size=t.lm_hidden, intermediate_size=t.lm_intermediate,
                num_hidden_layers=t.lm_layers, num_attention_heads=t.lm_heads, num_key_value_heads=1,
                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope})
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
                                              image_mean=CLIP_MEAN, image_std=CLIP_STD),
        video_processor=Qwen2VLVideoProcessor(**pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
                                              image_mean=CLIP_MEAN, image_std=CLIP_STD),
        tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --- images ---------------------------------------------------------------------------------

# COCO's usual shapes: landscape 640 wide, portrait 640 high, the older 500 px, a square.
COCO_SIZES = ((640, 427), (480, 640), (500, 375), (612, 612), (640, 480), (375, 500), (640, 425), (427, 640))
# The first image ids of COCO 2017 val, in order.
COCO_VAL_IDS = (139, 285, 632, 724, 776, 785, 802, 872, 885, 1000, 1268, 1296, 1353, 1425, 1490, 1503)


def coco_file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def camera_exif(orientation: int = 1) -> bytes:
    """An EXIF block as a phone camera writes it (make, model, time, orientation, exposure)."""
    exif = Image.Exif()
    exif[0x010F] = "Canon"                        # Make
    exif[0x0110] = "Canon PowerShot S95"          # Model
    exif[0x0112] = orientation                    # Orientation
    exif[0x0132] = "2013:11:14 16:21:07"          # DateTime
    exif[0x0131] = "Picasa"                       # Software
    sub = exif.get_ifd(0x8769)                    # Exif sub-IFD
    sub[0x9003] = "2013:11:14 16:21:07"           # DateTimeOriginal
    sub[0x829A] = (1, 60)                         # ExposureTime
    sub[0x8827] = 200                             # ISOSpeedRatings
    return exif.tobytes()


def jpeg(width: int, height: int, seed: int, *, boxes: Sequence[Sequence[float]] = (), quality: int = 60,
         exif: bytes | None = None) -> bytes:
    """A JPEG of ``width x height``: a smooth background (small files) with a coloured shape
    inside each ``[x, y, w, h]`` box, so objects are where the annotations say."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(-60, 60, (2, 3))
    bg = c0 + c1[0] * (x[..., None] / max(width, 1)) + c1[1] * (y[..., None] / max(height, 1))
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for k, (bx, by, bw, bh) in enumerate(boxes):
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if k % 2 else draw.rectangle
        shape([bx, by, bx + bw - 1, by + bh - 1], fill=fill)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip of ``members``; entries carry a fixed date, so the same members give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2017, 9, 1, 0, 0, 0)), data)
    return buf.getvalue()


def pickle_py2(obj) -> bytes:
    """Protocol 2 with ``fix_imports`` writes Python 2 module names, like the original RefCOCO files."""
    return pickle.dumps(obj, protocol=2)


# --- the official archives ----------------------------------------------------------------

CATEGORIES = ((1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (18, "dog", "animal"),
              (44, "bottle", "kitchen"), (62, "chair", "furniture"))


def _boxes(rng: random.Random, w: int, h: int, n: int) -> list[list[float]]:
    out = []
    for k in range(n):
        bw, bh = rng.uniform(0.15, 0.45) * w, rng.uniform(0.15, 0.45) * h
        out.append([round(rng.uniform(0, w - bw), 2), round(rng.uniform(0, h - bh), 2), round(bw, 2), round(bh, 2)])
    return out


def _polygon(b: Sequence[float]) -> list[list[float]]:
    x, y, w, h = b
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@dataclass(frozen=True)
class ArchiveWorld:
    """The documents behind :func:`official_archives` (for assertions in tests)."""

    images: list[dict]            # COCO image entries (id, file_name, width, height, ...)
    instances: dict
    captions: dict
    questions: dict
    annotations: dict
    refs: list[dict]


def archive_world(n_images: int = 8, seed: int = 0) -> ArchiveWorld:
    """COCO 2017 val in miniature: ``n_images`` images of mixed COCO sizes with 2-3 objects and
    5 captions each; VQAv2 questions on the val2014 half (ids alternate, as val2014 and
    train2014 split COCO 2017 val) plus one val2014 image outside val2017; RefCOCO refs on
    the train2014 half plus one ref on a train2017 image."""
    rng = random.Random(seed)
    extra = range(1, n_images - len(COCO_VAL_IDS) + 1)          # beyond the listed ids: made-up ones
    ids = list(COCO_VAL_IDS[:n_images]) + [COCO_VAL_IDS[-1] + 7 * k for k in extra]
    images, anns, caps = [], [], []
    for k, i in enumerate(ids):
        w, h = COCO_SIZES[k % len(COCO_SIZES)]
        images.append({"license": 1 + k % 3, "file_name": coco_file_name(i), "width": w, "height": h, "id": i,
                       "coco_url": f"http://images.cocodataset.org/val2017/{coco_file_name(i)}",
                       "date_captured": f"2013-11-{14 + k % 10:02d} 16:{k % 60:02d}:07",
                       "flickr_url": f"http://farm{1 + k % 9}.staticflickr.com/{i}.jpg"})
        for j, b in enumerate(_boxes(rng, w, h, 2 + k % 2)):
            cat = CATEGORIES[(k + j) % len(CATEGORIES)]
            anns.append({"segmentation": _polygon(b), "area": round(b[2] * b[3], 2), "iscrowd": 0,
                         "image_id": i, "bbox": b, "category_id": cat[0], "id": 100000 * i + j})
        for c in range(5):
            obj, col = rng.choice(OBJECTS), rng.choice(COLORS)
            caps.append({"image_id": i, "id": 10 * i + c,
                         "caption": f"A {col} {obj} {rng.choice(VERBS)} on the {rng.choice(PLACES)}."
                                    + (" " if c == 0 else "")})   # COCO captions carry stray spaces
    info = {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0",
            "year": 2017, "contributor": "COCO Consortium", "date_created": "2017/09/01"}
    licenses = [{"url": f"http://creativecommons.org/licenses/{n}/2.0/", "id": k + 1, "name": n}
                for k, n in enumerate(("by-nc-sa", "by-nc", "by"))]
    cats = [{"supercategory": s, "id": c, "name": n} for c, n, s in CATEGORIES]
    instances = {"info": info, "licenses": licenses, "images": images, "annotations": anns, "categories": cats}
    captions = {"info": info, "licenses": licenses, "images": images, "annotations": caps}

    vqa_ids = ids[0::2] + [42]                              # 42: a val2014 image outside val2017
    qs, qa = [], []
    for i in vqa_ids:
        for n in range(3):
            qid = i * 1000 + n
            obj = rng.choice(OBJECTS)
            kind, q, a = rng.choice([("what color is the", f"What color is the {obj}?", rng.choice(COLORS)),
                                     ("how many", f"How many {obj}s are there?", str(rng.randint(0, 5))),
                                     ("is there a", f"Is there a {obj} in the image?", rng.choice(["yes", "no"]))])
            qs.append({"image_id": i, "question": q, "question_id": qid})
            answers = [a] * 7 + [rng.choice(COLORS + ["yes", "no", "2"]) for _ in range(3)]
            qa.append({"question_type": kind, "multiple_choice_answer": a,
                       "answers": [{"answer": x, "answer_confidence": rng.choice(["yes", "maybe"]),
                                    "answer_id": m + 1} for m, x in enumerate(answers)],
                       "image_id": i, "answer_type": "number" if kind == "how many" else
                       "yes/no" if kind == "is there a" else "other", "question_id": qid})
    meta = {"info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017},
            "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons"},
            "data_type": "mscoco", "data_subtype": "val2014"}
    questions = {**meta, "task_type": "Open-Ended", "questions": qs}
    annotations = {**meta, "annotations": qa}

    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    refs = []
    for i in ids[1::2]:
        for a in by_image[i][:2]:
            rid = len(refs) + 1
            obj = next(n for c, n, _ in CATEGORIES if c == a["category_id"])
            sents = [f"{obj} on the left", f"the {rng.choice(COLORS)} {obj}"]
            refs.append({"sent_ids": [10 * rid + s for s in range(2)],
                         "file_name": f"COCO_train2014_{i:012d}_{a['id']}.jpg", "ann_id": a["id"], "ref_id": rid,
                         "image_id": i, "split": rng.choice(["train", "val", "testA", "testB"]),
                         "sentences": [{"tokens": s.split(), "raw": s.capitalize(), "sent_id": 10 * rid + n,
                                        "sent": s} for n, s in enumerate(sents)],
                         "category_id": a["category_id"]})
    refs.append({"sent_ids": [9], "file_name": "COCO_train2014_000000000009_1038967.jpg", "ann_id": 1038967,
                 "ref_id": len(refs) + 1, "image_id": 9, "split": "train", "category_id": 51,
                 "sentences": [{"tokens": ["bowl"], "raw": "bowl", "sent_id": 9, "sent": "bowl"}]})
    return ArchiveWorld(images, instances, captions, questions, annotations, refs)


def official_archives(n_images: int = 8, seed: int = 0) -> dict[str, bytes]:
    """The five official archives (file name -> bytes) of :func:`archive_world`: the images'
    JPEGs (quality 60, the second with a camera EXIF block) and the annotation files under
    their official member names, the RefCOCO refs as a Python 2 pickle."""
    world = archive_world(n_images, seed)
    boxes: dict[int, list] = {}
    for a in world.instances["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    jpegs = {f"val2017/{im['file_name']}": jpeg(im["width"], im["height"], seed * 100003 + im["id"],
                                                boxes=boxes[im["id"]], exif=camera_exif() if k == 1 else None)
             for k, im in enumerate(world.images)}
    dump = lambda d: json.dumps(d).encode()  # noqa: E731
    return {
        "val2017.zip": zip_bytes(jpegs),
        "annotations_trainval2017.zip": zip_bytes({
            "annotations/instances_val2017.json": dump(world.instances),
            "annotations/captions_val2017.json": dump(world.captions),
            "annotations/person_keypoints_val2017.json": dump({**world.instances, "annotations": []}),
            "annotations/instances_train2017.json": dump({"images": [], "annotations": [],
                                                          "categories": world.instances["categories"]})}),
        "v2_Questions_Val_mscoco.zip": zip_bytes({"v2_OpenEnded_mscoco_val2014_questions.json":
                                                  dump(world.questions)}),
        "v2_Annotations_Val_mscoco.zip": zip_bytes({"v2_mscoco_val2014_annotations.json": dump(world.annotations)}),
        "refcoco.zip": zip_bytes({"refcoco/refs(unc).p": pickle_py2(world.refs),
                                  "refcoco/refs(google).p": pickle_py2([]),
                                  "refcoco/instances.json": dump({"images": [], "annotations": [],
                                                                  "categories": world.instances["categories"]})}),
    }


# The first image ids of COCO 2017 train, in order (42 is also a VQAv2 val2014 image).
COCO_TRAIN_IDS = (9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 72, 73, 74, 77, 78, 81)


def train2017_archive(n_images: int = 10, seed: int = 0) -> bytes:
    """``train2017.zip`` in the official layout: a ``train2017/`` folder entry and
    ``train2017/<12-digit id>.jpg`` of mixed COCO sizes. Members are stored in an order other
    than their names' (a reader must sort), and the last is written with zip64 extra fields."""
    extra = range(1, n_images - len(COCO_TRAIN_IDS) + 1)
    ids = list(COCO_TRAIN_IDS[:n_images]) + [COCO_TRAIN_IDS[-1] + 5 * k for k in extra]
    order = ids[1::2] + ids[0::2]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("train2017/"), b"")
        for k, i in enumerate(order):
            w, h = COCO_SIZES[(k + 3) % len(COCO_SIZES)]
            data = jpeg(w, h, seed * 100003 + 7 * i, boxes=[[w * 0.25, h * 0.2, w * 0.3, h * 0.4]])
            info = zipfile.ZipInfo(f"train2017/{coco_file_name(i)}", date_time=(2017, 9, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=k == len(order) - 1) as fh:
                fh.write(data)
    return buf.getvalue()


def pil_images(sizes: Iterable[tuple[int, int]] = ((640, 427), (480, 640)), seed: int = 0) -> list[Image.Image]:
    """Decoded JPEGs of the given sizes, for processor inputs."""
    return [Image.open(io.BytesIO(jpeg(w, h, seed + k, boxes=[[w * 0.2, h * 0.3, w * 0.4, h * 0.3]]))).convert("RGB")
            for k, (w, h) in enumerate(sizes)]
