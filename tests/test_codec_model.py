"""Codec model, pre-editing net, losses and params schema (tiny models, tiny images)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from vlmcompress.codec.coder import decode_image, encode_image, image_to_tensor, tensor_to_image
from vlmcompress.codec.config import (CodecModelParams, CodecParams, CodecTrainParams, LossParams,
                                      PreEditParams, check_codec_params)
from vlmcompress.codec.losses import (RANK_LOSSES, CodecLoss, bpp_from_likelihoods, effective_rank,
                                      lambda_at, token_spectrum)
from vlmcompress.codec.model import (MODELS, build_codec, check_rate, inference_ops, interpolate_log_gains,
                                     run_ops, subpixel_weight, weights_hash)
from vlmcompress.codec.preedit import PreEditNet, tokens_to_grid
from vlmcompress.config import ConfigError, from_dict, to_dict

from codec_helpers import TOKEN_DIM, TinyTokens, lively, make_image, model_params

def loss_params(**weights: float) -> LossParams:
    w = {"w_token_mse": 1.0, "w_token_cos": 0.5, "w_rank": 0.5, "w_pixel": 0.01, **weights}
    return LossParams(lambdas=[0.5, 1.0, 2.0], rank_mode="spectrum", **w)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(build_codec(model_params()))


@pytest.mark.parametrize("hw", [(64, 64), (45, 70)])
def test_forward_shapes_any_size(model, hw):
    x = torch.rand(2, 3, *hw)
    tok = TinyTokens()(x)
    with torch.no_grad():
        out = model(x, 1.0, tok)
    assert out["x_hat"].shape == x.shape
    assert out["x_edit"].shape == x.shape
    assert set(out["likelihoods"]) == {"y", "z"}
    # padded to 64: y is 1/16 of the padded size, z 1/64
    hp, wp = [math.ceil(s / 64) * 64 for s in hw]
    assert out["likelihoods"]["y"].shape == (2, 24, hp // 16, wp // 16)
    assert out["likelihoods"]["z"].shape == (2, 16, hp // 64, wp // 64)
    assert model.latent_shape(hw) == (hp // 64, wp // 64)
    lik = torch.cat([v.flatten() for v in out["likelihoods"].values()])
    assert bool(((lik > 0) & (lik <= 1)).all())


@pytest.mark.parametrize("bad", [-0.1, 2.01, float("nan"), float("inf"), "x", None])
def test_rate_out_of_range_is_rejected(model, bad):
    with pytest.raises(ValueError, match="rate"):
        model(torch.rand(1, 3, 64, 64), bad, TinyTokens()(torch.rand(1, 3, 64, 64)))


def test_check_rate_accepts_bounds():
    assert check_rate(0, 3) == 0.0 and check_rate(2, 3) == 2.0
    assert check_rate(0, 1) == 0.0
    with pytest.raises(ValueError):
        check_rate(0.5, 1)


def test_gain_interpolation_is_geometric():
    log_g = torch.log(torch.tensor([[1.0, 2.0], [4.0, 8.0], [16.0, 32.0]]))
    assert torch.allclose(interpolate_log_gains(log_g, 1.0).flatten(), torch.tensor([4.0, 8.0]))
    assert torch.allclose(interpolate_log_gains(log_g, 2.0).flatten(), torch.tensor([16.0, 32.0]))
    assert torch.allclose(interpolate_log_gains(log_g, 0.5).flatten(), torch.tensor([2.0, 4.0]))
    assert interpolate_log_gains(log_g, 0.25).shape == (1, 2, 1, 1)


def test_hyper_channels_narrow_z_only():
    """``hyper_channels`` sets z's width (0: N); y, the transforms and the file API are unchanged."""
    torch.manual_seed(0)
    narrow = lively(build_codec(dataclasses.replace(model_params(use_tokens=False), hyper_channels=4)))
    wide = build_codec(model_params(use_tokens=False))
    assert narrow.core.Nz == 4 and wide.core.Nz == wide.core.N == 16
    x = image_to_tensor(make_image(64, 64))
    out = narrow(x, 1.0)
    assert out["likelihoods"]["z"].shape == (1, 4, 1, 1) and out["likelihoods"]["y"].shape[1] == 24
    narrow.update(force=True)
    img = make_image(64, 64)
    decoded = decode_image(narrow, encode_image(narrow, img, 1.0))
    assert np.abs(decoded.astype(int) - tensor_to_image(narrow.eval()(x, 1.0)["x_hat"]).astype(int)).max() <= 1


