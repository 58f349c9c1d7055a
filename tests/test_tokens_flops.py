"""Prefill FLOPs: hand counts on tiny dimensions, published anchors, monotonicity."""
import pytest

from vlmcompress.tokens.flops import (
    LLAVA15_7B, LMDims, ProjectorDims, VisionDims, layer_flops, lm_prefill_flops,
    lm_prefill_flops_fastv, prefill_gflops, projector_flops, vision_tower_flops,
)


def test_vision_tower_hand_count():
    # 4 patches of 2x2x3 -> width 8, one layer, MLP 32, CLS -> T = 5
    dims = VisionDims(layers=1, width=8, mlp_ratio=4.0, patch_size=2, channels=3)
    embed = 2 * 4 * 12 * 8            # 768
    qkvo = 4 * 2 * 5 * 8 * 8          # 2560
    attn = 2 * 2 * 5 * 5 * 8          # Q·Kᵀ and A·V: 800
    mlp = 2 * 2 * 5 * 8 * 32          # 5120
    assert vision_tower_flops(4, dims) == embed + qkvo + attn + mlp == 9248


def test_lm_hand_count_with_gqa_and_head():
    dims = LMDims(layers=1, hidden=8, intermediate=16, vocab=10)
    # 3 text + 2 visual tokens: QKVO 2560, attention 800, SwiGLU 3 * 1280, head 2*8*10
    assert lm_prefill_flops(3, 2, dims) == 2560 + 800 + 3840 + 160
    gqa = LMDims(layers=1, hidden=8, intermediate=16, kv_hidden=4, vocab=10)
    assert lm_prefill_flops(3, 2, gqa) == (1280 + 640) + 800 + 3840 + 160
    assert lm_prefill_flops(3, 2, dims, flops_per_mac=1) == (2560 + 800 + 3840 + 160) / 2


def test_projector_and_total_in_gflops():
    proj = ProjectorDims(8, 16, 16)
    assert projector_flops(4, proj) == 2 * 4 * 8 * 16 + 2 * 4 * 16 * 16
    v = VisionDims(layers=1, width=8, mlp_ratio=4.0, patch_size=2)
    lm = LMDims(layers=1, hidden=16, intermediate=32)
    g = prefill_gflops(n_patches=4, n_visual=2, n_text=3, vision=v, projector=proj, lm=lm)
    assert g["vision"] == pytest.approx(9248 / 1e9)
    assert g["projector"] == pytest.approx(3072 / 1e9)
    assert g["total"] == pytest.approx(g["vision"] + g["projector"] + g["lm"])
    g_k = prefill_gflops(n_patches=4, n_visual=2, n_text=3, vision=v, projector=proj, lm=lm, projector_tokens=2)
    assert g_k["projector"] == pytest.approx(1536 / 1e9)
    with pytest.raises(ValueError, match="n_text"):
        prefill_gflops(n_patches=4, n_visual=2, n_text=-1, vision=v, projector=proj, lm=lm)


def test_attention_term_is_quadratic():
    lin = layer_flops(100, 64, 256) - 2 * 2 * 100 * 100 * 64
    lin2 = layer_flops(200, 64, 256) - 2 * 2 * 200 * 200 * 64
    assert lin2 == pytest.approx(2 * lin)                                   # the rest is linear in T
    assert layer_flops(200, 64, 256) > 2 * layer_flops(100, 64, 256)


def test_published_vit_macs():
    # timm's model cards: ViT-B/16-224 17.6 GMACs, ViT-L/14-224 81.1, ViT-L/14-336 191.1
    assert vision_tower_flops(196, VisionDims(12, 768, 4.0, 16), 1) / 1e9 == pytest.approx(17.6, rel=0.01)
    assert vision_tower_flops(256, VisionDims(24, 1024, 4.0, 14), 1) / 1e9 == pytest.approx(81.1, rel=0.01)
    assert vision_tower_flops(576, LLAVA15_7B[0], 1) / 1e9 == pytest.approx(191.1, rel=0.01)


