"""The two records every token-compression method speaks: :class:`VisualTokens` in,
:class:`Compressed` out, plus the helpers that build a padded :class:`Compressed`.

Layout of a :class:`Compressed` row (one image): kept patch tokens (salient, then recovered,
interleaved in their original row-major order), then merged cluster tokens, then the
global token, then zero padding. ``mask`` marks the real rows, so images of one batch may
keep different numbers of tokens (adaptive thresholds).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Values of Compressed.kind.
KIND_PAD = 0        # padding row
KIND_SALIENT = 1    # kept patch token (salient by attention, or kept by a peer's rule)
KIND_RECOVERED = 2  # patch token recovered by its similarity to the question text
KIND_MERGED = 3     # cluster token: a centre plus the tokens it absorbed
KIND_GLOBAL = 4     # one token summarising every token that was neither kept nor a centre
KIND_POOLED = 5     # pooled or otherwise synthesised token

KIND_NAMES: dict[int, str] = {
    KIND_PAD: "pad", KIND_SALIENT: "salient", KIND_RECOVERED: "recovered",
    KIND_MERGED: "merged", KIND_GLOBAL: "global", KIND_POOLED: "pooled",
}


@dataclass
class VisualTokens:
    """What the model adapter hands to a compression method (one batch of images).

    tokens:        [B, N, D]  projected visual tokens (LM input space), row-major patch order
    keys:          [B, N, Dk] keys (or hidden states) of the chosen vision layer (merge similarity)
    cls_attn:      [B, N]     CLS-row softmax attention, mean over heads, CLS column removed
    cls_attn_full: [B, N]     optional; single-head attention over the full width (q·kᵀ/√C),
                              what the PruMerge and Recoverable Compression code compute
    text_sim:      [B, N]     optional; cosine similarity of each patch (CLIP joint space)
                              to the question's text embedding
    grid:          (H, W)     patch grid, H*W == N
    hidden:        [B, N, Dv] optional; the vision features the projector maps to ``tokens``
    project:       optional; the projector, [..., Dv] -> [..., D] token-wise, so
                   ``project(hidden) == tokens`` (methods that merge before projecting)
    text_dim:      optional; width P of the space where ``text_sim``'s cosine was taken
    """

    tokens: Tensor
    keys: Tensor
    cls_attn: Tensor
    cls_attn_full: Tensor | None = None
    text_sim: Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    hidden: Tensor | None = None
    project: Callable[[Tensor], Tensor] | None = None
    text_dim: int | None = None

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def validate(self) -> "VisualTokens":
        """Raise ``ValueError`` naming the offending field; return ``self`` when consistent."""
        if self.tokens.ndim != 3:
            raise ValueError(f"VisualTokens.tokens: expected [B, N, D], got shape {tuple(self.tokens.shape)}")
        B, N, _ = self.tokens.shape
        if N < 1:
            raise ValueError("VisualTokens.tokens: needs at least one token (N >= 1)")
        if self.keys.ndim != 3 or tuple(self.keys.shape[:2]) != (B, N):
            raise ValueError(f"VisualTokens.keys: expected [{B}, {N}, Dk], got shape {tuple(self.keys.shape)}")
        for name in ("cls_attn", "cls_attn_full", "text_sim"):
            t = getattr(self, name)
            if t is None:
                if name == "cls_attn":
                    raise ValueError("VisualTokens.cls_attn: required")
                continue
            if tuple(t.shape) != (B, N):
                raise ValueError(f"VisualTokens.{name}: expected [{B}, {N}], got shape {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"VisualTokens.{name}: contains NaN or inf")
        if self.hidden is not None and (self.hidden.ndim != 3 or tuple(self.hidden.shape[:2]) != (B, N)):
            raise ValueError(f"VisualTokens.hidden: expected [{B}, {N}, Dv], got shape {tuple(self.hidden.shape)}")
        if len(self.grid) != 2 or self.grid[0] * self.grid[1] != N:
            raise ValueError(f"VisualTokens.grid: {tuple(self.grid)} does not multiply to N={N}")
        return self

    def select(self, rows: Tensor | slice | list[int]) -> "VisualTokens":
        """The same record restricted to some images of the batch (for per-image checks)."""
        opt = lambda t: None if t is None else t[rows]  # noqa: E731
        return VisualTokens(self.tokens[rows], self.keys[rows], self.cls_attn[rows],
                            opt(self.cls_attn_full), opt(self.text_sim), self.grid, opt(self.hidden),
                            self.project, self.text_dim)


@dataclass
class Compressed:
    """What a method returns.

    tokens: [B, K, D]  K = max kept over the batch; padding rows are zeros
    mask:   [B, K]     bool, True = real token
    source: [B, K]     long, original patch index of kept/recovered tokens; -1 otherwise
    kind:   [B, K]     int8, one of the KIND_* values (0 = padding)
    position: [B, K]   long, the patch each token stands at: its own for a kept token, its
                       centre's for a merged or pooled one, N - 1 (the grid's end) for a global
                       token, 0 for padding (for LMs that give visual tokens grid positions)
    """

    tokens: Tensor
    mask: Tensor
    source: Tensor
    kind: Tensor
    # [B, N] int8, the role of each original patch (for figures): KIND_SALIENT / KIND_RECOVERED
    # if kept, KIND_MERGED if it is a cluster centre (or a VisionZip target), KIND_POOLED for
    # pooling, 0 otherwise (dropped: absorbed by a cluster or the global token, or lost)
    cells: Tensor | None = None
    position: Tensor | None = None

    def counts(self) -> Tensor:
        """[B] number of real tokens per image."""
        return self.mask.sum(dim=1)

    def count_kind(self, kind: int) -> Tensor:
        """[B] number of tokens of one kind per image."""
        return (self.kind == kind).sum(dim=1)

    def unpad(self, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """Image ``b`` without padding: tokens [K_b, D], source [K_b], kind [K_b]."""
        m = self.mask[b]
        return self.tokens[b][m], self.source[b][m], self.kind[b][m]


def resolve_budget(n_tokens: int, budget: int | float) -> int:
    """Number of output tokens for a budget: an ``int`` is a count, a ``float`` a fraction of N.

    Fractions round half up (0.05 * 576 -> 29, 0.10 * 576 -> 58) and never go below one
    token; counts are capped at N.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget: expected an int count or a float fraction, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget: a token count must be >= 1, got {budget}")
        return min(budget, n_tokens)
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget: a fraction must be in (0, 1], got {budget}")
    return max(1, min(n_tokens, int(math.floor(budget * n_tokens + 0.5))))