def test_higher_rate_gives_more_bytes(model):
    """One model, continuous rate control: bytes grow strictly with the rate (incl. fractional)."""
    img = make_image(45, 70)
    tok = TinyTokens()
    sizes = [len(encode_image(model, img, r, token_fn=tok)) for r in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes


def test_preedit_is_identity_at_init_and_uses_tokens():
    torch.manual_seed(0)
    net = PreEditNet(PreEditParams(True, 4, 2, True, TOKEN_DIM, 4))
    x = torch.rand(2, 3, 32, 48)
    t1, t2 = torch.randn(2, 16, TOKEN_DIM), torch.randn(2, 16, TOKEN_DIM)
    assert torch.equal(net(x, t1), x)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
    e1, e2 = net(x, t1), net(x, t2)
    assert not torch.allclose(e1, x)
    assert not torch.allclose(e1, e2), "the token branch does not reach the output"
    with pytest.raises(ValueError, match="tokens"):
        net(x)
    with pytest.raises(ValueError, match="multiple"):
        net(torch.rand(1, 3, 30, 32), t1[:1])


def test_preedit_without_tokens_ignores_them():
    net = PreEditNet(PreEditParams(True, 4, 2, False, TOKEN_DIM, 4))
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(net(x), x)
    assert not hasattr(net, "token_proj")


def test_tokens_to_grid_handles_cls_and_rejects_non_square():
    t = torch.arange(2 * 17 * 3, dtype=torch.float).reshape(2, 17, 3)
    grid = tokens_to_grid(t)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[:, :, 0, 0], t[:, 1])  # CLS (index 0) dropped
    assert tokens_to_grid(t[:, 1:]).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="square"):
        tokens_to_grid(torch.zeros(1, 15, 3))


def test_weights_hash_tracks_weights(model):
    h = weights_hash(model)
    assert len(h) == 16
    clone = build_codec(model.params)
    clone.load_state_dict(model.state_dict())
    assert weights_hash(clone) == h
    with torch.no_grad():
        clone.core.g_s[0].bias[0] += 1e-3
    assert weights_hash(clone) != h


def test_registry_and_unknown_model():
    assert "gained-mean-scale-hyperprior" in MODELS
    bad = model_params()
    bad = CodecModelParams(**{**bad.__dict__, "name": "nope"})
    with pytest.raises(ValueError, match="nope"):
        build_codec(bad)


# --- losses ------------------------------------------------------------------------------

