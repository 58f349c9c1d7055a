"""Merging: turn many visual tokens into a few, batched and padded.

- :func:`merge_into_centres` — PruMerge / Recoverable Compression clustering: each centre
  absorbs its ``n_neighbors`` most similar pool tokens (key cosine similarity, plus an
  optional additive score such as a weighted text similarity), weighted by CLS attention.
- :func:`global_token` — one attention-weighted summary of a set of tokens.
- :func:`visionzip_contextual` — VisionZip's contextual tokens: evenly spaced targets,
  every other remaining token joins its most similar target, plain average.
- :func:`avg_pool_tokens` — uniform spatial average pooling of the patch grid.

Weighting (``mode``): ``'average'`` returns a normalised attention-weighted mean of the
centre and the tokens it absorbed, so merging identical tokens returns that token;
``'residual'`` is what the official PruMerge and Recoverable Compression code compute,
``x_centre + Σ a_j x_j`` (and ``Σ a_j x_j`` for the global token) with unnormalised
softmax weights.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmcompress.tokens.types import front_order

MergeMode = Literal["average", "residual"]


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, C], idx [B, M] -> [B, M, C]."""
    return x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def merge_into_centres(tokens: Tensor, keys: Tensor, weights: Tensor, centres: Tensor, pool: Tensor, *,
                       n_neighbors: int = 32, extra_score: Tensor | None = None,
                       mode: MergeMode = "average") -> tuple[Tensor, Tensor]:
    """Each centre absorbs its nearest pool tokens.

    For centre i, candidates are the ``pool`` tokens other than i; their score is
    ``cos(key_i, key_j) + extra_score_j``; the ``n_neighbors`` best are absorbed with weight
    ``weights_j``. A token may be absorbed by several centres (as in the official code).

    tokens [B, N, D], keys [B, N, Dk], weights [B, N] (>= 0, e.g. CLS attention),
    centres [B, N] bool, pool [B, N] bool, extra_score [B, N] or None
    -> merged [B, M, D] (centres in patch order, M = max centres per image), valid [B, M] bool
    """
    if mode not in ("average", "residual"):
        raise ValueError(f"merge mode: expected 'average' or 'residual', got {mode!r}")
    B, N, D = tokens.shape
    n_c = centres.sum(dim=1)
    M = int(n_c.max()) if B else 0
    valid = torch.arange(M, device=tokens.device).unsqueeze(0) < n_c.unsqueeze(1)
    if M == 0:
        return tokens.new_zeros(B, 0, D), valid
    cidx = front_order(centres)[:, :M]                                   # [B, M]
    x = tokens.float()
    w = weights.float()
    kn = F.normalize(keys.float(), dim=-1)
    score = _gather_rows(kn, cidx) @ kn.transpose(1, 2)                  # [B, M, N]
    if extra_score is not None:
        score = score + extra_score.float().unsqueeze(1)
    allowed = pool.unsqueeze(1).expand(B, M, N).clone()
    allowed.scatter_(2, cidx.unsqueeze(-1), False)                      # never itself
    score = score.masked_fill(~allowed, float("-inf"))
    kk = min(n_neighbors, N)
    W = torch.zeros(B, M, N, dtype=torch.float32, device=tokens.device)
    if kk > 0:
        top, nbr = score.topk(kk, dim=2)
        w_sel = torch.where(torch.isfinite(top), w.gather(1, nbr.reshape(B, -1)).view(B, M, kk), 0.0)
        W.scatter_add_(2, nbr, w_sel)
    absorbed = W @ x                                                     # [B, M, D]
    x_c = _gather_rows(x, cidx)
    if mode == "residual":
        out = x_c + absorbed
    else:
        a_c = w.gather(1, cidx)
        denom = a_c + W.sum(dim=2)
        mean = (a_c.unsqueeze(-1) * x_c + absorbed) / denom.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
        out = torch.where((denom > 0).unsqueeze(-1), mean, x_c)          # all-zero weights: keep centre
    out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
    return out.to(tokens.dtype), valid


def global_token(tokens: Tensor, weights: Tensor, members: Tensor, *,
                 mode: MergeMode = "average") -> tuple[Tensor, Tensor]:
    """One token summarising ``members``: attention-weighted mean (``'average'``; a plain
    mean if all weights are zero) or the official unnormalised ``Σ a_j x_j`` (``'residual'``).

    tokens [B, N, D], weights [B, N], members [B, N] bool -> token [B, 1, D], valid [B, 1]
    """
    if mode not in ("average", "residual"):
        raise ValueError(f"merge mode: expected 'average' or 'residual', got {mode!r}")
    x = tokens.float()
    w = torch.where(members, weights.float(), 0.0)
    agg = torch.einsum("bn,bnd->bd", w, x)
    if mode == "average":
        s = w.sum(dim=1, keepdim=True)
        m = members.float()
        plain = torch.einsum("bn,bnd->bd", m, x) / m.sum(dim=1, keepdim=True).clamp(min=1)
        agg = torch.where(s > 0, agg / s.clamp(min=torch.finfo(torch.float32).tiny), plain)
    valid = members.any(dim=1, keepdim=True)
    agg = agg.masked_fill(~valid, 0.0)
    return agg.unsqueeze(1).to(tokens.dtype), valid