def front_order(flags: Tensor) -> Tensor:
    """[B, N] bool -> [B, N] long: positions with ``flags`` first (in index order), then the rest."""
    return torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices


def pack(tokens: Tensor, kept_kind: Tensor,
         extras: list[tuple[Tensor, Tensor, int]] = ()) -> Compressed:
    """Assemble a padded :class:`Compressed`.

    tokens:    [B, N, D] original tokens
    kept_kind: [B, N] int, KIND_* of each kept patch (0 = dropped); kept patches stay in
               row-major order, whatever their kind
    extras:    (values [B, M, D], valid [B, M] bool, kind) groups appended after the kept
               patches, in the given order, invalid rows skipped; an optional fourth item,
               centre patch indices [B, M], marks those patches with ``kind`` in ``cells``
    """
    B, N, D = tokens.shape
    dev = tokens.device
    parts_t, parts_v, parts_k, parts_s = [tokens], [kept_kind > 0], [kept_kind.to(torch.int8)], \
        [torch.arange(N, device=dev).expand(B, N)]
    parts_p = [parts_s[0]]
    cells = kept_kind.to(torch.int8).clone()
    for values, valid, kind, *centres in extras:
        M = values.shape[1]
        if centres and M > 0:
            mark = torch.zeros_like(cells).scatter_(1, centres[0], valid.to(torch.int8))
            cells = torch.where((mark > 0) & (cells == 0), torch.tensor(kind, dtype=torch.int8, device=dev), cells)
        parts_t.append(values.to(tokens.dtype))
        parts_v.append(valid)
        parts_k.append(torch.full((B, M), kind, dtype=torch.int8, device=dev))
        parts_s.append(torch.full((B, M), -1, dtype=torch.long, device=dev))
        parts_p.append(centres[0].long() if centres else torch.full((B, M), N - 1, dtype=torch.long, device=dev))
    valid = torch.cat(parts_v, dim=1)
    K = int(valid.sum(dim=1).max()) if B > 0 else 0
    order = front_order(valid)[:, :K]                        # real rows first, order kept
    mask = valid.gather(1, order)
    out_t = torch.cat(parts_t, dim=1).gather(1, order.unsqueeze(-1).expand(B, K, D))
    out_t = out_t.masked_fill(~mask.unsqueeze(-1), 0)
    kind = torch.cat(parts_k, dim=1).gather(1, order).masked_fill(~mask, KIND_PAD)
    source = torch.cat(parts_s, dim=1).gather(1, order)
    source = torch.where(mask & ((kind == KIND_SALIENT) | (kind == KIND_RECOVERED)), source, -1)
    position = torch.cat(parts_p, dim=1).gather(1, order).masked_fill(~mask, 0)
    return Compressed(out_t, mask, source, kind, cells, position)