def test_loss_terms_and_total():
    torch.manual_seed(0)
    m = build_codec(model_params()).train()
    tok = TinyTokens()
    x = torch.rand(2, 3, 64, 64)
    crit = CodecLoss(loss_params(), tok)
    ref = crit.reference_tokens(x)
    out = m(x, 0.5, ref)
    terms = crit(out, x, 0.5, ref)
    terms["loss"].backward()
    terms = {k: v.detach() for k, v in terms.items()}
    assert set(terms) == {"bpp_loss", "token_mse", "token_cos", "rank_loss", "pixel_mse",
                          "lambda", "distortion", "loss"}
    lam = math.sqrt(0.5 * 1.0)
    assert float(terms["lambda"]) == pytest.approx(lam)
    dist = (terms["token_mse"] + 0.5 * terms["token_cos"] + 0.5 * terms["rank_loss"]
            + 0.01 * 255 ** 2 * terms["pixel_mse"])
    assert float(terms["distortion"]) == pytest.approx(float(dist), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["bpp_loss"] + lam * dist), rel=1e-5)
    grads = [p.grad for p in m.preedit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_token_terms_switch_off():
    torch.manual_seed(0)
    m = build_codec(model_params(preedit=False)).train()
    x = torch.rand(1, 3, 64, 64)

    def forbidden(_x):
        raise AssertionError("token_fn must not run when every token term is off")

    crit = CodecLoss(loss_params(w_token_mse=0.0, w_token_cos=0.0, w_rank=0.0, w_pixel=1.0), forbidden)
    terms = crit(m(x, 0.0), x, 0.0)
    assert set(terms) == {"bpp_loss", "pixel_mse", "lambda", "distortion", "loss"}
    tok = TinyTokens()
    only_rank = CodecLoss(loss_params(w_token_mse=0.0, w_token_cos=0.0, w_pixel=0.0), tok)
    terms = only_rank(m(x, 0.0), x, 0.0)
    assert "rank_loss" in terms and "token_mse" not in terms and "pixel_mse" not in terms
    assert tok.calls == 2  # reference + reconstruction
    with pytest.raises(ValueError, match="token_fn"):
        CodecLoss(loss_params(), None)


def test_token_loss_gradient_reaches_codec():
    """Gradients flow through token_fn into the codec (the LVLM is frozen, not detached)."""
    torch.manual_seed(0)
    m = build_codec(model_params(preedit=False)).train()
    x = torch.rand(1, 3, 64, 64)
    crit = CodecLoss(loss_params(w_token_cos=0.0, w_rank=0.0, w_pixel=0.0), TinyTokens())
    terms = crit(m(x, 1.0), x, 1.0)
    (terms["loss"] - terms["bpp_loss"]).backward()  # distortion only
    g = m.core.g_s[-1].weight.grad
    assert g is not None and float(g.abs().sum()) > 0


def test_rank_losses_behave():
    torch.manual_seed(0)
    t = torch.randn(2, 16, TOKEN_DIM)
    for name, fn in RANK_LOSSES.items():
        assert float(fn(t, t)) == pytest.approx(0.0, abs=1e-6), name
        collapsed = t.mean(1, keepdim=True) + 0.01 * torch.randn(2, 16, TOKEN_DIM)
        collapsed[:, :, 0] += torch.linspace(-3, 3, 16)  # energy onto one direction
        assert float(fn(collapsed, t)) > 0.05, name
        # degenerate (repeated) tokens still give finite gradients
        rep = t[:, :1].repeat(1, 16, 1).clone().requires_grad_(True)
        fn(rep, t).backward()
        assert torch.isfinite(rep.grad).all(), name
    p = token_spectrum(t)
    assert p.shape == (2, TOKEN_DIM) and torch.allclose(p.sum(-1), torch.ones(2))
    ortho = torch.eye(16)[:, :TOKEN_DIM][None] * 4.0  # 8 orthogonal directions, equal energy
    ortho = torch.cat([ortho, -ortho], dim=1)  # centred
    assert float(effective_rank(ortho)) == pytest.approx(TOKEN_DIM, rel=1e-4)


def test_bpp_and_lambda():
    lik = {"y": torch.full((1, 4, 2, 2), 0.5), "z": torch.full((1, 2, 1, 1), 0.25)}
    assert float(bpp_from_likelihoods(lik, 16)) == pytest.approx((16 * 1 + 2 * 2) / 16)
    assert lambda_at([1.0, 4.0, 16.0], 0.5) == pytest.approx(2.0)
    assert lambda_at([1.0, 4.0, 16.0], 2) == pytest.approx(16.0)
    with pytest.raises(ValueError):
        lambda_at([1.0, 4.0], 1.5)


# --- params schema ------------------------------------------------------------------------

def full_params() -> CodecParams:
    return CodecParams(model=model_params(), loss=loss_params(),
                       train=CodecTrainParams(seed=0, steps=4, batch_size=2, patch_size=64, lr=1e-4,
                                              aux_lr=1e-3, lr_decay_at=1.0, grad_clip=1.0,
                                              rate_sampling="discrete", checkpoint_every=2,
                                              log_every=1, quantile_update=True))


def test_params_roundtrip_through_yaml_dict():
    p = full_params()
    check_codec_params(p)
    again = from_dict(CodecParams, to_dict(p), "codec")
    assert again == p


@pytest.mark.parametrize("path,value,key", [
    (("loss", "lambdas"), [1.0, 2.0], "codec.loss.lambdas"),
    (("loss", "rank_mode"), "bogus", "codec.loss.rank_mode"),
    (("model", "gain_init"), [2.0, 0.5], "codec.model.gain_init"),
    (("train", "patch_size"), 100, "codec.train.patch_size"),
    (("model", "name"), "nope", "codec.model.name"),
    (("loss", "lowpass"), 0, "codec.loss.lowpass"),
    (("loss", "w_lowpass"), -1.0, "codec.loss.w_lowpass"),
    (("loss", "token_space"), "lm", "codec.loss.token_space"),
    (("loss", "lowpass_weighting"), "saliency", "codec.loss.lowpass_weighting"),
    (("model", "hyper_channels"), -1, "codec.model.hyper_channels"),
    (("model", "synthesis_tail"), -1, "codec.model.synthesis_tail"),
    (("model", "synthesis_tail_kernel"), 4, "codec.model.synthesis_tail_kernel"),
    (("model", "synthesis_tail_kernel"), 1, "codec.model.synthesis_tail_kernel"),
])
def test_params_errors_name_the_key(path, value, key):
    d = to_dict(full_params())
    d[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_codec_params(from_dict(CodecParams, d, "codec"))


def test_lowpass_term_sees_block_colour_not_texture():
    from vlmcompress.codec.losses import lowpass_mse

    x = torch.full((1, 3, 16, 16), 0.5)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2         # zero-mean texture
    textured = x + 0.2 * (checker.float() - 0.5)
    assert float(lowpass_mse(textured, x, 8)) == pytest.approx(0.0, abs=1e-12)
    assert float(torch.nn.functional.mse_loss(textured, x)) > 0.009
    tinted = x.clone()
    tinted[:, 0] += 0.1                                                        # a hue shift
    assert float(lowpass_mse(tinted, x, 8)) == pytest.approx(0.01 / 3, rel=1e-4)


def test_lowpass_term_enters_the_distortion():
    torch.manual_seed(0)
    m = build_codec(model_params(preedit=False)).train()
    x = torch.rand(2, 3, 64, 64)
    crit = CodecLoss(loss_params(w_token_mse=0.0, w_token_cos=0.0, w_rank=0.0, w_pixel=0.0, w_lowpass=0.02))
    terms = {k: v.detach() for k, v in crit(m(x, 1.0), x, 1.0).items()}
    assert set(terms) == {"bpp_loss", "lowpass_mse", "lambda", "distortion", "loss"}
    assert float(terms["distortion"]) == pytest.approx(0.02 * 255 ** 2 * float(terms["lowpass_mse"]), rel=1e-5)


def test_projector_token_space_compares_the_mapped_tokens():
    torch.manual_seed(0)
    m = build_codec(model_params(preedit=False)).train()
    x = torch.rand(2, 3, 64, 64)
    tower = torch.nn.Conv2d(3, 8, 8, 8)                                       # [B,3,64,64] -> [B,64,8]
    token_fn = lambda img: tower(img).flatten(2).transpose(1, 2)            # noqa: E731
    proj = torch.nn.Linear(8, 4)
    lp = loss_params(w_token_mse=1.0, w_token_cos=0.0, w_rank=0.0, w_pixel=0.0)
    out = m(x, 1.0)
    ref = token_fn(x).detach()
    on_tower = CodecLoss(lp, token_fn)(out, x, 1.0, ref)["token_mse"]
    on_proj = CodecLoss(dataclasses.replace(lp, token_space="projector"), token_fn, proj)(out, x, 1.0, ref)["token_mse"]
    t_hat = token_fn(out["x_hat"].clamp(0, 1))
    assert float(on_tower) == pytest.approx(float(((t_hat - ref) ** 2).mean()), rel=1e-5)
    assert float(on_proj) == pytest.approx(float(((proj(t_hat) - proj(ref)) ** 2).mean()), rel=1e-5)
    on_proj.backward()
    assert any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in m.parameters())   # through the map
    with pytest.raises(ValueError, match="token_map"):
        CodecLoss(dataclasses.replace(lp, token_space="projector"), token_fn)


def test_attention_weighted_lowpass_counts_the_attended_blocks():
    from vlmcompress.codec.losses import attention_grid, lowpass_mse

    x = torch.full((1, 3, 16, 16), 0.5)
    tinted = x.clone()
    tinted[:, 0, :8, :8] += 0.2                       # hue shift in the top-left block only
    flat = torch.ones(1, 2, 2)
    assert float(lowpass_mse(tinted, x, 8, flat)) == pytest.approx(float(lowpass_mse(tinted, x, 8)), rel=1e-6)
    on_it = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])   # all the attention on the shifted block
    off_it = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert float(lowpass_mse(tinted, x, 8, on_it)) == pytest.approx(4 * float(lowpass_mse(tinted, x, 8)), rel=1e-5)
    assert float(lowpass_mse(tinted, x, 8, off_it)) == pytest.approx(0.0, abs=1e-12)
    attn = torch.arange(4.0)[None]                    # [B, N] row-major -> [B, 2, 2]
    assert attention_grid(attn).tolist() == [[[0.0, 1.0], [2.0, 3.0]]]
    with pytest.raises(ValueError, match="square"):
        attention_grid(torch.ones(1, 6))


