"""Attach a registered token-compression method to one LVLM instance.

The method is pure tensor code (:mod:`vlmcompress.tokens.methods`); this is the thin layer
that feeds it from the adapter's :class:`~vlmcompress.lvlm.adapter.VisualFeatures`: CLS
attention and keys of the chosen vision layer, and — for text-guided methods — the cosine
similarity of every patch (in CLIP's joint space) to the question's CLIP text embedding.
Nothing is patched on a class: a :class:`TokenCompressor` is a plain callable passed to
``LVLM.generate(transform=...)`` for one call, so it is detached as soon as that call returns.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlmcompress.tokens.methods import compress
from vlmcompress.tokens.types import Compressed, VisualTokens

TEXT_GUIDED = {"recoverable"}


@dataclass
class TokenCompressor:
    """``(features, questions) -> (tokens [B, K, D], mask [B, K])`` for ``LVLM.generate``.

    ``last`` keeps the most recent :class:`Compressed` (kinds and sources of the kept tokens),
    for figures and for reporting the mean number of tokens kept.
    """

    lvlm: Any
    method: str
    budget: int | float | None = None
    attention: str = "head_mean"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    last: Compressed | None = None
    kept: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def visual_tokens(self, feats, questions: Sequence[str]) -> VisualTokens:
        text_sim = None
        if self.method in TEXT_GUIDED:
            text = self.lvlm.text_embeddings(questions)                 # [B, P]
            patches = self.lvlm.patch_embeddings(feats)                 # [B, N, P]
            text_sim = torch.einsum("bnp,bp->bn", patches, text)
        return VisualTokens(tokens=feats.tokens, keys=feats.keys, cls_attn=feats.cls_attn,
                            cls_attn_full=feats.cls_attn_full, text_sim=text_sim, grid=feats.grid)

    def __call__(self, feats, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        out = compress(self.visual_tokens(feats, questions), self.method, budget=self.budget,
                       attention=self.attention, generator=self._gen, **self.params)
        self.last = out
        self.kept += out.mask.sum(1).tolist()
        return out.tokens, out.mask

    @property
    def mean_tokens(self) -> float:
        return sum(self.kept) / len(self.kept) if self.kept else float("nan")
