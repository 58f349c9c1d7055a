"""The adapter on a tiny random llava-1.5-shaped model, loaded through the paper profile's loader."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lvlm_helpers import save_tiny_lvlm
from vlmcompress.lvlm import LVLM, ModelNotAvailableError, Prompts, load_lvlm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_lvlm(tmp_path_factory.mktemp("tiny") / "lvlm")


@pytest.fixture(scope="module")
def lvlm(tiny_dir) -> LVLM:
    return load_lvlm(str(tiny_dir / "llava"), str(tiny_dir / "clip"))


def test_loaded_model_has_llava15_shape(lvlm):
    cfg = lvlm.llava.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert type(lvlm.vision_tower).__name__ == "CLIPVisionModel"


def test_visual_features_and_cls_attention_match_eager_attention(lvlm):
    imgs = torch.rand(2, 3, 56, 56)
    f = lvlm.visual_features(imgs)
    assert f.tokens.shape == (2, 16, 32) and f.hidden.shape == (2, 16, 32) and f.grid == (4, 4)
    assert f.cls_attn.shape == (2, 16) and f.cls_attn_heads.shape == (2, 2, 16) and f.keys.shape == (2, 16, 32)
    tower = lvlm.vision_tower
    old = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        ref = tower(lvlm.preprocess(imgs), output_attentions=True, return_dict=True).attentions[-1]
    finally:
        tower.set_attn_implementation(old)
    torch.testing.assert_close(f.cls_attn_heads, ref[:, :, 0, 1:], rtol=1e-4, atol=1e-6)
    # The hook is gone afterwards: the module has no leftover hooks.
    assert not tower.encoder.layers[-1].self_attn._forward_pre_hooks


def test_gradients_reach_pixels_from_lm_loss_and_token_loss(lvlm):
    imgs = torch.rand(2, 3, 56, 56, requires_grad=True)
    loss = lvlm.answer_loss(imgs, ["what color is the circle?"] * 2, ["red", "blue"])
    loss.backward()
    assert torch.isfinite(loss) and imgs.grad is not None and imgs.grad.abs().sum() > 0
    imgs2 = torch.rand(1, 3, 60, 50, requires_grad=True)  # any size: resized differentiably
    lvlm.visual_features(imgs2).tokens.pow(2).mean().backward()
    assert imgs2.grad.abs().sum() > 0


def test_batched_generation_equals_one_by_one(lvlm):
    torch.manual_seed(1)
    imgs = torch.rand(3, 3, 56, 56)
    qs = ["what color is the circle?", "how many", "is there a small red square?"]
    batched = lvlm.generate(imgs, qs, max_new_tokens=6)
    single = [lvlm.generate(imgs[i:i + 1], [qs[i]], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single


def test_batched_generation_with_different_token_counts(lvlm):
    """A transform that keeps a different number of tokens per image still batches exactly."""
    keep = [16, 5, 9]

    def transform(feats, texts):
        mask = torch.zeros(feats.tokens.shape[:2], dtype=torch.bool)
        for i, k in enumerate(keep):
            mask[i, :k] = True
        return feats.tokens, mask

    imgs = torch.rand(3, 3, 56, 56)
    qs = ["what color is the circle?"] * 3
    batched = lvlm.generate(imgs, qs, transform=transform, max_new_tokens=5)
    single = []
    for i, k in enumerate(keep):
        single += lvlm.generate(imgs[i:i + 1], qs[i:i + 1], max_new_tokens=5,
                                transform=lambda f, t, k=k: (f.tokens[:, :k], torch.ones(1, k, dtype=torch.bool)))
    assert batched == single


def test_text_encoder_sees_the_question_not_the_template(lvlm):
    """The seed paper's official code feeds the system prompt; ours must feed the question."""
    lvlm.prompts = Prompts(system="a chat between a curious human and an assistant.")
    seen: list[list[str]] = []
    hook = lvlm.clip.text_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(lvlm.clip_tokenizer.batch_decode(kw["input_ids"], skip_special_tokens=True)),
        with_kwargs=True)
    try:
        lvlm.generate(torch.rand(2, 3, 56, 56), ["what color is the circle?", "how many red"],
                      transform=lambda f, texts: (lvlm.text_embeddings(texts) is not None and f.tokens,
                                                  torch.ones(f.tokens.shape[:2], dtype=torch.bool)),
                      max_new_tokens=2)
    finally:
        hook.remove()
        lvlm.prompts = Prompts()
    # Decoding a word-level tokenizer puts spaces between words: compare word by word.
    assert [[t.replace(" ", "") for t in batch] for batch in seen] == [["whatcoloristhecircle?", "howmanyred"]]


