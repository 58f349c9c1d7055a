"""Rate / token-distortion / token-rank / pixel loss for the LVLM-oriented codec.

arXiv 2407.17060 trains the pre-editing net and the codec jointly with

    L = lambda_R L_R + lambda_D L_D + lambda_T (lambda_tk L_tk + lambda_rk L_rk)

where ``L_R`` is the rate, ``L_D`` a pixel distortion, ``L_tk`` a token-level distortion
between the LVLM's visual tokens of the original and of the decoded image (the
*representation* capability) and ``L_rk`` a token *rank* loss, computed from the
eigenvalues of the token matrix, that keeps the tokens' *discrimination* capability.
With one model for all rates (gain units) the multiplier becomes one ``lambda`` per
rate level; here::

    loss = bpp + lambda(rate) * (w_pixel * 255**2 * MSE_pix + w_token_mse * MSE_tok
                                 + w_token_cos * (1 - cos_tok) + w_rank * L_rank
                                 + w_lowpass * 255**2 * MSE(pool(x_hat), pool(x)))

``lambda(rate)`` interpolates geometrically between adjacent levels, like the gains.
A weight of 0 switches a term off: it is neither computed nor reported (and the LVLM
is not run on the reconstruction when no token term is on), so the pixel-only baseline
is this same loss with the token weights at 0.

Rank loss (what we implement, and why). We could not read the paper's exact formula for
``L_rk``; its description is "a rank loss based on token eigenvalues" that preserves
discrimination. A token matrix whose energy collapses onto a few directions makes the
tokens of different regions look alike (low effective rank), which is exactly what
heavy compression does (textures and small objects flatten). So ``L_rank`` compares the
*eigenvalue spectra* of the per-image token covariance ``T_c^T T_c`` (tokens centred
over the token axis, ``T_c = T - mean_N T``): the eigenvalues are the squared singular
values of ``T_c`` (``torch.linalg.svdvals``, whose gradient is stable even for repeated
values). Two variants are registered in :data:`RANK_LOSSES`:

* ``"spectrum"`` (default): total-variation distance between the normalised eigenvalue
  distributions ``p_i = e_i / sum_j e_j`` of original and reconstruction (in [0, 2]);
  scale-free, so it is complementary to the token MSE.
* ``"effective_rank"``: ``|erank(T_hat) - erank(T)| / min(N, D)`` with the entropy-based
  effective rank ``erank = exp(H(p))`` (Roy & Vetterli, 2007).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vlmcompress.codec.config import RANK_LOSSES, LossParams

TokenFn = Callable[[Tensor], Tensor]
"""``token_fn(x [B,3,H,W] in [0,1]) -> tokens [B,N,D]``; differentiable w.r.t. ``x``."""

RankLoss = Callable[[Tensor, Tensor], Tensor]


def register_rank_loss(name: str) -> Callable[[RankLoss], RankLoss]:
    """Decorator: make ``fn(t_hat, t_ref) -> scalar`` selectable as ``codec.loss.rank_mode``."""
    return RANK_LOSSES.register(name)


def bpp_from_likelihoods(likelihoods: dict[str, Tensor], num_pixels: int) -> Tensor:
    """Estimated bits per pixel: ``sum(-log2 p) / num_pixels`` over all latents (scalar)."""
    total = sum(torch.log(lik).sum() for lik in likelihoods.values())
    return total / (-math.log(2) * num_pixels)


def token_mse(t_hat: Tensor, t_ref: Tensor) -> Tensor:
    """Mean squared error between token sets ``[B, N, D]`` (scalar)."""
    return F.mse_loss(t_hat, t_ref)


def token_cosine_distance(t_hat: Tensor, t_ref: Tensor) -> Tensor:
    """Mean over tokens of ``1 - cos(t_hat_i, t_ref_i)``; inputs ``[B, N, D]`` (scalar)."""
    return (1.0 - F.cosine_similarity(t_hat, t_ref, dim=-1, eps=1e-8)).mean()


def token_spectrum(tokens: Tensor, eps: float = 1e-12) -> Tensor:
    """Normalised eigenvalue spectrum of the centred token covariance.

    Args:
        tokens: ``[B, N, D]``.
    Returns:
        ``[B, min(N, D)]`` non-negative, each row summing to 1 (descending).
    """
    centred = tokens.float() - tokens.float().mean(dim=1, keepdim=True)
    eig = torch.linalg.svdvals(centred) ** 2
    return eig / eig.sum(dim=-1, keepdim=True).clamp_min(eps)


@register_rank_loss("spectrum")
def spectrum_rank_loss(t_hat: Tensor, t_ref: Tensor) -> Tensor:
    """Total-variation distance of normalised eigenvalue spectra, averaged over the batch.

    ``t_hat, t_ref``: ``[B, N, D]`` -> scalar in ``[0, 2]``.
    """
    return (token_spectrum(t_hat) - token_spectrum(t_ref)).abs().sum(dim=-1).mean()


def effective_rank(tokens: Tensor, eps: float = 1e-12) -> Tensor:
    """Entropy effective rank ``exp(-sum p log p)`` per image: ``[B, N, D]`` -> ``[B]``."""
    p = token_spectrum(tokens, eps)
    return torch.exp(-(p * torch.log(p.clamp_min(eps))).sum(dim=-1))


@register_rank_loss("effective_rank")
def effective_rank_loss(t_hat: Tensor, t_ref: Tensor) -> Tensor:
    """``|erank(t_hat) - erank(t_ref)| / min(N, D)`` averaged over the batch (scalar)."""
    scale = min(t_ref.shape[1], t_ref.shape[2])
    return ((effective_rank(t_hat) - effective_rank(t_ref)).abs() / scale).mean()


def lowpass_mse(x_hat: Tensor, x: Tensor, block: int, weights: Tensor | None = None) -> Tensor:
    """MSE between the ``block x block`` means of two images ``[B, 3, H, W]`` (scalar).

    The colour of each region, without its texture: a weak full-resolution pixel MSE lets
    a short-trained codec drift in hue (the LVLM then names the wrong colour), while a
    strong one spends bits on background texture the LVLM ignores. Block means pin the hue
    of every patch, but the background's blocks cost bits too (measured, docs/architecture.md).
    Edges beyond a whole block are dropped.

    ``weights [B, h, w]`` (any grid; resized bilinearly to the ``H//block x W//block`` block
    grid, then scaled to mean 1 per image) weight each block's error, e.g. by the LVLM's CLS
    attention, so the colour of what the LVLM looks at counts and the background's less.
    """
    err = (F.avg_pool2d(x_hat, block) - F.avg_pool2d(x, block)).pow(2).mean(1)      # [B, h', w']
    if weights is None:
        return err.mean()
    w = F.interpolate(weights[:, None].to(err), size=err.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    w = w / w.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return (w * err).mean()


def attention_grid(attn: Tensor) -> Tensor:
    """CLS attention over ``N = g*g`` patch tokens ``[B, N]`` -> ``[B, g, g]`` (row-major grid)."""
    g = math.isqrt(attn.shape[-1])
    if g * g != attn.shape[-1]:
        raise ValueError(f"{attn.shape[-1]} patch tokens do not form a square grid")
    return attn.reshape(attn.shape[0], g, g)


def lambda_at(lambdas: list[float] | tuple[float, ...], rate: float) -> float:
    """Lagrange multiplier at a real-valued rate: geometric interpolation of the levels."""
    levels = len(lambdas)
    if not 0 <= rate <= levels - 1:
        raise ValueError(f"rate must be in [0, {levels - 1}], got {rate}")
    lo = min(int(math.floor(rate)), levels - 1)
    hi = min(lo + 1, levels - 1)
    t = rate - lo
    return math.exp((1 - t) * math.log(lambdas[lo]) + t * math.log(lambdas[hi]))


class CodecLoss(nn.Module):
    """``forward(out, x, rate, ref_tokens=None) -> {term: scalar, ..., "loss"}``.

    ``out`` is the codec's dict (``x_hat``, ``likelihoods``); ``x`` the original
    ``[B,3,H,W]`` in [0,1]; ``ref_tokens`` the LVLM tokens of ``x`` if the caller already
    has them (else computed here without gradient). Terms reported: ``bpp_loss``,
    ``lambda``, ``distortion``, ``loss`` and each enabled one of ``token_mse``,
    ``token_cos``, ``rank_loss``, ``pixel_mse``, ``lowpass_mse`` (MSEs in [0,1] units,
    before the 255**2).

    ``token_map`` (``[B,N,D] -> [B,N,D']``, frozen, differentiable) is applied to both token
    sets before the token terms; required when ``params.token_space`` is ``"projector"``
    (the LVLM's projector). ``ref_tokens`` stay in the tower's space either way: the
    pre-editing net fuses those. ``attention_fn`` (``x -> [B, N]`` CLS attention of the
    LVLM's tower, no gradient needed) weights the low-pass term's blocks when
    ``params.lowpass_weighting`` is ``"attention"``.
    """

    def __init__(self, params: LossParams, token_fn: TokenFn | None = None,
                 token_map: Callable[[Tensor], Tensor] | None = None,
                 attention_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if params.rank_mode not in RANK_LOSSES:
            known = ", ".join(sorted(RANK_LOSSES))
            raise ValueError(f"unknown rank loss {params.rank_mode!r} (known: {known})")
        self.params = params
        self.token_fn = token_fn
        if self.needs_tokens and token_fn is None:
            raise ValueError("token loss terms are on (w_token_mse/w_token_cos/w_rank > 0) "
                             "but token_fn is None")
        if params.token_space == "projector" and self.needs_tokens and token_map is None:
            raise ValueError("loss.token_space is 'projector' but no token_map (the LVLM's projector) was given")
        self.token_map = token_map if params.token_space == "projector" else None
        if params.w_lowpass > 0 and params.lowpass_weighting == "attention" and attention_fn is None:
            raise ValueError("loss.lowpass_weighting is 'attention' but no attention_fn (the LVLM's CLS attention) was given")
        self.attention_fn = attention_fn if params.lowpass_weighting == "attention" else None

    @property
    def needs_tokens(self) -> bool:
        p = self.params
        return p.w_token_mse > 0 or p.w_token_cos > 0 or p.w_rank > 0

    def reference_tokens(self, x: Tensor) -> Tensor:
        """LVLM tokens of the original image (no gradient): ``[B,3,H,W] -> [B,N,D]``."""
        with torch.no_grad():
            return self.token_fn(x).detach()

    def forward(self, out: dict, x: Tensor, rate: float, ref_tokens: Tensor | None = None) -> dict:
        p = self.params
        b, _, h, w = x.shape
        terms: dict[str, Tensor] = {"bpp_loss": bpp_from_likelihoods(out["likelihoods"], b * h * w)}
        x_hat = out["x_hat"]
        distortion = x_hat.new_zeros(())
        if self.needs_tokens:
            t_ref = ref_tokens if ref_tokens is not None else self.reference_tokens(x)
            t_hat = self.token_fn(x_hat.clamp(0, 1))
            if t_hat.shape != t_ref.shape:
                raise ValueError(f"token_fn gave {tuple(t_hat.shape)} for the reconstruction "
                                 f"but {tuple(t_ref.shape)} for the original")
            if self.token_map is not None:
                t_hat, t_ref = self.token_map(t_hat), self.token_map(t_ref)
            if p.w_token_mse > 0:
                terms["token_mse"] = token_mse(t_hat, t_ref)
                distortion = distortion + p.w_token_mse * terms["token_mse"]
            if p.w_token_cos > 0:
                terms["token_cos"] = token_cosine_distance(t_hat, t_ref)
                distortion = distortion + p.w_token_cos * terms["token_cos"]
            if p.w_rank > 0:
                terms["rank_loss"] = RANK_LOSSES[p.rank_mode](t_hat, t_ref)
                distortion = distortion + p.w_rank * terms["rank_loss"]
        if p.w_pixel > 0:
            terms["pixel_mse"] = F.mse_loss(x_hat, x)
            distortion = distortion + p.w_pixel * 255.0 ** 2 * terms["pixel_mse"]
        if p.w_lowpass > 0:
            weights = None
            if self.attention_fn is not None:
                with torch.no_grad():
                    weights = attention_grid(self.attention_fn(x))
            terms["lowpass_mse"] = lowpass_mse(x_hat, x, p.lowpass, weights)
            distortion = distortion + p.w_lowpass * 255.0 ** 2 * terms["lowpass_mse"]
        lam = lambda_at(p.lambdas, rate)
        terms["lambda"] = x_hat.new_tensor(lam)
        terms["distortion"] = distortion
        terms["loss"] = terms["bpp_loss"] + lam * distortion
        return terms
