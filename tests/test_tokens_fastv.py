"""FastV: pruning inside the LM of a tiny random llava-1.5-shaped model (3 LM layers, GQA)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from lvlm_helpers import TINY, save_tiny_lvlm, with_lm
from vlmcompress.lvlm import load_lvlm
from vlmcompress.tokens import fastv_keep
from vlmcompress.tokens.config import FastVParams, TokensParams
from vlmcompress.tokens.fastv import FastV, additive_mask, compact
from vlmcompress.tokens.patch import make_transform

QS = ["what color is the circle?", "how many", "is there a small red square of a blue circle?"]
N = 16  # visual tokens of the tiny tower (4 x 4)


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory):
    spec = with_lm(TINY, lm_layers=3, lm_heads=4, lm_hidden=32)
    folder = save_tiny_lvlm(tmp_path_factory.mktemp("fastv") / "lvlm", spec, kv_heads=2, seed=1)
    return load_lvlm(str(folder / "llava"), str(folder / "clip"))


@pytest.fixture(params=["eager", "sdpa"])
def attn(request, lvlm):
    lm = lvlm.language_model
    old = lm.config._attn_implementation
    lm.set_attn_implementation(request.param)
    yield request.param
    lm.set_attn_implementation(old)


def _inputs_from(lvlm, vis, qs):
    embeds, mask, _, visual = lvlm._assemble(vis, torch.ones(vis.shape[:2], dtype=torch.bool),
                                             lvlm._prompt_ids("vqa", qs))
    return embeds, mask, visual


def _inputs(lvlm, imgs, qs):
    return _inputs_from(lvlm, lvlm.visual_features(imgs).tokens, qs)


def _prefill(fv, lvlm, embeds, mask, visual):
    """Per-sample layout: the whole prompt as the prefix, no suffix."""
    return fv.prefill(lvlm, embeds, mask, visual, torch.arange(embeds.shape[0]), embeds[:, :0], mask[:, :0])


def test_helpers_mask_and_compact():
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    a = additive_mask(m, 3, torch.float32)
    assert a.shape == (2, 1, 3, 3)
    allowed = a[:, 0] == 0
    assert allowed[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert allowed[0, 2].tolist() == [False, True, True]          # padding key hidden
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    idx = compact(keep)
    assert idx.shape == (2, 3)
    assert keep.gather(1, idx).tolist() == [[False, True, True], [True, True, True]]
    assert idx[0, 1:].tolist() == [0, 2] and idx[1].tolist() == [1, 2, 3]


@torch.inference_mode()
def test_scores_are_layer_k_attention_of_the_last_token(lvlm, attn):
    """The one attention row FastV forms equals the eager attention map of layer K, with
    left padding and grouped-query attention; the kept set is FastV's rule on it."""
    torch.manual_seed(0)
    embeds, mask, visual = _inputs(lvlm, torch.rand(3, 3, 56, 56), QS)
    fv = FastV(budget=0.25, layer=2)
    _prefill(fv, lvlm, embeds, mask, visual)
    lm = lvlm.language_model
    old = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_attentions=True)
    finally:
        lm.set_attn_implementation(old)
    ref = out.attentions[1][:, :, -1].mean(1)                     # layer K = 2, last query, mean heads
    torch.testing.assert_close(fv.scores, ref, rtol=1e-4, atol=1e-6)
    for b in range(3):
        vis_ref = ref[b][visual[b]].unsqueeze(0)
        keep = fastv_keep(vis_ref, 4)[0]
        assert fv.last_keep[b].nonzero().flatten().tolist() == keep.tolist()
    assert fv.kept == [4, 4, 4]


def test_budget_all_equals_unpruned_generation(lvlm, attn):
    torch.manual_seed(1)
    imgs = torch.rand(3, 3, 56, 56)
    full = lvlm.generate(imgs, QS, max_new_tokens=6)
    assert lvlm.generate(imgs, QS, transform=FastV(budget=1.0, layer=2), max_new_tokens=6) == full
    # Pruning after the last layer changes nothing either, at any budget.
    assert lvlm.generate(imgs, QS, transform=FastV(budget=0.25, layer=3), max_new_tokens=6) == full


@torch.inference_mode()
def test_budget_all_logits_equal_the_dense_lm(lvlm, attn):
    torch.manual_seed(2)
    embeds, mask, visual = _inputs(lvlm, torch.rand(2, 3, 56, 56), QS[:2])
    logits, _ = _prefill(FastV(budget=N, layer=1), lvlm, embeds, mask, visual)
    dense, _ = lvlm._lm_step(embeds, mask, None, 0)
    torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-5)


def test_batch_equals_one_by_one(lvlm, attn):
    torch.manual_seed(3)
    imgs = torch.rand(2, 3, 56, 56)
    index = [0, 1, 1]
    fv = FastV(budget=0.25, layer=1)
    batched = lvlm.generate(imgs, QS, image_index=index, transform=fv, max_new_tokens=6)
    single = [lvlm.generate(imgs[i:i + 1], [q], transform=FastV(budget=0.25, layer=1), max_new_tokens=6)[0]
              for i, q in zip(index, QS)]
    assert batched == single and fv.kept == [4, 4, 4]


