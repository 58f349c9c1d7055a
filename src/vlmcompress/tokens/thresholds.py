"""Threshold rules on 1-D token scores: which tokens of each image to keep.

Every rule maps scores ``[B, N]`` (and an optional ``eligible`` mask ``[B, N]``: tokens the
rule may pick) to a bool keep-mask ``[B, N]``, per image, with no Python loop over tokens
or images:

- :func:`iqr_threshold` — PruMerge's rule: keep scores above ``Q3 + 1.5·IQR``
  (quartiles by linear interpolation, as ``np.percentile``).
- :func:`lof_threshold` — the Recoverable Compression code's rule: fit a local outlier
  factor (``sklearn.neighbors.LocalOutlierFactor``, ``contamination='auto'``) on the 1-D
  scores, take the *fraction* r of outliers (high and low alike), keep the top
  ``floor(n·r)`` scores. The LOF is re-implemented here, batched.
- :func:`topk_mask` — a fixed budget k (an int, or one count per image).

Ties are broken by patch index (lower first) so results never depend on sort internals.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LOF_EPS = 1e-10          # sklearn adds this to the mean reachability distance
LOF_AUTO_THRESHOLD = 1.5  # contamination='auto': outlier iff LOF > 1.5 (offset_ = -1.5)

Ineligible = Literal["fill_min", "exclude"]
CountBase = Literal["eligible", "all"]


def _check(scores: Tensor, eligible: Tensor | None, what: str = "scores") -> Tensor:
    if scores.ndim != 2:
        raise ValueError(f"{what}: expected [B, N], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{what}: contains NaN")
    if eligible is None:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if eligible.dtype != torch.bool or eligible.shape != scores.shape:
        raise ValueError(f"eligible: expected a bool mask of shape {tuple(scores.shape)}, "
                         f"got {eligible.dtype} {tuple(eligible.shape)}")
    return eligible


def _counts(k: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """An int or a [B] tensor of counts as a [B] long tensor."""
    if isinstance(k, Tensor):
        if k.shape != (batch,):
            raise ValueError(f"k: expected an int or a [{batch}] tensor, got shape {tuple(k.shape)}")
        kt = k.to(device=device, dtype=torch.long)
    else:
        kt = torch.full((batch,), int(k), dtype=torch.long, device=device)
    if (kt < 0).any():
        raise ValueError(f"k: counts must be >= 0, got {kt.tolist()}")
    return kt


def descending_order(scores: Tensor, eligible: Tensor) -> Tensor:
    """[B, N] long: eligible positions by score, highest first (ties: lower index first),
    then the ineligible ones."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    second = torch.sort((~eligible.gather(1, order)).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, second)


def ranks(order: Tensor) -> Tensor:
    """Inverse permutation: ``ranks(order)[b, order[b, r]] == r``."""
    r = torch.empty_like(order)
    r.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return r


def topk_mask(scores: Tensor, k: int | Tensor, eligible: Tensor | None = None) -> Tensor:
    """Keep the ``k`` highest eligible scores of each image (k capped at the eligible count).

    scores: [B, N]; k: int or [B]; eligible: [B, N] bool -> [B, N] bool
    """
    el = _check(scores, eligible)
    kt = torch.minimum(_counts(k, scores.shape[0], scores.device), el.sum(dim=1))
    return (ranks(descending_order(scores, el)) < kt.unsqueeze(1)) & el


def masked_quantile(x: Tensor, valid: Tensor, q: float) -> Tensor:
    """Per-row quantile over the valid entries, linear interpolation (``np.percentile``'s
    default). x, valid: [B, N] -> [B] float64, NaN for rows without a valid entry."""
    n = valid.sum(dim=1)
    xs = torch.sort(x.double().masked_fill(~valid, float("inf")), dim=1).values
    last = (n - 1).clamp(min=0)
    pos = q * last.double()
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last)
    v_lo = xs.gather(1, lo.unsqueeze(1)).squeeze(1)
    v_hi = xs.gather(1, hi.unsqueeze(1)).squeeze(1)
    out = v_lo + (v_hi - v_lo) * (pos - lo.double())
    return out.masked_fill(n == 0, float("nan"))