def test_text_embeddings_pool_at_eos_regardless_of_padding(lvlm):
    both = lvlm.text_embeddings(["a red circle", "how many blue squares are there"])
    one = lvlm.text_embeddings(["a red circle"])
    torch.testing.assert_close(both[0], one[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(both.norm(dim=-1), torch.ones(2))
    emb = lvlm.patch_embeddings(lvlm.visual_features(torch.rand(1, 3, 56, 56)))
    assert emb.shape == (1, 16, 16)


def test_missing_weights_give_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as exc:
        load_lvlm("llava-hf/llava-1.5-7b-hf", "openai/clip-vit-large-patch14-336")
    msg = str(exc.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "\n" not in msg
    with pytest.raises(ModelNotAvailableError, match="cannot load LLaVA model from folder"):
        (tmp_path / "empty").mkdir()
        load_lvlm(str(tmp_path / "empty"), "x")


def test_shared_image_prefix_equals_separate_images(lvlm):
    """Several questions per image: one tower pass and a shared prefill give the same answers."""
    torch.manual_seed(2)
    imgs = torch.rand(2, 3, 56, 56)
    qs = ["what color is the circle?", "how many", "is there a red square?", "a"]
    index = [0, 1, 1, 0]
    shared = lvlm.generate(imgs, qs, image_index=index, max_new_tokens=5)
    separate = lvlm.generate(imgs[index], qs, max_new_tokens=5)
    assert shared == separate
    # A transform sees the features repeated per sample.
    seen = []
    lvlm.generate(imgs, qs, image_index=index, max_new_tokens=1,
                  transform=lambda f, t: (seen.append(f.tokens.shape[0]) or f.tokens,
                                          torch.ones(f.tokens.shape[:2], dtype=torch.bool)))
    assert seen == [4]


def test_token_compressor_plugs_into_generation(lvlm):
    """Text-guided recovery at a fixed budget: K tokens per image, batch == one by one."""
    from vlmcompress.tokens.patch import TokenCompressor

    imgs = torch.rand(3, 3, 56, 56)
    qs = ["what color is the circle?", "how many red", "is there a small square?"]
    comp = TokenCompressor(lvlm, "recoverable", budget=0.25)
    batched = lvlm.generate(imgs, qs, transform=comp, max_new_tokens=4)
    assert comp.kept == [4, 4, 4] and comp.last.tokens.shape[:2] == (3, 4)
    single = [lvlm.generate(imgs[i:i + 1], qs[i:i + 1], transform=TokenCompressor(lvlm, "recoverable", budget=0.25),
                            max_new_tokens=4)[0] for i in range(3)]
    assert batched == single
    feats = lvlm.visual_features(imgs)
    assert feats.cls_attn_full.shape == (3, 16)
    assert bool((feats.cls_attn_full.sum(1) <= 1 + 1e-5).all())


def test_image_only_compressor_shares_the_prefill_and_matches_per_sample(lvlm):
    """Adaptive PruMerge keeps different counts per image; sharing one prefill per image gives
    the same answers as the per-sample path (the lambda hides ``uses_text = False``)."""
    from vlmcompress.tokens.patch import TokenCompressor

    torch.manual_seed(3)
    imgs = torch.rand(2, 3, 56, 56)
    qs = ["what color is the circle?", "how many", "is there a red square?", "a"]
    index = [0, 1, 1, 0]
    comp = TokenCompressor(lvlm, "prumerge", budget=None)
    shared = lvlm.generate(imgs, qs, image_index=index, transform=comp, max_new_tokens=5)
    assert len(comp.kept) == 2            # compressed once per image, not once per question
    ref = TokenCompressor(lvlm, "prumerge", budget=None)
    per_sample = lvlm.generate(imgs, qs, image_index=index, transform=lambda f, t: ref(f, t), max_new_tokens=5)
    assert len(ref.kept) == 4 and shared == per_sample


def test_token_compressor_text_encoder_gets_the_question_not_the_system_prompt(lvlm):
    """The official Recoverable Compression code embeds the prompt's first line (the system
    prompt); ours embeds the raw question, through the real TokenCompressor."""
    from vlmcompress.tokens.patch import TextEmbeddingCache, TokenCompressor

    lvlm.prompts = Prompts(system="a chat between a curious human and an assistant.")
    seen: list[list[str]] = []
    hook = lvlm.clip.text_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(lvlm.clip_tokenizer.batch_decode(kw["input_ids"], skip_special_tokens=True)),
        with_kwargs=True)
    qs = ["what color is the circle?", "how many red", "what color is the circle?"]
    try:
        comp = TokenCompressor(lvlm, "recoverable", budget=0.5, text_encoder=TextEmbeddingCache(lvlm))
        lvlm.generate(torch.rand(3, 3, 56, 56), qs, transform=comp, max_new_tokens=2)
        lvlm.generate(torch.rand(3, 3, 56, 56), qs, transform=comp, max_new_tokens=2)   # cached: no new pass
        lvlm.generate(torch.rand(1, 3, 56, 56), None, task="caption",
                      transform=TokenCompressor(lvlm, "recoverable", budget=0.5), max_new_tokens=2)
    finally:
        hook.remove()
        lvlm.prompts = Prompts()
    words = [[t.replace(" ", "") for t in batch] for batch in seen]
    # Each distinct question once; a caption is guided by its instruction, never by the template.
    assert words == [["whatcoloristhecircle?", "howmanyred"], ["provideaone-sentencecaptionfortheprovidedimage."]]
    # The cached embeddings equal a direct encoding.
    cache = TextEmbeddingCache(lvlm)
    torch.testing.assert_close(cache(qs), lvlm.text_embeddings(qs), rtol=1e-5, atol=1e-6)


def test_grid_position_shift_counts_only_real_tokens():
    from vlmcompress.lvlm.adapter import grid_position_shift

    vmask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    positions = torch.tensor([[3, 0, 7, 15], [5, 9, 0, 0]])
    shift, tail = grid_position_shift(vmask, positions, n_grid=16)
    # Real slots are the 0th, 1st, 2nd real token: grid index minus that rank; padding gets 0.
    assert shift.tolist() == [[3, 0, 6, 13], [5, 8, 0, 0]]
    assert tail.tolist() == [16 - 3, 16 - 2]


def _greedy_with_tokens_at_grid_positions(lvlm, imgs, question, keep, steps):
    """Reference: greedy decoding of the full prompt with the dropped visual tokens hidden by
    the attention mask and every token at its uncompressed position, no cache -> ``[B, steps]``."""
    feats = lvlm.visual_features(imgs)
    b, n, _ = feats.tokens.shape
    embeds, mask, _, visual = lvlm._assemble(feats.tokens, torch.ones(b, n, dtype=torch.bool),
                                             lvlm._prompt_ids("vqa", [question] * b), left_pad=False)
    mask = mask.clone()
    mask[visual] = keep.flatten().long()
    out = []
    for _ in range(steps):
        pos = torch.arange(mask.shape[1]).expand(b, -1)
        h = lvlm.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)       # the last token that is not masked out
        nxt = lvlm.llava.lm_head(h[torch.arange(b), last]).argmax(-1)
        out.append(nxt)
        embeds = torch.cat([embeds, lvlm.llava.get_input_embeddings()(nxt)[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("template", ["USER: <image>\n{instruction} ASSISTANT:", "USER: {instruction} <image>"])
@pytest.mark.parametrize("text_guided", [False, True])
def test_grid_positions_equal_the_full_sequence_with_dropped_tokens_masked(lvlm, text_guided, template):
    """Kept tokens at their grid positions, text after the whole grid: greedy answers equal those
    of the uncompressed sequence with the dropped tokens masked out, on the shared-prefix path
    (image-only transform) and the per-sample path (text-guided), also when nothing follows
    the image (generated tokens then come straight after the grid)."""
    import dataclasses

    saved = lvlm.prompts
    lvlm.prompts = dataclasses.replace(saved, template=template)
    torch.manual_seed(4)
    imgs = torch.rand(2, 3, 56, 56)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, [1, 6, 7, 12]] = True
    keep[1, [0, 15]] = True                     # a different count per image: padding in the batch

    def transform(feats, texts):
        k = int(keep.sum(1).max())
        idx = torch.stack([torch.cat([r.nonzero().flatten(), r.new_zeros(k - int(r.sum()), dtype=torch.long)])
                           for r in keep])
        vmask = torch.arange(k)[None] < keep.sum(1, keepdim=True)
        return feats.tokens.gather(1, idx[..., None].expand(-1, -1, feats.tokens.shape[-1])), vmask, idx

    transform.uses_text = text_guided
    q = "what color is the circle?"
    try:
        ref = _greedy_with_tokens_at_grid_positions(lvlm, imgs, q, keep, steps=4)
        got = lvlm.generate(imgs, [q, q], transform=transform, max_new_tokens=4)
    finally:
        lvlm.prompts = saved
    expect = []
    for row in ref.tolist():
        ids = row[:next((i for i, t in enumerate(row) if t in lvlm.eos_ids), len(row))]
        expect.append(lvlm.tokenizer.decode(ids, skip_special_tokens=True).strip())
    assert got == expect


def test_compressed_positions_put_merged_tokens_at_their_centres():
    from vlmcompress.tokens.methods import compress
    from vlmcompress.tokens.types import KIND_GLOBAL, KIND_MERGED, KIND_PAD, VisualTokens

    torch.manual_seed(0)
    b, n, d = 2, 16, 8
    attn = torch.softmax(torch.randn(b, n), -1)
    vt = VisualTokens(tokens=torch.randn(b, n, d), keys=torch.randn(b, n, d), cls_attn=attn, cls_attn_full=None,
                      text_sim=torch.randn(b, n), grid=(4, 4))
    out = compress(vt, "recoverable", budget=6)
    kept = out.source >= 0
    assert torch.equal(out.position[kept], out.source[kept])
    merged = out.kind == KIND_MERGED
    centre_cells = [set(r.nonzero().flatten().tolist()) for r in (out.cells == KIND_MERGED)]
    for i in range(b):
        assert set(out.position[i][merged[i]].tolist()) == centre_cells[i]
    assert bool((out.position[out.kind == KIND_GLOBAL] == n - 1).all())
    assert bool((out.position[out.kind == KIND_PAD] == 0).all())
    pooled = compress(vt, "pool", budget=4)          # 2 x 2 cells of a 4 x 4 grid: centres (1, 1), (1, 3), ...
    assert pooled.position[0].tolist() == [5, 7, 13, 15]
