"""attach() on LLaVA-NeXT (anyres tiles, newline tokens) and Qwen2-VL / Qwen2.5-VL (merged
patches, M-RoPE), tiny random models built from their transformers configs."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
)

from vlmcompress.lvlm.tokenizer import build_tokenizers, build_vocab
from vlmcompress.tokens import attach

from lvlm_helpers import gen, left_pad, pad_rows

WORDS = ("a chat between user and assistant system you are helpful : what color is the circle square red blue "
         "how many are there").split()
VOCAB = build_vocab(WORDS, ["?", "."])
TOK, _ = build_tokenizers(VOCAB)
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
TOK.add_special_tokens({"additional_special_tokens": ["<image>"] + QWEN_SPECIAL})
IMAGE_ID = TOK.convert_tokens_to_ids("<image>")
PAD_ID = TOK.convert_tokens_to_ids("<|image_pad|>")
QS = ["what color is the circle ?", "how many red square are there ?"]


def assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)


# --- LLaVA-NeXT ---------------------------------------------------------------------------
# 42 px tiles of 3 x 3 patches; (84, 84) -> 2 x 2 tiles, 9 + 6·(6 + 1) = 51 tokens;
# (40, 84) -> 1 x 2 tiles, 9 + 3·(6 + 1) = 30; (60, 84) -> 2 x 2 tiles unpadded to 4 rows, 37.
SIDE = 3
NEXT_SIZES = [[84, 84], [40, 84], [60, 84]]


def tiny_next(seed: int = 0, attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=2, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                initializer_range=0.1,      # weights large enough that token order matters
                                pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id,
                                eos_token_id=TOK.eos_token_id),
        image_token_id=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]], pad_token_id=TOK.pad_token_id)
    cfg._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = TOK.pad_token_id
    model.generation_config.eos_token_id = None        # every row generates all its tokens
    return model


def next_pixels(images: list[int], scales: list[float] | None = None) -> torch.Tensor:
    out = [torch.randn(5, 3, 42, 42, generator=torch.Generator().manual_seed(3 + i)) for i in images]
    return torch.stack([p * (scales[j] if scales else 1.0) for j, p in enumerate(out)])


def next_inputs(model, questions: list[str], images: list[int], scales: list[float] | None = None) -> dict:
    pixels, sizes = next_pixels(images, scales), torch.tensor([NEXT_SIZES[i] for i in images])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True)
    slots = [p.shape[0] for p in feats.pooler_output]
    texts = [f"a chat between user and assistant . user : {'<image> ' * n}{q} assistant :"
             for q, n in zip(questions, slots)]
    ids, mask = left_pad([TOK(t, add_special_tokens=False)["input_ids"] for t in texts], TOK.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def next_by_hand(model, h, inputs) -> dict:
    """The reference: each image's packed sequence restricted to the kept patch tokens, the
    newline of every high-res row that keeps a token after it, then merged tokens."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    emb = model.get_input_embeddings()(ids)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_sizes=inputs["image_sizes"], return_dict=True).pooler_output
    rows = []
    for r in range(ids.shape[0]):
        real, e = ids[r][mask[r].bool()], emb[r][mask[r].bool()]
        packed = feats[r]
        is_nl = (packed == model.model.image_newline).all(-1)
        patch_at = torch.nonzero(~is_nl).flatten().tolist()
        k = int(h.last.mask[r].sum())
        toks, src = h.last.tokens[r, :k], h.last.source[r, :k]
        seq = {patch_at[int(s)]: t for t, s in zip(toks, src) if s >= 0}
        prev = SIDE * SIDE - 1
        for j in torch.nonzero(is_nl).flatten().tolist():
            if any(prev < q < j for q in seq):
                seq[j] = packed[j]
            prev = j
        image = [seq[j] for j in sorted(seq)] + [t for t, s in zip(toks, src) if s < 0]
        first = int((real == IMAGE_ID).nonzero()[0])
        rows.append(torch.cat([e[:first], torch.stack(image), e[first + packed.shape[0]:]]))
    out, m = pad_rows(rows)
    return {"inputs_embeds": out, "attention_mask": m}


