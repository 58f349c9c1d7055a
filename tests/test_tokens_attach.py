"""attach(): a token method on a stock transformers LLaVA, through its own generate/forward."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmcompress.lvlm.tokenizer import build_tokenizers, build_vocab
from vlmcompress.tokens import attach

from lvlm_helpers import gen, left_pad, pad_rows

WORDS = "a chat between user and assistant : what color is the circle square red blue how many are there".split()
VOCAB = build_vocab(WORDS, ["?", ".", "\n"])
TOK, _ = build_tokenizers(VOCAB)
IMAGE_ID = TOK.convert_tokens_to_ids("<image>")
N = 16                                    # 56 px / patch 14 = a 4 x 4 grid


def tiny_llava(seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=2, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id,
                                eos_token_id=TOK.eos_token_id),
        image_token_id=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        pad_token_id=TOK.pad_token_id)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = TOK.pad_token_id
    return model


def prompts(questions: list[str], images: int | None = None) -> dict:
    """LLaVA-1.5-style prompts, left-padded, with N placeholders per image."""
    texts = [f"a chat between user and assistant . user : {'<image> ' * N}\n{q} assistant :" for q in questions]
    ids, mask = left_pad([TOK(t, add_special_tokens=False)["input_ids"] for t in texts], TOK.pad_token_id)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(len(texts) if images is None else images, 3, 56, 56, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


QS = ["what color is the circle ?", "how many red square are there ?"]


def test_budget_one_equals_the_stock_model():
    model = tiny_llava()
    inputs = prompts(QS)
    ref_ids, ref_logits = gen(model, inputs)
    with attach(model, "recoverable", 1.0, tokenizer=TOK) as h:
        ids, logits = gen(model, inputs)
        assert h.stats["tokens"] == [N, N]
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_detach_restores_the_model_and_two_models_stay_independent():
    a, b = tiny_llava(), tiny_llava()
    inputs = prompts(QS[:1])
    ref = a(**inputs).logits
    h = attach(a, "random", 0.25)
    assert a(**inputs).logits.shape[1] == ref.shape[1] - (N - 4)
    torch.testing.assert_close(b(**inputs).logits, ref)          # the other instance is untouched
    h.detach()
    assert not a.model._forward_pre_hooks
    torch.testing.assert_close(a(**inputs).logits, ref)


def _by_hand(model, h, inputs):
    """The reference: the kept tokens written into the prompt by hand, fed as inputs_embeds."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    emb = model.get_input_embeddings()(ids)
    rows = []
    for r in range(ids.shape[0]):
        real = ids[r][mask[r].bool()]
        e = emb[r][mask[r].bool()]
        first = int((real == IMAGE_ID).nonzero()[0])
        k = int(h.last.mask[r].sum())
        rows.append(torch.cat([e[:first], h.last.tokens[r, :k], e[first + N:]]))
    out, m = pad_rows(rows)
    return {"inputs_embeds": out, "attention_mask": m}


@pytest.mark.parametrize("method,budget", [("recoverable", 0.25), ("visionzip", 0.5), ("prumerge", None)])
def test_compressed_generation_equals_feeding_the_kept_tokens_by_hand(method, budget):
    model = tiny_llava()
    inputs = prompts(QS[:1])
    with attach(model, method, budget, tokenizer=TOK) as h:
        ids, logits = gen(model, inputs)
    ref_ids, ref_logits = gen(model, _by_hand(model, h, inputs))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prumerge_plus", "recoverable"])