def test_llava_lm_matches_two_flops_per_parameter_per_token():
    _, _, lm = LLAVA15_7B
    params = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)          # non-embedding weights of Vicuna-7B
    T = 64 + 576
    linear = 2 * params * T
    attention = 32 * 4 * T * T * 4096
    assert lm_prefill_flops(64, 576, lm) == linear + attention + 2 * 4096 * 32000
    # fewer visual tokens, fewer FLOPs; FastV sits between full and pruned-from-the-start
    full = lm_prefill_flops(64, 576, lm)
    pruned = lm_prefill_flops(64, 58, lm)
    fastv = lm_prefill_flops_fastv(64, 576, 58, 2, lm)
    assert pruned < fastv < full
    assert lm_prefill_flops_fastv(64, 576, 58, 0, lm) == pruned
    assert lm_prefill_flops_fastv(64, 576, 58, 32, lm) == full
    with pytest.raises(ValueError, match="agg_layer"):
        lm_prefill_flops_fastv(64, 576, 58, 33, lm)


# --- the formula against torch's FLOP counter on a tiny model with a conv stem ------------------

@pytest.fixture(scope="module")
def stem_lvlm(tmp_path_factory):
    from lvlm_helpers import TINY, save_tiny_lvlm, with_lm
    from vlmcompress.lvlm import load_lvlm

    spec = with_lm(TINY, image_size=32, patch_size=8, stem_layers=3, stem_context=1, lm_layers=3)
    folder = save_tiny_lvlm(tmp_path_factory.mktemp("flops") / "lvlm", spec)
    lvlm = load_lvlm(str(folder / "llava"), str(folder / "clip"))
    lvlm.vision_tower.set_attn_implementation("eager")     # attention as matmuls the counter sees
    lvlm.language_model.set_attn_implementation("eager")
    lvlm.clip.text_model.set_attn_implementation("eager")
    return lvlm


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:   # grad mode on: its module tracker needs autograd
        fn()
    return fc.get_total_flops()


def test_formula_matches_counted_flops_of_a_real_model(stem_lvlm):
    import torch

    from vlmcompress.tokens.fastv import FastV
    from vlmcompress.tokens.flops import model_dims, text_guidance_flops

    lv = stem_lvlm
    vision, projector, lm, text = model_dims(lv)
    assert len(vision.stem) == 4 and lm.layers == 3
    img = lv.preprocess(torch.rand(2, 3, 32, 32))
    N = 16
    assert _count(lambda: lv.vision_tower(img)) == pytest.approx(2 * vision_tower_flops(N, vision), rel=1e-9)
    hidden = torch.randn(2, N, projector.in_dim)
    proj = lv.projector
    assert _count(lambda: proj(hidden)) == pytest.approx(2 * projector_flops(N, projector), rel=1e-9)

    T_text, K = 9, 5
    embeds = torch.randn(1, T_text + N, lm.hidden)
    mask = torch.ones(1, T_text + N, dtype=torch.long)

    def dense():
        h = lv.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        lv.llava.lm_head(h[:, -1])
    # RoPE's tiny position product is the only matmul the formula leaves out.
    assert _count(dense) == pytest.approx(lm_prefill_flops(T_text, N, lm), rel=2e-3)
    visual = torch.zeros(1, T_text + N, dtype=torch.bool)
    visual[0, 3:3 + N] = True
    counted = _count(lambda: FastV(budget=K, layer=1).prefill(lv, embeds, mask, visual, torch.arange(1),
                                                              embeds[:, :0], mask[:, :0]))
    assert counted == pytest.approx(lm_prefill_flops_fastv(T_text, N, K, 1, lm), rel=5e-3)

    enc = lv.clip_tokenizer(["what color is the circle?"], return_tensors="pt")
    n_clip = enc.input_ids.shape[1]
    feats = lv.visual_features(torch.rand(1, 3, 32, 32))
    counted = _count(lambda: (lv.text_embeddings(["what color is the circle?"]), lv.patch_embeddings(feats)))
    assert counted == pytest.approx(text_guidance_flops(n_clip, N, text), rel=1e-9)