def visionzip_targets(remaining: Tensor, n_contextual: int | Tensor) -> tuple[Tensor, Tensor]:
    """The targets of :func:`visionzip_contextual`: remaining ranks 0, s, 2s, … (first c).

    remaining [B, N] bool, n_contextual int or [B] -> targets [B, N] bool, c [B] long (capped
    at the number of remaining tokens)
    """
    B = remaining.shape[0]
    dev = remaining.device
    n_rem = remaining.sum(dim=1)
    c = n_contextual.to(dev).long() if isinstance(n_contextual, Tensor) else \
        torch.full((B,), int(n_contextual), dtype=torch.long, device=dev)
    c = torch.minimum(c.clamp(min=0), n_rem)
    rank = remaining.long().cumsum(dim=1) - 1
    step = torch.clamp(n_rem // c.clamp(min=1), min=1).unsqueeze(1)
    return remaining & (rank % step == 0) & (rank // step < c.unsqueeze(1)), c


def visionzip_contextual(tokens: Tensor, keys: Tensor, remaining: Tensor,
                         n_contextual: int | Tensor) -> tuple[Tensor, Tensor]:
    """VisionZip's contextual tokens.

    Among the ``remaining`` tokens of an image (in patch order, R of them), targets are the
    ones at ranks 0, s, 2s, … with s = max(1, R // c) (the first c of them); every other
    remaining token joins the target of highest key cosine similarity; each contextual
    token is the plain mean of its target and its members.

    tokens [B, N, D], keys [B, N, Dk], remaining [B, N] bool, n_contextual int or [B]
    -> contextual [B, C, D] (C = max c), valid [B, C] bool
    """
    B, N, D = tokens.shape
    dev = tokens.device
    target, c = visionzip_targets(remaining, n_contextual)
    C = int(c.max()) if B else 0
    valid = torch.arange(C, device=dev).unsqueeze(0) < c.unsqueeze(1)
    if C == 0:
        return tokens.new_zeros(B, 0, D), valid
    tidx = front_order(target)[:, :C]                                    # [B, C]
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn @ _gather_rows(kn, tidx).transpose(1, 2)                    # [B, N, C]
    sim = sim.masked_fill(~valid.unsqueeze(1), float("-inf"))
    members = remaining & ~target & (c > 0).unsqueeze(1)
    onehot = torch.zeros(B, N, C, dtype=torch.float32, device=dev)
    onehot.scatter_(2, sim.argmax(dim=2, keepdim=True), 1.0)
    onehot = onehot * members.unsqueeze(-1).float()
    x = tokens.float()
    agg = (onehot.transpose(1, 2) @ x + _gather_rows(x, tidx)) / (1.0 + onehot.sum(dim=1)).unsqueeze(-1)
    agg = agg.masked_fill(~valid.unsqueeze(-1), 0.0)
    return agg.to(tokens.dtype), valid


def pool_grid(grid: tuple[int, int], k: int, max_aspect: float = 2.0) -> tuple[int, int]:
    """Largest pooled grid (h, w), h <= H, w <= W, with h·w <= k and an aspect ratio within
    ``max_aspect`` of the patch grid's (ties: closest aspect; if no grid fits the aspect
    limit, the limit is dropped). A square budget such as 144 on a 24x24 grid gives 12x12
    exactly; 58 gives 7x8 = 56 tokens."""
    H, W = grid
    if k < 1:
        raise ValueError(f"pool: budget must be >= 1 token, got {k}")
    cands = [(h, min(W, k // h)) for h in range(1, min(H, k) + 1)]
    skew = {hw: abs(math.log((hw[0] / hw[1]) / (H / W))) for hw in cands}
    within = [hw for hw in cands if skew[hw] <= math.log(max_aspect) + 1e-12] or cands
    return max(within, key=lambda hw: (hw[0] * hw[1], -skew[hw]))


def avg_pool_tokens(tokens: Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> Tensor:
    """Uniform spatial average pooling (``adaptive_avg_pool2d``) of row-major patch tokens.

    tokens [B, H·W, D] -> [B, h·w, D] (row-major)
    """
    B, N, D = tokens.shape
    H, W = grid
    x = tokens.float().view(B, H, W, D).permute(0, 3, 1, 2)
    y = F.adaptive_avg_pool2d(x, out_grid)
    return y.flatten(2).transpose(1, 2).to(tokens.dtype)


def pool_cell_centres(grid: tuple[int, int], out_grid: tuple[int, int]) -> Tensor:
    """Row-major patch index of the centre of each :func:`avg_pool_tokens` cell -> ``[h·w]``."""
    (H, W), (h, w) = grid, out_grid
    rows = (torch.arange(h) * 2 + 1) * H // (2 * h)
    cols = (torch.arange(w) * 2 + 1) * W // (2 * w)
    return (rows[:, None] * W + cols[None, :]).flatten()