def iqr_threshold(scores: Tensor, eligible: Tensor | None = None, *, whisker: float = 1.5,
                  min_keep: int = 0) -> Tensor:
    """PruMerge's interquartile rule: keep eligible scores ``> Q3 + whisker·(Q3 - Q1)``,
    quartiles taken over the eligible scores of each image; then make sure at least
    ``min_keep`` (the highest) are kept.

    scores: [B, N]; eligible: [B, N] bool -> [B, N] bool
    """
    el = _check(scores, eligible)
    q1 = masked_quantile(scores, el, 0.25)
    q3 = masked_quantile(scores, el, 0.75)
    upper = q3 + whisker * (q3 - q1)
    keep = el & (scores.double() > upper.unsqueeze(1))   # NaN upper (no eligible) keeps none
    if min_keep > 0:
        keep = keep | topk_mask(scores, min_keep, el)
    return keep


def lof_scores(values: Tensor, valid: Tensor | None = None, n_neighbors: int = 20) -> Tensor:
    """Local outlier factor of each 1-D value among the valid values of its image.

    Same definition as scikit-learn's ``LocalOutlierFactor`` (``fit`` on the values, the
    ``-negative_outlier_factor_``): k = min(n_neighbors, n-1) nearest neighbours excluding
    the point itself, reach-dist(a, b) = max(k-dist(b), |a-b|),
    lrd(a) = 1 / (mean reach-dist + 1e-10), LOF(a) = mean lrd(neighbours) / lrd(a).
    Values are rounded to float32 first, as the official code feeds float32 to sklearn.
    In 1-D the k nearest neighbours of a point lie within k places of it in sorted order,
    so only a window of 2k candidates is examined: O(N·k) memory, not O(N²).

    values: [B, N]; valid: [B, N] bool -> [B, N] float64 (NaN where invalid or n < 2)
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors: must be >= 1, got {n_neighbors}")
    el = _check(values, valid, "values")
    B, N = values.shape
    dev = values.device
    out = torch.full((B, N), float("nan"), dtype=torch.float64, device=dev)
    if N < 2:
        return out
    v = values.detach().to(torch.float32).to(torch.float64)
    n = el.sum(dim=1)                                               # [B]
    k = torch.clamp(torch.clamp(n - 1, max=n_neighbors), min=1)    # [B] neighbours used
    K = min(int(k.max()), N - 1)

    # Sort ascending with invalid values last; work in sorted space.
    order = torch.sort(v, dim=1, stable=True).indices
    order = order.gather(1, torch.sort((~el.gather(1, order)).to(torch.uint8), dim=1, stable=True).indices)
    sv = v.gather(1, order).masked_fill(~el.gather(1, order), 0.0)  # [B, N]

    steps = torch.arange(1, K + 1, device=dev)
    offs = torch.stack([-steps, steps], dim=1).reshape(-1)           # -1, 1, -2, 2, ...
    pos = torch.arange(N, device=dev)
    cand = pos.unsqueeze(1) + offs.unsqueeze(0)                      # [N, 2K]
    inside = (cand >= 0).unsqueeze(0) & (cand.unsqueeze(0) < n.view(B, 1, 1))  # [B, N, 2K]
    cand = cand.clamp(0, N - 1).unsqueeze(0).expand(B, N, 2 * K)
    dist = (sv.gather(1, cand.reshape(B, -1)).view(B, N, 2 * K) - sv.unsqueeze(2)).abs()
    dist = dist.masked_fill(~inside, float("inf"))
    dist, pick = torch.sort(dist, dim=2, stable=True)
    dist = dist[..., :K]                                             # [B, N, K] kNN distances
    nbr = cand.gather(2, pick[..., :K])                              # [B, N, K] sorted positions
    use = torch.arange(K, device=dev).view(1, 1, K) < k.view(B, 1, 1)

    kdist = dist.gather(2, (k - 1).view(B, 1, 1).expand(B, N, 1)).squeeze(2)     # [B, N]
    reach = torch.maximum(dist, kdist.gather(1, nbr.reshape(B, -1)).view(B, N, K))
    kf = k.to(torch.float64).view(B, 1)
    lrd = 1.0 / (torch.where(use, reach, 0.0).sum(dim=2) / kf + LOF_EPS)
    lrd_nbr = lrd.gather(1, nbr.reshape(B, -1)).view(B, N, K)
    lof_sorted = torch.where(use, lrd_nbr, 0.0).sum(dim=2) / kf / lrd
    ok = (pos.unsqueeze(0) < n.unsqueeze(1)) & (n >= 2).unsqueeze(1)
    lof_sorted = lof_sorted.masked_fill(~ok, float("nan"))
    return out.scatter(1, order, lof_sorted)


def lof_threshold(scores: Tensor, eligible: Tensor | None = None, *, n_neighbors: int = 20,
                  threshold: float = LOF_AUTO_THRESHOLD, ineligible: Ineligible = "fill_min",
                  count_base: CountBase = "eligible", min_keep: int = 0) -> Tensor:
    """The Recoverable Compression rule: keep the top ``floor(base · r)`` eligible scores,
    r = fraction of LOF outliers (LOF > ``threshold``) among the fitted scores.

    ineligible: ``'fill_min'`` fits LOF on all N scores with ineligible ones replaced by the
        image's minimum score (what the official code does for text recovery: salient
        tokens' text scores are set to the minimum), so r = outliers / N;
        ``'exclude'`` fits LOF on the eligible scores only, r = outliers / n_eligible.
    count_base: ``'eligible'`` -> base = number of eligible tokens; ``'all'`` -> base = N.
    min_keep: keep at least this many (the highest) when eligible tokens exist.

    scores: [B, N]; eligible: [B, N] bool -> [B, N] bool
    """
    el = _check(scores, eligible)
    B, N = scores.shape
    if ineligible == "fill_min":
        fill = scores.min(dim=1, keepdim=True).values
        values, fitted = torch.where(el, scores, fill), torch.ones_like(el)
    elif ineligible == "exclude":
        values, fitted = scores, el
    else:
        raise ValueError(f"ineligible: expected 'fill_min' or 'exclude', got {ineligible!r}")
    if count_base == "eligible":
        base = el.sum(dim=1)
    elif count_base == "all":
        base = torch.full((B,), N, dtype=torch.long, device=scores.device)
    else:
        raise ValueError(f"count_base: expected 'eligible' or 'all', got {count_base!r}")
    n_out = (lof_scores(values, fitted, n_neighbors) > threshold).sum(dim=1)
    # Integer form of int(base * n_out / n_fit): no float round-off at exact multiples.
    count = n_out * base // fitted.sum(dim=1).clamp(min=1)
    count = torch.clamp(count, min=min_keep)
    return topk_mask(scores, count, el)


THRESHOLD_RULES = ("iqr", "lof")


def adaptive_mask(rule: str, scores: Tensor, eligible: Tensor | None = None, *,
                  whisker: float = 1.5, n_neighbors: int = 20,
                  lof_threshold_value: float = LOF_AUTO_THRESHOLD,
                  ineligible: Ineligible = "fill_min", count_base: CountBase = "eligible",
                  min_keep: int = 0) -> Tensor:
    """Dispatch to an adaptive rule by name (``'iqr'`` or ``'lof'``), each taking its own options."""
    if rule == "iqr":
        return iqr_threshold(scores, eligible, whisker=whisker, min_keep=min_keep)
    if rule == "lof":
        return lof_threshold(scores, eligible, n_neighbors=n_neighbors, threshold=lof_threshold_value,
                             ineligible=ineligible, count_base=count_base, min_keep=min_keep)
    raise ValueError(f"threshold rule: expected one of {THRESHOLD_RULES}, got {rule!r}")