def test_attention_weighting_needs_the_lvlm_attention():
    lp = loss_params(w_token_mse=0.0, w_token_cos=0.0, w_rank=0.0, w_pixel=0.0, w_lowpass=0.01)
    lp = dataclasses.replace(lp, lowpass_weighting="attention")
    with pytest.raises(ValueError, match="attention_fn"):
        CodecLoss(lp)
    torch.manual_seed(0)
    m = build_codec(model_params(preedit=False)).train()
    x = torch.rand(2, 3, 64, 64)
    seen = []
    attn = lambda img: (seen.append(img.requires_grad), torch.rand(img.shape[0], 64))[1]   # noqa: E731
    terms = CodecLoss(lp, attention_fn=attn)(m(x, 1.0), x, 1.0)
    assert seen == [False] and float(terms["lowpass_mse"]) > 0       # read from the original image


# --- inference kernels and cached tables -------------------------------------------------------

def test_subpixel_weight_is_the_transposed_convolution():
    g = torch.Generator().manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(5, 3, 5, stride=2, padding=2, output_padding=1)
    x = torch.randn(2, 5, 7, 6, generator=g)
    k = subpixel_weight(deconv.weight.detach())
    assert k.shape == (12, 5, 3, 3)
    out = torch.nn.functional.pixel_shuffle(
        torch.nn.functional.conv2d(x, k, deconv.bias.detach().repeat_interleave(4), padding=1), 2)
    torch.testing.assert_close(out, deconv(x).detach(), rtol=1e-5, atol=1e-5)
    # 25 of the 36 sub-pixel taps are real: the other 11 stay zero
    assert int((k.reshape(3, 4, 5, 9) != 0).any(dim=(0, 2)).sum()) == 25


