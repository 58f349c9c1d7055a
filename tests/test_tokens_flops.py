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
