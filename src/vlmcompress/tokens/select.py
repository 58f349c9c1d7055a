"""Token selection that is not a threshold on a score: budget splits, spatially uniform
samples (PruMerge+), seeded random choice, grid peaks of a score (text-guided recovery of
``recoverable_spread``), FastV's in-LM pruning step, and greedy max-min diversity (DivPrune's
selection, also ``salient_source: diverse``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def split_budget(k: int, shares: tuple[float, ...]) -> list[int]:
    """Split ``k`` tokens into ``len(shares) + 1`` parts: ``k·share`` rounded half up for
    each share (in order, never exceeding what is left), the remainder last. Sums to ``k``."""
    parts, left = [], k
    for s in shares:
        n = min(left, int(math.floor(k * s + 0.5)))
        parts.append(n)
        left -= n
    return parts + [left]


def spread_mask(eligible: Tensor, count: int | Tensor) -> Tensor:
    """Pick ``count`` eligible positions spread evenly over each image's eligible positions
    in row-major order: eligible ranks ``floor((i + 0.5)·n / count)``, i < count.

    eligible [B, N] bool, count int or [B] -> [B, N] bool (exactly min(count, n) per image)
    """
    B, N = eligible.shape
    dev = eligible.device
    n = eligible.sum(dim=1)
    c = count.to(dev).long() if isinstance(count, Tensor) else torch.full((B,), int(count), device=dev)
    c = torch.minimum(c.clamp(min=0), n)
    C = int(c.max()) if B else 0
    if C == 0:
        return torch.zeros_like(eligible)
    i = torch.arange(C, device=dev).unsqueeze(0)
    target = ((2 * i + 1) * n.unsqueeze(1)) // (2 * c.clamp(min=1).unsqueeze(1))   # integer form
    target = torch.where(i < c.unsqueeze(1), target, N)                            # N = discard slot
    by_rank = torch.zeros(B, N + 1, dtype=torch.bool, device=dev).scatter_(1, target, True)[:, :N]
    rank = (eligible.long().cumsum(dim=1) - 1).clamp(min=0)
    return eligible & by_rank.gather(1, rank)


def stride_mask(n_tokens: int, stride: Tensor, limit: int | None = None) -> Tensor:
    """Positions ``j`` with ``j % stride_b == 0`` and ``j < limit`` (default N).

    stride [B] long (>= 1) -> [B, N] bool
    """
    pos = torch.arange(n_tokens, device=stride.device).unsqueeze(0)
    limit = n_tokens if limit is None else limit
    return (pos % stride.clamp(min=1).unsqueeze(1) == 0) & (pos < limit)


def random_scores(shape: tuple[int, int], generator: torch.Generator | None, seed: int,
                  device: torch.device) -> Tensor:
    """Uniform random scores drawn on the CPU (same numbers on every device), then moved.

    A given ``generator`` is advanced; without one a fresh generator seeded with ``seed``
    is used, so a call is reproducible on its own."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, device=g.device).to(device)


def fastv_scores(attn: Tensor, image_start: int, n_image: int, query: str = "last") -> Tensor:
    """Attention each image token receives in one LM layer, FastV style.

    attn: [B, heads, T, T] softmax attention of layer K (FastV's aggregation layer).
    query: ``'last'`` — attention from the last prompt token (the official FastV code),
    ``'mean'`` — mean over all query positions. Heads are averaged.
    -> [B, n_image]
    """
    if attn.ndim != 4:
        raise ValueError(f"attn: expected [B, heads, T, T], got shape {tuple(attn.shape)}")
    if image_start < 0 or image_start + n_image > attn.shape[-1]:
        raise ValueError(f"image span [{image_start}, {image_start + n_image}) outside {attn.shape[-1]} positions")
    a = attn.float().mean(dim=1)                                        # [B, T, T]
    if query == "last":
        row = a[:, -1]
    elif query == "mean":
        row = a.mean(dim=1)
    else:
        raise ValueError(f"query: expected 'last' or 'mean', got {query!r}")
    return row[:, image_start:image_start + n_image]