@pytest.mark.parametrize("name", ["g_a", "g_s"])
def test_inference_kernels_compute_the_transforms(model, name):
    seq = getattr(model.core, name)
    with torch.no_grad():   # GDN away from identity, so its normalisation is exercised
        for m in seq:
            if hasattr(m, "gamma"):
                m.gamma.add_(0.05)
        x = torch.rand(1, 3, 64, 64) if name == "g_a" else torch.randn(1, 24, 4, 4) * 3
        fast = run_ops(inference_ops(seq), x)
        ref = seq(x)
        for m in seq:
            if hasattr(m, "gamma"):
                m.gamma.sub_(0.05)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_scale_indexes_equal_compressai_build_indexes(model):
    gc = model.core.gaussian_conditional
    table = gc.scale_table
    g = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.rand(500, generator=g) * 300, table, table[:-1] + 1e-6, torch.tensor(
        [0.0, -1.0, 1e-9, float("nan"), float("inf"), float(table[-1]) * 2])]).view(1, 1, 1, -1)
    assert torch.equal(model.core._scale_indexes(scales), gc.build_indexes(scales))


def test_kernels_tables_and_digest_follow_the_weights():
    """Cached kernels, coder tables and the weights' hash are rebuilt once the weights change."""
    torch.manual_seed(0)
    m = lively(build_codec(model_params(use_tokens=False)))
    img = make_image(64, 64)
    data = encode_image(m, img, 1.0)
    before, digest = decode_image(m, data), m.weights_digest()
    assert digest == weights_hash(m)
    with torch.no_grad():
        m.core.g_s[0].weight.mul_(0.5)            # in place: the version counter moves
    assert m.weights_digest() == weights_hash(m) != digest
    with pytest.raises(ValueError, match="not by this one"):
        decode_image(m, data)
    data2 = encode_image(m, img, 1.0)
    x = image_to_tensor(img)
    with torch.no_grad():
        fwd = tensor_to_image(m(x, 1.0)["x_hat"])
    after = decode_image(m, data2)
    assert np.array_equal(after, fwd) and not np.array_equal(after, before)
    # a state dict loaded back restores the first weights, hash and decoding
    m2 = lively(build_codec(model_params(use_tokens=False)))   # same seed path: other weights
    m2.load_state_dict(m.state_dict())
    assert m2.weights_digest() == m.weights_digest()
    assert np.array_equal(decode_image(m2, data2), after)