def test_next_budget_one_equals_the_stock_model():
    model = tiny_next()
    inputs = next_inputs(model, QS, [0, 1])
    ref = gen(model, inputs)
    with attach(model, "recoverable", 1.0, tokenizer=TOK) as h:
        got = gen(model, inputs)
        assert h.stats["tokens"] == h.stats["total"] == [51, 30]
    assert_same(got, ref)


@pytest.mark.parametrize("method,budget", [("recoverable", 0.25), ("visionzip", 0.5), ("prumerge", None),
                                           ("recoverable_spread", 0.3)])
def test_next_compressed_generation_equals_feeding_the_kept_tokens_by_hand(method, budget):
    model = tiny_next()
    inputs = next_inputs(model, QS[:1], [2])
    extra = {"recovery_peaks": False} if method == "recoverable_spread" else {}
    with attach(model, method, budget, tokenizer=TOK, **extra) as h:
        got = gen(model, inputs)
        n_nl = h.stats["tokens"][0] - int(h.last.mask[0].sum())
    assert 0 <= n_nl <= 4 and h.stats["total"] == [37]       # at most one newline per high-res row
    assert_same(got, gen(model, next_by_hand(model, h, inputs)))


@pytest.mark.parametrize("method", ["prumerge_plus", "recoverable"])
def test_next_a_batch_with_different_token_counts_equals_its_rows_one_by_one(method):
    model = tiny_next()
    inputs = next_inputs(model, QS, [0, 1], scales=[1.0, 3.0])
    with attach(model, method, None, tokenizer=TOK) as h:      # adaptive: counts differ per image
        got = gen(model, inputs)
        assert h.stats["total"] == [51, 30]
        singles = [gen(model, {k: v[r:r + 1] for k, v in inputs.items()}) for r in range(2)]
    for r, one in enumerate(singles):
        assert torch.equal(got[0][r:r + 1], one[0])
        torch.testing.assert_close(got[1][r:r + 1], one[1], rtol=1e-4, atol=1e-5)


def test_next_kv_cache_decoding_equals_recomputing():
    model = tiny_next()
    inputs = next_inputs(model, QS, [0, 2])
    with attach(model, "recoverable", 0.25, tokenizer=TOK):
        assert_same(gen(model, inputs), gen(model, inputs, use_cache=False))