def fastv_keep(attn_received: Tensor, k: int) -> Tensor:
    """FastV's pruning decision: the ``k`` image tokens that received the most attention,
    as indices in increasing order (so kept tokens keep their sequence order).

    attn_received [B, N] -> index [B, k] long, sorted ascending
    """
    if attn_received.ndim != 2:
        raise ValueError(f"attn_received: expected [B, N], got shape {tuple(attn_received.shape)}")
    N = attn_received.shape[1]
    if not (1 <= k <= N):
        raise ValueError(f"fastv_keep: k must be in [1, {N}], got {k}")
    # Stable descending sort: ties go to the earlier token, deterministically.
    order = torch.sort(attn_received, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def grid_peaks(scores: Tensor, grid: tuple[int, int], window: int = 3) -> Tensor:
    """Local maxima of row-major patch scores: patches at least as high as every other patch
    of the ``window`` x ``window`` square around them (3: the 8 neighbours) and higher than
    one of them. A flat region has no peak; two equal tops side by side are both peaks; the
    grid edge is no bound.

    scores [B, H·W], grid (H, W), window odd >= 3 -> [B, H·W] bool
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"grid_peaks: window must be odd and >= 3, got {window}")
    B, N = scores.shape
    x = scores.float().view(B, 1, *grid)
    # max_pool2d pads with -inf, so an edge patch is compared with its in-grid neighbours only;
    # the 3x3 window includes the patch itself, which is why "higher than one" needs the min.
    r = window // 2
    top = F.max_pool2d(x, window, stride=1, padding=r)
    low = -F.max_pool2d(-x, window, stride=1, padding=r)
    return ((x >= top) & (x > low)).view(B, N)


def peaks_first(scores: Tensor, grid: tuple[int, int], window: int = 3, floor: float = 0.0) -> Tensor:
    """``scores`` re-keyed so that every grid peak outranks every other patch, the order kept
    within each group: a top-k of the result takes the highest peaks (about one patch per
    object that scores high), then the highest remaining patches. A peak below ``floor`` of
    the way from the image's lowest score to its highest ranks as an ordinary patch.

    scores [B, N] -> [B, N] float
    """
    if not (0.0 <= floor < 1.0):
        raise ValueError(f"peaks_first: floor must be in [0, 1), got {floor}")
    x = scores.float()
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    peaks = grid_peaks(x, grid, window) & (x >= low + floor * (high - low))
    return torch.where(peaks, x + (high - low) + 1.0, x)


def cosine_matrix(x: Tensor) -> Tensor:
    """``[B, N, D]`` -> ``[B, N, N]`` float32 cosine similarity of every pair of tokens."""
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def keep_mask(picks: Tensor, n: int) -> Tensor:
    """``[B, k]`` token indices -> ``[B, n]`` bool, True at the picked tokens."""
    mask = torch.zeros(picks.shape[0], n, dtype=torch.bool, device=picks.device)
    return mask.scatter_(1, picks, True)


def max_min_greedy(dist: Tensor, k: int) -> Tensor:
    """Greedy max-min diverse subset (DivPrune's selection).

    dist: ``[B, N, N]`` symmetric distances (0 on the diagonal), N >= 2; returns ``[B, k]``
    indices in the order they were picked. First: the token whose nearest other token is
    farthest (the official code's second-smallest value of each column: the smallest is the
    token's distance to itself). Then: the token whose nearest picked token is farthest. Ties go
    to the lowest index. Picked tokens are excluded explicitly (the official code relies on their
    zero distance to themselves, which repeats a token when the rest are duplicates of picks).
    """
    B, N, _ = dist.shape
    rows = torch.arange(B, device=dist.device)
    self_pair = torch.eye(N, dtype=torch.bool, device=dist.device)
    score = dist.masked_fill(self_pair, float("inf")).amin(dim=1)           # [B, N] nearest-neighbour distance
    picks = torch.empty(B, k, dtype=torch.long, device=dist.device)
    for i in range(k):
        j = score.argmax(dim=1)                                             # [B]
        picks[:, i] = j
        to_j = dist[rows, j]                                                # [B, N] distance to the new pick
        score = to_j.clone() if i == 0 else torch.minimum(score, to_j)      # distance to the nearest pick
        score[rows, j] = float("-inf")                                      # picks stay out (min keeps -inf)
    return picks


def diverse_mask(tokens: Tensor, count: int | Tensor) -> Tensor:
    """``count`` tokens of each image picked greedily for max-min diversity (distance 1 - cosine,
    :func:`max_min_greedy`). The greedy order is nested, so a per-image count takes a prefix of
    one run at the largest count.

    tokens [B, N, D], count int or [B] -> [B, N] bool (exactly min(count, N) per image)
    """
    B, N, _ = tokens.shape
    c = count.long() if isinstance(count, Tensor) else torch.full((B,), int(count), dtype=torch.long)
    c = c.to(tokens.device).clamp(min=0, max=N)
    C = int(c.max()) if B else 0
    if C == 0:
        return torch.zeros(B, N, dtype=torch.bool, device=tokens.device)
    if N == 1:
        return (c > 0).unsqueeze(1)
    picks = max_min_greedy(1.0 - cosine_matrix(tokens), C)                  # [B, C] in pick order
    live = torch.arange(C, device=tokens.device).unsqueeze(0) < c.unsqueeze(1)
    picks = torch.where(live, picks, picks[:, :1])                          # dead slots repeat a live pick ...
    return keep_mask(picks, N) & (c > 0).unsqueeze(1)                       # ... or vanish when count is 0