def test_eval_forward_equals_decode_exactly(model):
    """Forward in eval mode without gradients runs the decoder's kernels: the same pixels."""
    img = make_image(70, 45)
    tok = TinyTokens()
    data = encode_image(model, img, 1.5, token_fn=tok)
    x = image_to_tensor(img)
    with torch.no_grad():
        fwd = tensor_to_image(model(x, 1.5, tok(x))["x_hat"])
    assert np.array_equal(decode_image(model, data), fwd)


# --- synthesis tail: width and kernel of g_s's last two upsamplings -----------------------------

TAILS = [(0, 5), (8, 5), (8, 3), (16, 3), (4, 7)]   # (synthesis_tail, synthesis_tail_kernel)


def tail_params(tail: int, kernel: int) -> CodecModelParams:
    return dataclasses.replace(model_params(preedit=False), synthesis_tail=tail, synthesis_tail_kernel=kernel)


def test_synthesis_tail_defaults_are_the_mbt2018_mean_layout():
    """Keys left out mean today's architecture: g_s is CompressAI's mean-scale hyperprior's."""
    from compressai.models import MeanScaleHyperprior

    d = to_dict(model_params())
    del d["synthesis_tail"], d["synthesis_tail_kernel"]
    p = from_dict(CodecModelParams, d, "model")
    assert (p.synthesis_tail, p.synthesis_tail_kernel) == (0, 5)
    ours = build_codec(p).core
    ref = MeanScaleHyperprior(N=16, M=24)
    for name in ("g_a", "g_s"):
        got = {k: tuple(v.shape) for k, v in getattr(ours, name).state_dict().items()}
        assert got == {k: tuple(v.shape) for k, v in getattr(ref, name).state_dict().items()}
    # naming the defaults, or a tail as wide as N, builds the same weights from the same seed
    torch.manual_seed(3)
    a = build_codec(dataclasses.replace(p, synthesis_tail=16)).state_dict()
    torch.manual_seed(3)
    b = build_codec(p).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tail,kernel", TAILS)
def test_synthesis_tail_sets_only_the_last_two_upsamplings(tail, kernel):
    sd = build_codec(tail_params(tail, kernel)).core.state_dict()
    base = build_codec(tail_params(0, 5)).core.state_dict()
    t = tail or 16
    assert sd.keys() == base.keys()
    assert tuple(sd["g_s.4.weight"].shape) == (16, t, kernel, kernel)
    assert tuple(sd["g_s.5.gamma"].shape) == (t, t) and tuple(sd["g_s.5.beta"].shape) == (t,)
    assert tuple(sd["g_s.6.weight"].shape) == (t, 3, kernel, kernel)
    assert all(sd[k].shape == base[k].shape for k in sd if not k.startswith(("g_s.4.", "g_s.5.", "g_s.6.")))


def test_synthesis_tail_kernel_is_checked_by_the_model_too():
    from vlmcompress.codec.model import GainedMeanScaleHyperprior

    with pytest.raises(ValueError, match="synthesis_tail_kernel must be odd and >= 3, got 4"):
        GainedMeanScaleHyperprior(16, 24, 3, synthesis_tail_kernel=4)


@pytest.mark.parametrize("tail,kernel", TAILS)
def test_synthesis_tail_upsamples_by_two_and_its_kernels_compute_g_s(tail, kernel):
    torch.manual_seed(0)
    seq = build_codec(tail_params(tail, kernel)).core.g_s
    with torch.no_grad():
        for m in seq:
            if hasattr(m, "gamma"):
                m.gamma.add_(0.05)
        x = torch.randn(1, 24, 3, 5) * 3
        ref = seq(x)
        fast = run_ops(inference_ops(seq), x)
    assert ref.shape == (1, 3, 48, 80)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tail,kernel", TAILS)