@torch.inference_mode()
def test_shared_prefix_layout_equals_per_sample_layout(lvlm, attn):
    """Layers 1..K run once per image prefix, then per question: same logits, same choice."""
    torch.manual_seed(5)
    feats = lvlm.visual_features(torch.rand(2, 3, 56, 56))
    index = torch.tensor([0, 1, 1])
    prompts = lvlm._prompt_ids("vqa", QS)
    ones = torch.ones(2, N, dtype=torch.bool)
    parts = lvlm._split_inputs(feats.tokens, ones, prompts[0][0], [p for _, p in prompts])
    shared = FastV(budget=0.25, layer=2)
    logits_s, _ = shared.prefill(lvlm, *parts[:3], index, *parts[3:])
    embeds, mask, visual = _inputs_from(lvlm, feats.tokens[index], QS)
    single = FastV(budget=0.25, layer=2)
    logits_p, _ = _prefill(single, lvlm, embeds, mask, visual)
    torch.testing.assert_close(logits_s, logits_p, rtol=1e-4, atol=1e-5)
    assert torch.equal(shared.last_keep, single.last_keep)


def _tail_model(lvlm, K: int) -> LlamaModel:
    """Layers K.. of the LM as a model of their own (weights copied), to check FastV's second
    half against transformers' own forward on the kept tokens."""
    lm = lvlm.language_model
    cfg = LlamaConfig(**{**lm.config.to_dict(), "num_hidden_layers": len(lm.layers) - K})
    cfg._attn_implementation = lm.config._attn_implementation
    tail = LlamaModel(cfg).eval()
    state = {}
    for k, v in lm.state_dict().items():
        if k.startswith("layers."):
            i = int(k.split(".")[1])
            if i < K:
                continue
            k = ".".join(["layers", str(i - K)] + k.split(".")[2:])
        state[k] = v
    tail.load_state_dict(state)
    return tail


@torch.inference_mode()
def test_pruned_tokens_are_absent_from_the_cache_after_layer_k(lvlm, attn):
    torch.manual_seed(4)
    K, keep = 1, 5
    embeds, mask, visual = _inputs(lvlm, torch.rand(1, 3, 56, 56), QS[2:])
    T = embeds.shape[1]
    fv = FastV(budget=keep, layer=K)
    logits, decoder = _prefill(fv, lvlm, embeds, mask, visual)
    layers = fv.cache.layers
    assert [l.keys.shape[2] for l in layers] == [T, T - (N - keep), T - (N - keep)]

    # Reference: transformers' forward of layers K.. on the hidden states after layer K with the
    # dropped visual tokens removed (original positions kept) gives the same logits and cache.
    lm = lvlm.language_model
    pos = torch.arange(T).unsqueeze(0)
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                output_hidden_states=True).hidden_states[K]
    vis_idx = visual[0].nonzero().flatten()
    kept_pos = torch.cat([torch.arange(T)[~visual[0]], vis_idx[fv.last_keep[0]]]).sort().values
    tail = _tail_model(lvlm, K)
    out = tail(inputs_embeds=hidden[:, kept_pos], position_ids=kept_pos.unsqueeze(0), use_cache=True)
    torch.testing.assert_close(logits, lvlm.llava.lm_head(out.last_hidden_state[:, -1]), rtol=1e-4, atol=1e-5)
    for i in range(len(lm.layers) - K):
        torch.testing.assert_close(layers[K + i].keys, out.past_key_values.layers[i].keys, rtol=1e-4, atol=1e-5)

    # Decoding continues on the pruned cache: each step adds one column to every layer.
    decoder.step(lvlm.llava.get_input_embeddings()(logits.argmax(-1))[:, None])
    assert [l.keys.shape[2] for l in layers] == [T + 1, T - (N - keep) + 1, T - (N - keep) + 1]


def test_registered_in_the_harness_with_its_params(lvlm):
    p = TokensParams(fastv=FastVParams(layer=1))
    t = make_transform(lvlm, "fastv", 0.5, p)
    assert isinstance(t, FastV) and t.layer == 1 and t.budget == 0.5
    with pytest.raises(ValueError, match="no adaptive mode"):
        make_transform(lvlm, "fastv", None, p)
    with pytest.raises(ValueError, match=r"tokens\.fastv\.layer: must be in \[1, 3\]"):
        lvlm.generate(torch.rand(1, 3, 56, 56), QS[:1], transform=FastV(budget=0.5, layer=4), max_new_tokens=1)


def test_answer_loss_refuses_in_lm_pruning(lvlm):
    with pytest.raises(ValueError, match="inside the LM is not supported"):
        lvlm.answer_loss(torch.rand(1, 3, 56, 56), QS[:1], ["red"], transform=FastV(budget=0.5, layer=1))