def test_a_batch_with_different_counts_equals_its_rows_one_by_one(method):
    model = tiny_llava()
    inputs = prompts(QS)
    g = torch.Generator().manual_seed(1)
    inputs["pixel_values"] = torch.randn(2, 3, 56, 56, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    with attach(model, method, None, tokenizer=TOK) as h:      # adaptive: counts differ per image
        ids, logits = gen(model, inputs)
        counts = h.stats["tokens"]
        singles = [gen(model, {k: v[r:r + 1] for k, v in inputs.items()}) for r in range(2)]
    assert counts[0] != counts[1], counts
    for r, (one_ids, one_logits) in enumerate(singles):
        assert torch.equal(ids[r:r + 1], one_ids)
        torch.testing.assert_close(logits[r:r + 1], one_logits, rtol=1e-4, atol=1e-5)


def test_kv_cache_decoding_equals_recomputing_and_sdpa_equals_eager():
    sdpa, eager = tiny_llava(attn="sdpa"), tiny_llava(attn="eager")
    inputs = prompts(QS)
    with attach(sdpa, "recoverable", 0.25, tokenizer=TOK), attach(eager, "recoverable", 0.25, tokenizer=TOK):
        cached = gen(sdpa, inputs)
        recomputed = gen(sdpa, inputs, use_cache=False)
        slow = gen(eager, inputs)
    assert torch.equal(cached[0], recomputed[0]) and torch.equal(cached[0], slow[0])
    torch.testing.assert_close(cached[1], recomputed[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached[1], slow[1], rtol=1e-4, atol=1e-5)


def test_the_question_reaches_the_text_encoder_not_the_template():
    model = tiny_llava()
    with attach(model, "recoverable", 0.25, tokenizer=TOK) as h:
        model(**prompts(QS))
    want = [TOK(q, add_special_tokens=False)["input_ids"] for q in QS]
    newline = TOK.convert_tokens_to_ids("\n")
    assert [[t for t in q if t != newline] for q in h.last_question_ids] == want
    with attach(model, "recoverable", 0.25, tokenizer=TOK, questions=["red square", "blue circle"]) as h:
        model(**prompts(QS))
    assert h.last_question_ids == [TOK(q, add_special_tokens=False)["input_ids"] for q in ("red square",
                                                                                         "blue circle")]


def test_question_ids_is_the_user_turn_holding_the_last_image():
    from vlmcompress.tokens.hf_prompt import question_ids

    img, user, assistant = 9, [1, 2], [3, 4]
    ids = [0, 1, 2, 7, 3, 4, 8, 1, 2, img, img, 5, 0, 6, 3, 4, 8]       # system turn, then the image's turn
    assert question_ids(ids, img, user, assistant, ignore={0}) == [5, 6]
    assert question_ids([img, 5, 6], img, user, assistant, ignore=set()) == [5, 6]     # no markers: all of it
    assert question_ids([5, img, 6, 3, 4, 7], img, [], assistant, ignore=set()) == [5, 6]


def test_refusals_are_one_line():
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(ValueError, match="attach: LlamaForCausalLM is not supported"):
        attach(lm, "random", 0.5)
    with pytest.raises(ValueError, match="reads the question; pass tokenizer="):
        attach(tiny_llava(), "recoverable", 0.1)
    with pytest.raises(ValueError, match="unknown token method 'nope'"):
        attach(tiny_llava(), "nope", 0.1)


def test_grid_positions_keep_the_uncompressed_prompt_positions():
    """With ``grid_positions`` each kept token sits at its placeholder's position and the text
    after the image where it was: the same as feeding the kept tokens by hand with those
    position ids."""
    model = tiny_llava()
    inputs = prompts(QS[:1])
    with attach(model, "recoverable", 0.25, tokenizer=TOK, grid_positions=True) as h:
        _, logits = gen(model, inputs)
    ref = _by_hand(model, h, inputs)
    real = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    first = int((real == IMAGE_ID).nonzero()[0])
    slots = h.last.position[0][h.last.mask[0]]
    pos = torch.cat([torch.arange(first), first + slots, torch.arange(first + N, real.shape[0])])
    out = model(**ref, position_ids=pos[None]).logits[:, -1]
    torch.testing.assert_close(logits[:, 0], out, rtol=1e-4, atol=1e-5)
    contiguous = model(**ref).logits[:, -1]
    assert not torch.allclose(out, contiguous, rtol=1e-4, atol=1e-5)     # positions matter here


def test_clip_guidance_needs_its_tokenizer():
    with pytest.raises(ValueError, match="attach: clip= needs clip_tokenizer="):
        attach(tiny_llava(), "recoverable", 0.25, tokenizer=TOK, clip=object())