def test_synthesis_tail_decode_equals_eval_forward_exactly(tail, kernel):
    """The stage's roundtrip_max_abs_err is 0 for every tail: decode runs forward's kernels."""
    torch.manual_seed(0)
    m = lively(build_codec(tail_params(tail, kernel)))
    img = make_image(45, 70)
    data = encode_image(m, img, 1.5)
    x = image_to_tensor(img)
    with torch.no_grad():
        fwd = tensor_to_image(m(x, 1.5)["x_hat"])
    assert fwd.shape == img.shape
    assert np.array_equal(decode_image(m, data), fwd)


def test_a_file_of_one_synthesis_tail_is_refused_by_another():
    torch.manual_seed(0)
    wide = lively(build_codec(tail_params(0, 5)))
    torch.manual_seed(0)
    narrow = lively(build_codec(tail_params(8, 3)))
    # g_a, h_a and the entropy bottleneck are drawn alike; the hash still tells them apart
    assert torch.equal(wide.core.g_a[0].weight, narrow.core.g_a[0].weight)
    assert weights_hash(wide) != weights_hash(narrow)
    data = encode_image(wide, make_image(64, 64), 1.0)
    with pytest.raises(ValueError, match="not by this one"):
        decode_image(narrow, data)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_subpixel_form_of_any_odd_kernel(k):
    import torch.nn.functional as F

    from vlmcompress.codec.model import _subpixel_op, subpixel_pays, subpixel_taps

    g = torch.Generator().manual_seed(k)
    deconv = torch.nn.ConvTranspose2d(4, 3, k, stride=2, padding=k // 2, output_padding=1)
    x = torch.randn(1, 4, 5, 7, generator=g)
    lo, hi = subpixel_taps(k)
    assert subpixel_weight(deconv.weight.detach()).shape == (12, 4, hi - lo + 1, hi - lo + 1)
    out = _subpixel_op(deconv.weight.detach(), deconv.bias.detach())(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, deconv(x).detach(), rtol=1e-5, atol=1e-5)
    assert F.conv_transpose2d(x, deconv.weight, stride=2, padding=k // 2, output_padding=1).shape[-2:] == (10, 14)
    # sub-pixel only where it was measured faster: few output channels and few wasted taps
    assert subpixel_pays(k, 3) == (k != 3) and not subpixel_pays(k, 16)


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_codec_speed.py"
    spec = importlib.util.spec_from_file_location("bench_codec_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tail,kernel", [(0, 5), (8, 3)])
def test_bench_profile_counts_the_synthesis_macs(tail, kernel):
    """``layer_macs``: every input pixel of a transposed convolution meets k*k taps per output
    channel; a GDN is a 1x1 convolution of x^2."""
    bench = _bench()
    seq = build_codec(tail_params(tail, kernel)).core.g_s
    x, hw, t = torch.zeros(1, 24, 2, 3), 6, tail or 16   # hw: the first layer's input pixels
    total = 0
    with torch.no_grad():
        for layer in seq:
            y = layer(x)
            total += bench.layer_macs(layer, x, y)
            x = y
    want = (24 * hw * 16 * 25 + 16 * 16 * 4 * hw + 16 * 4 * hw * 16 * 25 + 16 * 16 * 16 * hw
            + 16 * 16 * hw * t * kernel ** 2 + t * t * 64 * hw + t * 64 * hw * 3 * kernel ** 2)
    assert total == want


def test_bench_overrides_set_existing_keys_only():
    from vlmcompress.config import load_params

    bench = _bench()
    P = load_params()
    Q = bench.with_overrides(P, ["codec.model.synthesis_tail=32", "codec.model.synthesis_tail_kernel=3"])
    assert (Q.codec.model.synthesis_tail, Q.codec.model.synthesis_tail_kernel) == (32, 3)
    assert Q.codec.model.N == P.codec.model.N and Q.codec.baseline == P.codec.baseline
    with pytest.raises(SystemExit, match="existing params path"):
        bench.with_overrides(P, ["codec.model.synthesis_width=32"])
    with pytest.raises(ConfigError, match="codec.model.synthesis_tail_kernel"):
        bench.with_overrides(P, ["codec.model.synthesis_tail_kernel=4"])
