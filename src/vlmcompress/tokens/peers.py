"""Peer methods that keep a diverse subset of the visual tokens: DivPrune and CDPruner.

Both keep exactly k patch tokens, unchanged and in patch order (no merging), chosen by a greedy
loop of k steps that runs over the whole batch at once (each step is vectorised over the B
images and N tokens). Both measure similarity as the cosine of the projected tokens
(``VisualTokens.tokens``, the LM-input space), which is what the official code of each reads:
the ``mm_projector`` output of LLaVA.

- :func:`divprune` (Alvar et al., CVPR 2025): max-min diversity (MMDP). The first token is the
  one farthest (1 - cosine) from its nearest neighbour, each next one the token farthest from
  its nearest kept token.
- :func:`cdpruner` (Zhang et al., NeurIPS 2025): a conditional DPP. The kernel is the tokens'
  cosine similarity scaled on both sides by each token's relevance to the instruction
  (``VisualTokens.text_sim``, min-max normalised per image), and the kept set is its greedy
  MAP estimate (fast greedy DPP: one incremental Cholesky row per step).

Where CDPruner's instruction cosine comes from (it is registered ``text_guided``, so callers
fill ``VisualTokens.text_sim``): on this package's LVLM (tokens stage, ``make_transform``), CLIP's
joint space — each patch of the last vision layer through CLIP's post-LN and visual projection
against CLIP's text embedding of the question, as the official code pairs CLIP's own towers;
under :func:`vlmcompress.tokens.attach` (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, which ship no CLIP text
tower), attach's substitute — the question's mean LM input embedding against the projected
tokens, which live in that space.

Registered on import of :mod:`vlmcompress.tokens.methods`, like the built-ins.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlmcompress.tokens.config import CDPrunerParams, DivPruneParams, method_params_of
from vlmcompress.tokens.methods import _all_tokens, _fixed_k, register_method
from vlmcompress.tokens.select import cosine_matrix, diverse_mask, keep_mask
from vlmcompress.tokens.types import KIND_SALIENT, Compressed, VisualTokens, pack

RELEVANCE_EPS = 1e-6     # the official min-max normalisation adds this, so no token's relevance is 0
SATURATED = 1e-5         # DPP gains below this share of the largest kernel diagonal count as 0


def instruction_relevance(text_sim: Tensor, *, negate: bool = False, theta: float | None = None) -> Tensor:
    """CDPruner's relevance of each token to the instruction.

    text_sim: ``[B, N]`` cosine of each token to the instruction's embedding; returns ``[B, N]``
    float32, ``(r - min + 1e-6) / (max - min)`` per image (the official normalisation; its
    min/max run over one image's tokens), all ones for an image whose scores are all equal (the
    official code divides by zero there). ``negate``: r = -cosine (the official code), else r =
    cosine (the paper). ``theta``: ``exp(alpha · r)``, alpha = theta / (2(1 - theta)).
    """
    r = -text_sim.float() if negate else text_sim.float()
    lo, hi = r.amin(dim=1, keepdim=True), r.amax(dim=1, keepdim=True)
    span = hi - lo
    r = torch.where(span > 0, (r - lo + RELEVANCE_EPS) / span.clamp_min(torch.finfo(r.dtype).tiny),
                    torch.ones_like(r))
    if theta is not None:
        r = torch.exp(theta / (2.0 * (1.0 - theta)) * r)
    return r


def conditional_kernel(similarity: Tensor, relevance: Tensor) -> Tensor:
    """``[B, N, N]`` similarity, ``[B, N]`` relevance -> ``[B, N, N]`` kernel r_i · S_ij · r_j."""
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def dpp_greedy_map(kernel: Tensor, k: int) -> Tensor:
    """Greedy MAP inference of a DPP (Chen et al., NeurIPS 2018), batched.

    kernel: ``[B, N, N]`` positive semi-definite; returns ``[B, k]`` indices in the order picked.
    Each step adds the token j of largest gain d_j² = det(L[S+j]) / det(L[S]) and updates every
    gain with one new row of the incremental Cholesky factor, c = (L[j] - Σ_t c_t[j]·c_t) / d_j,
    d² -= c². Runs in float64 (the recursion then adds no error of its own to the kernel's).
    When the kernel's rank is used up (every gain below ``SATURATED`` of the largest diagonal:
    k above the token width, or duplicate tokens) the remaining picks follow the diagonal, i.e.
    the relevance, where the official code would divide by zero. Ties go to the lowest index.
    """
    L = kernel.double()
    B, N, _ = L.shape
    rows = torch.arange(B, device=L.device)
    quality = torch.diagonal(L, dim1=1, dim2=2).clone()                    # [B, N]
    top = quality.amax(dim=1, keepdim=True)
    tol = SATURATED * top.clamp_min(torch.finfo(L.dtype).tiny)              # [B, 1]
    gains = quality.clone()                                                 # [B, N] d², -inf once picked
    fallback = quality - top - 1.0                                          # below any live gain, ordered by quality
    chol = L.new_zeros(B, k, N)                                             # [B, k, N] Cholesky rows so far
    picks = torch.empty(B, k, dtype=torch.long, device=L.device)
    for i in range(k):
        j = torch.where(gains > tol, gains, fallback).argmax(dim=1)         # [B]
        picks[:, i] = j
        d2 = gains[rows, j]                                                 # [B]
        gains[rows, j] = fallback[rows, j] = float("-inf")
        scale = d2.clamp_min(tol[:, 0]).rsqrt() * (d2 > tol[:, 0])          # [B]; 0: rank used up, no update
        c = torch.baddbmm(L[rows, j].unsqueeze(1), chol[rows, :i, j].unsqueeze(1), chol[:, :i], alpha=-1.0)
        c = c.squeeze(1) * scale.unsqueeze(1)                               # [B, N]
        chol[:, i] = c
        gains.addcmul_(c, c, value=-1.0)
    return picks


def _kept(vt: VisualTokens, keep: Tensor) -> Compressed:
    """The tokens where ``keep [B, N]`` is true, unchanged, in patch order."""
    kind = torch.zeros_like(keep, dtype=torch.int8).masked_fill(keep, KIND_SALIENT)
    return pack(vt.tokens, kind)


@register_method("divprune", params=DivPruneParams)
def divprune(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
             generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """DivPrune: the k tokens picked greedily for max-min diversity, distance 1 - cosine of the
    projected tokens (as the official code, which prunes the ``mm_projector`` output). Kept
    tokens in patch order. Official code: one image per batch (LLaVA-NeXT: its whole packed
    sequence, newline tokens included); here each image of the batch on its own, over the patch
    tokens the adapter hands over."""
    method_params_of(DivPruneParams, "divprune", params)
    k = _fixed_k(vt, budget, "divprune")
    if k >= vt.n_tokens:
        return _all_tokens(vt)
    return _kept(vt, diverse_mask(vt.tokens, k))


@register_method("cdpruner", params=CDPrunerParams, text_guided=True)
def cdpruner(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
             generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """CDPruner: the k tokens of the greedy MAP of a conditional DPP, kernel r_i · cos(x_i, x_j)
    · r_j over the projected tokens x, r = the instruction relevance of
    :func:`instruction_relevance` from ``VisualTokens.text_sim``. Kept tokens in patch order.

    Differs from the official code: relevance is read from CLIP's last layer on this package's
    LVLM (official: the penultimate, the one LLaVA reads; under ``attach``: see the module
    docstring) and is not negated by default (``negate_relevance``),
    the instruction is one embedding (the official code averages over the instruction's 77-token
    CLIP segments), min-max runs per image (official: over the call's batch, one image's crops
    on LLaVA-NeXT, each crop keeping its own k), and a kernel whose rank is used up still yields
    k tokens (see :func:`dpp_greedy_map`).
    """
    p: CDPrunerParams = method_params_of(CDPrunerParams, "cdpruner", params)
    k = _fixed_k(vt, budget, "cdpruner")
    if vt.text_sim is None:
        raise ValueError("cdpruner: VisualTokens.text_sim is required (the instruction relevance of each token)")
    if k >= vt.n_tokens:
        return _all_tokens(vt)
    relevance = instruction_relevance(vt.text_sim, negate=p.negate_relevance, theta=p.theta)
    kernel = conditional_kernel(cosine_matrix(vt.tokens), relevance)        # [B, N, N]
    return _kept(vt, keep_mask(dpp_greedy_map(kernel, k), vt.n_tokens))
