"""Attach a token-compression method to one LVLM instance, for one call.

The methods are pure tensor code (:mod:`vlmcompress.tokens.methods`); :class:`TokenCompressor`
is the thin layer that feeds one from the adapter's
:class:`~vlmcompress.lvlm.adapter.VisualFeatures`: CLS attention and keys of the chosen vision
layer, and — for text-guided methods — the cosine similarity of every patch (in CLIP's joint
space) to the question's CLIP text embedding (pooled as the method's ``text_pooling`` says);
for ``merge_space: vision``, the vision features before the projector and the projector.
FastV, which prunes inside the LM, is :class:`~vlmcompress.tokens.fastv.FastV`. Nothing is patched on a class: a transform is a plain
object passed to ``LVLM.generate(transform=...)``, so it is detached as soon as that call
returns. :func:`make_transform` builds either from a method name and the ``tokens`` params.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmcompress.tokens.config import TEXT_GUIDED, TokensParams, method_spec
from vlmcompress.tokens.fastv import FastV
from vlmcompress.tokens.methods import compress
from vlmcompress.tokens.types import Compressed, VisualTokens

__all__ = ["TEXT_GUIDED", "TextEmbeddingCache", "TokenCompressor", "make_transform"]


class TextEmbeddingCache:
    """``texts -> [B, P]`` CLIP text embeddings, each distinct text encoded once per pooling
    (the stage runs one question through many methods and budgets)."""

    def __init__(self, lvlm: Any) -> None:
        self.lvlm = lvlm
        self.memo: dict[tuple[str, str], Tensor] = {}

    def __call__(self, texts: Sequence[str], pooling: str = "eos") -> Tensor:
        new = list(dict.fromkeys(t for t in texts if (pooling, t) not in self.memo))
        if new:
            kw = {} if pooling == "eos" else {"pooling": pooling}   # a plain text_embeddings(texts) suffices for eos
            emb = self.lvlm.text_embeddings(new, **kw)
            self.memo.update(((pooling, t), e) for t, e in zip(new, emb))
        return torch.stack([self.memo[pooling, t] for t in texts])


@dataclass
class TokenCompressor:
    """``(features, questions) -> (tokens [B, K, D], mask [B, K])`` for ``LVLM.generate``.

    ``last`` keeps the most recent :class:`Compressed` (kinds and sources of the kept tokens),
    for figures and for reporting the mean number of tokens kept. ``text_encoder`` (default:
    the LVLM's CLIP text tower) embeds the questions of text-guided methods.
    """

    lvlm: Any
    method: str
    budget: int | float | None = None
    attention: str = "head_mean"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    text_encoder: Callable[[Sequence[str]], Tensor] | None = None
    grid_positions: bool = False      # also return each token's grid position (see TokenTransform)
    last: Compressed | None = None
    kept: list[int] = field(default_factory=list)
    text_seconds: float = 0.0         # time spent in the text encoder (part of the selection cost)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    @property
    def uses_text(self) -> bool:
        """Only text-guided methods read the question; the others compress per image."""
        return self.method in TEXT_GUIDED

    def _switch(self, name: str, default: str) -> str:
        """A switch of the method's params (preset defaults included); ``default`` if the method
        has no such field or its params are bad (``compress`` reports those)."""
        try:
            return getattr(method_spec(self.method).params(**self.params), name, default)
        except (KeyError, TypeError, ValueError):
            return default

    def visual_tokens(self, feats, questions: Sequence[str]) -> VisualTokens:
        text_sim = text_dim = None
        if self.method in TEXT_GUIDED:
            encode = self.text_encoder or self.lvlm.text_embeddings
            pooling = self._switch("text_pooling", "eos")
            t0 = time.perf_counter()
            text = encode(questions) if pooling == "eos" else encode(questions, pooling=pooling)   # [B, P]
            self.text_seconds += time.perf_counter() - t0
            patches = self.lvlm.patch_embeddings(feats)                 # [B, N, P]
            text_sim = torch.einsum("bnp,bp->bn", patches, text.to(patches))
            text_dim = int(patches.shape[-1])
        hidden = project = None
        if self._switch("merge_space", "projected") == "vision":      # merge before the projector
            hidden, project = feats.hidden, self.lvlm.projector
        return VisualTokens(tokens=feats.tokens, keys=feats.keys, cls_attn=feats.cls_attn,
                            cls_attn_full=feats.cls_attn_full, text_sim=text_sim, grid=feats.grid,
                            hidden=hidden, project=project, text_dim=text_dim)

    def __call__(self, feats, questions: Sequence[str]) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        out = compress(self.visual_tokens(feats, questions), self.method, budget=self.budget,
                       attention=self.attention, generator=self._gen, **self.params)
        self.last = out
        self.kept += out.mask.sum(1).tolist()
        if self.grid_positions:
            return out.tokens, out.mask, out.position
        return out.tokens, out.mask

    @property
    def mean_tokens(self) -> float:
        return sum(self.kept) / len(self.kept) if self.kept else float("nan")


def make_transform(lvlm: Any, method: str, budget: int | float | None, params: TokensParams,
                   seed: int = 0, text_encoder: Callable[[Sequence[str]], Tensor] | None = None
                   ) -> TokenCompressor | FastV | None:
    """The transform of a registered method at a budget (``None``: adaptive), configured from the
    ``tokens`` params (``tokens.<method>``); ``None`` for ``full`` (every token, the adapter's
    fastest path). An in-LM method (``fastv``) gives the transform its callable makes."""
    kwargs = params.method_params(method)
    if method == "full":
        return None
    spec = method_spec(method)
    if spec.in_lm:   # its registered callable makes the LM transform (FastV for fastv)
        if budget is None and not spec.adaptive:
            raise ValueError(f"{method}: has no adaptive mode; give a budget")
        return spec.fn(budget=budget, **kwargs)
    return TokenCompressor(lvlm, method, budget=budget, attention=params.attention, params=kwargs,
                           seed=seed, text_encoder=text_encoder, grid_positions=params.grid_positions)