def test_next_each_packed_token_is_scored_by_the_cls_of_its_own_tile():
    model = tiny_next(attn="eager")
    inputs = next_inputs(model, QS[:1], [0])                 # 2 x 2 tiles, nothing unpadded
    h = attach(model, "random", 0.5)
    (image,) = h.family.images({"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]})
    h.detach()
    tiles = inputs["pixel_values"][0]
    with torch.no_grad():
        att = model.model.vision_tower(tiles, output_attentions=True).attentions[h.family.attn_layer]
    cls = att[:, :, 0, 1:].mean(1)                           # [5 tiles, 9 patches]
    want = list(cls[0])                                      # the base tile, row-major
    for y in range(2 * SIDE):                                # the high-res grid, row-major
        for x in range(2 * SIDE):
            want.append(cls[1 + (y // SIDE) * 2 + x // SIDE, (y % SIDE) * SIDE + x % SIDE])
    torch.testing.assert_close(image.vt.cls_attn[0], torch.stack(want), rtol=1e-4, atol=1e-6)
    assert image.vt.grid == (1, 45) and image.slots == 51


def test_next_the_question_reaches_the_text_side():
    model = tiny_next()
    with attach(model, "recoverable", 0.25, tokenizer=TOK) as h:
        model(**next_inputs(model, QS, [0, 1]))
    assert h.last_question_ids == [TOK(q, add_special_tokens=False)["input_ids"] for q in QS]


def test_next_detach_restores_the_model():
    model = tiny_next()
    inputs = next_inputs(model, QS[:1], [0])
    ref = model(**inputs).logits
    h = attach(model, "random", 0.25)
    assert model(**inputs).logits.shape[1] < ref.shape[1]
    h.detach()
    assert "get_image_features" not in vars(model.model) and not model.model._forward_pre_hooks
    torch.testing.assert_close(model(**inputs).logits, ref)


@pytest.mark.parametrize("method,params", [("pool", {}), ("recoverable_spread", {})])
def test_next_refuses_methods_that_need_one_grid_in_one_line(method, params):
    with pytest.raises(ValueError) as err:
        attach(tiny_next(), method, 0.25, tokenizer=TOK, **params)
    msg = str(err.value)
    assert "\n" not in msg and method in msg and "LlavaNextForConditionalGeneration" in msg


# --- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------
# 14 px patches merged 2 x 2: a (1, 8, 8) patch grid is 16 tokens on a 4 x 4 grid, (1, 6, 8) 12.
QWEN_GRIDS = [(1, 8, 8), (1, 6, 8)]
SPECIAL_IDS = {t: TOK.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}


def tiny_qwen(cls=Qwen2VLForConditionalGeneration, seed: int = 0, **vision) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = dict(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.3,      # with a tiny LM's default 0.02, positions barely move the logits
                rope_parameters={"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 1, 1]},
                pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    if cls is Qwen2VLForConditionalGeneration:
        config_cls = Qwen2VLConfig
        vis = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=32, mlp_ratio=2)
    else:
        config_cls = Qwen2_5_VLConfig
        vis = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                   fullatt_block_indexes=[1])
    vis.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision)
    cfg = config_cls(text_config=text, vision_config=vis, image_token_id=PAD_ID,
                     video_token_id=SPECIAL_IDS["<|video_pad|>"],
                     vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
                     vision_end_token_id=SPECIAL_IDS["<|vision_end|>"])
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = TOK.pad_token_id
    model.generation_config.eos_token_id = None        # every row generates all its tokens
    return model


def qwen_inputs(questions: list[str], images: list[int], scales: list[float] | None = None) -> dict:
    grids = [QWEN_GRIDS[i] for i in images]
    pixels = [torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3 + i))
              * (scales[j] if scales else 1.0) for j, (i, (t, h, w)) in enumerate(zip(images, grids))]
    texts = [f"<|im_start|>system you are a helpful assistant .<|im_end|>\n<|im_start|>user\n<|vision_start|>"
             f"{'<|image_pad|>' * (t * h * w // 4)}<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
             for q, (t, h, w) in zip(questions, grids)]
    ids, mask = left_pad([TOK(t, add_special_tokens=False)["input_ids"] for t in texts], TOK.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == PAD_ID).int(),
            "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}


def qwen_by_hand(model, h, inputs) -> dict:
    """The reference: the kept tokens written into the prompt by hand, each with the M-RoPE
    position the model gives its placeholder (merged: its centre's) in the uncompressed prompt."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    emb = model.get_input_embeddings()(ids)
    rows, prows = [], []
    for r in range(ids.shape[0]):
        keep = mask[r].bool()
        real, e, p = ids[r][keep], emb[r][keep], pos[:, r][:, keep]
        first, n = int((real == PAD_ID).nonzero()[0]), int((real == PAD_ID).sum())
        k = int(h.last.mask[r].sum())
        rows.append(torch.cat([e[:first], h.last.tokens[r, :k], e[first + n:]]))
        prows.append(torch.cat([p[:, :first], p[:, first + h.last.position[r, :k]], p[:, first + n:]], 1).T)
    out, m = pad_rows(rows)
    rope, _ = pad_rows([x.float() for x in prows])
    text = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
    return {"inputs_embeds": out, "attention_mask": m,
            "position_ids": torch.cat([text[None], rope.long().permute(2, 0, 1)])}


QWENS = [Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration]


@pytest.mark.parametrize("cls", QWENS)
def test_qwen_budget_one_equals_the_stock_model(cls):
    model = tiny_qwen(cls)
    inputs = qwen_inputs(QS, [0, 1])
    ref = gen(model, inputs)
    with attach(model, "recoverable", 1.0, tokenizer=TOK) as h:
        got = gen(model, inputs)
        assert h.stats["tokens"] == h.stats["total"] == [16, 12]
        logits = model(**inputs).logits
    assert_same(got, ref)
    torch.testing.assert_close(logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,method,budget", [(QWENS[0], "recoverable", 0.25), (QWENS[0], "visionzip", 0.5),
                                               (QWENS[0], "pool", 0.25), (QWENS[0], "recoverable_spread", 0.5),
                                               (QWENS[1], "prumerge", None)])
def test_qwen_compressed_generation_equals_kept_tokens_at_their_original_positions(cls, method, budget):
    model = tiny_qwen(cls)
    inputs = qwen_inputs(QS, [0, 1])
    with attach(model, method, budget, tokenizer=TOK) as h:
        got = gen(model, inputs)
    assert all(k < n for k, n in zip(h.stats["tokens"], h.stats["total"]))
    assert_same(got, gen(model, qwen_by_hand(model, h, inputs)))


@pytest.mark.parametrize("method", ["prumerge_plus", "recoverable"])
def test_qwen_a_batch_with_different_token_counts_equals_its_rows_one_by_one(method):
    model = tiny_qwen()
    inputs = qwen_inputs(QS, [0, 1], scales=[1.0, 3.0])
    with attach(model, method, None, tokenizer=TOK) as h:       # adaptive
        got = gen(model, inputs)
        assert h.stats["total"] == [16, 12]
        singles = [gen(model, qwen_inputs(QS[r:r + 1], [r], scales=[[1.0, 3.0][r]])) for r in range(2)]
    for r, one in enumerate(singles):
        assert torch.equal(got[0][r:r + 1], one[0])
        torch.testing.assert_close(got[1][r:r + 1], one[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", QWENS)
def test_qwen_kv_cache_decoding_equals_recomputing(cls):
    model = tiny_qwen(cls)
    inputs = qwen_inputs(QS, [0, 1])
    with attach(model, "recoverable", 0.25, tokenizer=TOK):
        assert_same(gen(model, inputs), gen(model, inputs, use_cache=False))


def test_qwen_detach_restores_the_model():
    model = tiny_qwen()
    inputs = qwen_inputs(QS[:1], [0])
    ref = model(**inputs).logits
    h = attach(model, "pool", 0.25)
    assert model(**inputs).logits.shape[1] == ref.shape[1] - 12
    h.detach()
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    assert not hooked
    torch.testing.assert_close(model(**inputs).logits, ref)


def test_qwen_the_question_reaches_the_text_side_not_the_template():
    model = tiny_qwen()
    with attach(model, "recoverable", 0.25, tokenizer=TOK) as h:
        model(**qwen_inputs(QS, [0, 1]))
    assert h.last_question_ids == [TOK(q, add_special_tokens=False)["input_ids"] for q in QS]


def test_qwen_received_attention_is_a_distribution_over_the_merged_tokens():
    model = tiny_qwen()
    inputs = qwen_inputs(QS, [0, 1])
    with attach(model, "random", 0.5) as h:
        images = h.family.images({k: inputs[k] for k in ("pixel_values", "image_grid_thw")})
    assert [im.vt.grid for im in images] == [(4, 4), (3, 4)]
    for im in images:
        torch.testing.assert_close(im.vt.cls_attn.sum(), torch.tensor(1.0))
        torch.testing.assert_close(im.vt.cls_attn_full.sum(), torch.tensor(1.0))


def test_qwen25_scores_do_not_depend_on_the_window_order():
    # With every block full attention, the window size only reorders the tokens inside the
    # tower: the scores, back in the output order, must not change.
    inputs = qwen_inputs(QS[:1], [0])
    scores = []
    for window in (56, 448):             # 4 windows of 2 x 2 merged tokens, or one window
        model = tiny_qwen(QWENS[1], window_size=window, fullatt_block_indexes=[0, 1])
        with attach(model, "random", 0.5) as h:
            (im,) = h.family.images({k: inputs[k] for k in ("pixel_values", "image_grid_thw")})
        scores.append((im.vt.cls_attn, im.vt.keys))
    torch.testing.assert_close(scores[0][0], scores[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores[0][1], scores[1][1], rtol=1e-4, atol=1e-6)
