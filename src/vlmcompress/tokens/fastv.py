"""FastV (arXiv 2403.06764): visual tokens dropped *inside* the LM, during prefill.

The first K decoder layers run on the whole prompt. In layer K (1-based; the official code's
``AGG_LAYER = 2``) the attention the last prompt token pays to each visual token, averaged over
heads, ranks them; layers K+1..L run on the text plus the top-k visual tokens only, which
keep their original positions (RoPE). Decoding continues on that cache: layers 1..K hold every
token, layers K+1..L only the kept ones, and each new token attends accordingly — the cached
form of the official code's masked prefill.

Only the one attention row FastV needs is formed: the last token's query in layer K against
the keys that layer has just cached (RoPE already applied), so the cost is O(T) and no
``output_attentions`` / eager switch is needed; the decoder layers themselves run with the
model's own attention implementation (eager or SDPA) and a 4-D additive mask that carries
the padding of a batch whose samples keep different numbers of tokens.

:class:`FastV` is a plain object handed to ``LVLM.generate(transform=...)`` for one call: it
gets every visual token and runs the prefill itself
(:class:`vlmcompress.lvlm.adapter.LMTransform`). Nothing is patched on a module or class.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from vlmcompress.tokens.thresholds import topk_mask
from vlmcompress.tokens.types import resolve_budget

SUPPORTED_ATTENTION = ("eager", "sdpa")


def additive_mask(mask: Tensor, n_query: int, dtype: torch.dtype) -> Tensor:
    """Causal + padding mask in the additive form eager and SDPA attention both accept.

    mask [B, S] (1 = real key, the last ``n_query`` columns are the queries) -> [B, 1, Q, S]
    with 0 where a query may attend and the dtype's minimum elsewhere.
    """
    S = mask.shape[1]
    q_pos = torch.arange(S - n_query, S, device=mask.device).view(n_query, 1)
    causal = torch.arange(S, device=mask.device).view(1, S) <= q_pos            # [Q, S]
    allowed = causal.unsqueeze(0) & mask.bool().unsqueeze(1)                     # [B, Q, S]
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``x [B, H, Q, hd]`` with ``cos, sin [B, Q, hd]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def last_query_attention(layer: nn.Module, hidden_in: Tensor, cos: Tensor, sin: Tensor, keys: Tensor,
                         mask: Tensor) -> Tensor:
    """Softmax attention of the last position's query over every key of one decoder layer,
    mean over heads.

    layer: a Llama-style decoder layer (``input_layernorm``, ``self_attn.q_proj``);
    hidden_in [B, 1, D]: the layer's input at the last position; cos, sin [B, 1, hd]: its
    rotary embedding; keys [B, H_kv, T, hd]: the keys this layer cached (RoPE applied);
    mask [B, T]: 1 = real token. -> [B, T] (rows sum to 1 over the real tokens)
    """
    attn = layer.self_attn
    B = hidden_in.shape[0]
    q = attn.q_proj(layer.input_layernorm(hidden_in)).view(B, 1, -1, attn.head_dim).transpose(1, 2)
    q = _rotate(q, cos, sin)                                                     # [B, H, 1, hd]
    k = keys.repeat_interleave(attn.num_key_value_groups, dim=1)                 # [B, H, T, hd]
    w = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling     # [B, H, T]
    w = w.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
    return torch.softmax(w, dim=-1).mean(dim=1)


def keep_visual(scores: Tensor, visual: Tensor, budget: int | float) -> Tensor:
    """FastV's choice: per sample, the top-k visual positions by ``scores`` (ties: earlier
    position), k = ``budget`` resolved against that sample's number of visual tokens.

    scores [B, T], visual [B, T] bool -> [B, T] bool (a subset of ``visual``)
    """
    counts = visual.sum(dim=1).tolist()
    k = torch.tensor([resolve_budget(int(n), budget) if n > 0 else 0 for n in counts],
                     dtype=torch.long, device=scores.device)
    return topk_mask(scores, k, visual)


def compact(keep: Tensor) -> Tensor:
    """Indices that gather the kept positions of each row, in order, right-aligned (left
    padding first, as the prompts are).

    keep [B, T] bool -> index [B, T'] long, T' = max kept; padding slots point at dropped rows
    """
    T2 = int(keep.sum(dim=1).max())
    order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices    # dropped first, then kept
    return order[:, keep.shape[1] - T2:]


def _run_layers(layers: Sequence[nn.Module], h: Tensor, mask4: Tensor, pos: Tensor,
                pe: tuple[Tensor, Tensor], cache: DynamicCache) -> Tensor:
    for layer in layers:
        h = layer(h, attention_mask=mask4, position_ids=pos, past_key_values=cache, use_cache=True,
                  position_embeddings=pe)
    return h


@dataclass
class FastVDecoder:
    """Decoding after a FastV prefill: layers < K attend over ``mask_full``, the rest over
    ``mask_kept``; positions continue those of the full prompt."""

    lvlm: Any
    cache: DynamicCache
    mask_full: Tensor     # [B, S]  every token of the prompt, then the generated ones
    mask_kept: Tensor     # [B, S'] text + kept visual tokens, then the generated ones
    layer: int

    def step(self, embeds: Tensor) -> Tensor:
        lm = self.lvlm.language_model
        ones = self.mask_full.new_ones(self.mask_full.shape[0], 1)
        self.mask_full = torch.cat([self.mask_full, ones], 1)
        self.mask_kept = torch.cat([self.mask_kept, ones], 1)
        pos = self.mask_full.sum(dim=1, keepdim=True) - 1
        pe = lm.rotary_emb(embeds, pos)
        h = _run_layers(lm.layers[:self.layer], embeds, additive_mask(self.mask_full, 1, embeds.dtype),
                        pos, pe, self.cache)
        h = _run_layers(lm.layers[self.layer:], h, additive_mask(self.mask_kept, 1, embeds.dtype),
                        pos, pe, self.cache)
        return self.lvlm.llava.lm_head(lm.norm(h[:, -1]))


@dataclass
class FastV:
    """FastV as a transform for ``LVLM.generate``: ``budget`` (fraction of each sample's visual
    tokens, or a count) kept after decoder layer ``layer`` (K, 1-based).

    The adapter hands it one prefix per image (``[prompt start, visual tokens]``) and one
    suffix per sample (the question): layers 1..K run on each prefix once — causal attention
    makes that exact — then on the suffixes; the last suffix token's attention in layer K
    ranks the visual tokens of its sample.

    After a call, ``scores [B, T]`` is layer K's attention row of the last token over the
    sample's sequence (prefix then suffix), ``last_keep [B, N]`` marks the visual tokens each
    sample kept (in visual-token order), ``cache`` is the pruned KV cache, ``kept`` lists kept
    counts per sample and ``selection_seconds`` the time spent choosing and gathering.
    """

    budget: int | float
    layer: int = 2
    scores: Tensor | None = None
    last_keep: Tensor | None = None
    cache: DynamicCache | None = None
    kept: list[int] = field(default_factory=list)
    selection_seconds: float = 0.0
    uses_text = True   # the ranking depends on the question

    def prefill(self, lvlm, prefix: Tensor, prefix_mask: Tensor, prefix_visual: Tensor, index: Tensor,
                suffix: Tensor, suffix_mask: Tensor) -> tuple[Tensor, FastVDecoder]:
        """Prefill with pruning after layer K (layout: :class:`vlmcompress.lvlm.adapter.LMTransform`)
        -> next-token logits [B, V] and the decoder."""
        lm = lvlm.language_model
        impl = lm.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"fastv: attention implementation {impl!r} is not supported "
                             f"(use one of {', '.join(SUPPORTED_ATTENTION)})")
        L = len(lm.layers)
        if not 1 <= self.layer <= L:
            raise ValueError(f"tokens.fastv.layer: must be in [1, {L}] for this LM, got {self.layer}")
        K, P, S = self.layer, prefix.shape[1], suffix.shape[1]
        early, last_early = lm.layers[:K - 1], lm.layers[K - 1:K]
        cache = DynamicCache(config=lm.config)

        # Layers 1..K on each image's prefix, once.
        pos = lvlm._position_ids(prefix_mask)
        pe = lm.rotary_emb(prefix, pos)
        m4 = additive_mask(prefix_mask, P, prefix.dtype)
        h_in = _run_layers(early, prefix, m4, pos, pe, cache)
        h = _run_layers(last_early, h_in, m4, pos, pe, cache)
        if not torch.equal(index, torch.arange(prefix.shape[0], device=index.device)):
            cache.reorder_cache(index)
            h, h_in = h.index_select(0, index), h_in.index_select(0, index)
        mask = prefix_mask.index_select(0, index)
        visual = prefix_visual.index_select(0, index)
        last_pe = (pe[0].index_select(0, index)[:, -1:], pe[1].index_select(0, index)[:, -1:])
        if S > 0:   # then layers 1..K on each sample's suffix, after its prefix
            mask = torch.cat([mask, suffix_mask], 1)
            visual = torch.cat([visual, torch.zeros_like(suffix_mask, dtype=torch.bool)], 1)
            pos_s = lvlm._position_ids(mask)[:, P:]
            pe_s = lm.rotary_emb(suffix, pos_s)
            m4 = additive_mask(mask, S, suffix.dtype)
            hs_in = _run_layers(early, suffix, m4, pos_s, pe_s, cache)
            hs = _run_layers(last_early, hs_in, m4, pos_s, pe_s, cache)
            h, h_in = torch.cat([h, hs], 1), hs_in
            last_pe = (pe_s[0][:, -1:], pe_s[1][:, -1:])

        t0 = time.perf_counter()
        scores = last_query_attention(lm.layers[K - 1], h_in[:, -1:], *last_pe, cache.layers[K - 1].keys, mask)
        keep_vis = keep_visual(scores, visual & mask.bool(), self.budget)
        keep = mask.bool() & (~visual | keep_vis)
        idx = compact(keep)                                                      # [B, T']
        h = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        pos2 = lvlm._position_ids(mask).gather(1, idx)                 # original positions
        mask2 = keep.gather(1, idx).long()
        self.selection_seconds += time.perf_counter() - t0

        pe2 = lm.rotary_emb(h, pos2)
        h = _run_layers(lm.layers[K:], h, additive_mask(mask2, mask2.shape[1], h.dtype), pos2, pe2, cache)
        logits = lvlm.llava.lm_head(lm.norm(h[:, -1]))
        self._record(keep_vis, visual)
        self.scores, self.cache = scores, cache
        return logits, FastVDecoder(lvlm, cache, mask, mask2, K)

    def _record(self, keep_vis: Tensor, visual: Tensor) -> None:
        """Kept flags in visual-token order: [B, N] (N = max visual tokens; padding False)."""
        order = compact(visual)                     # visual positions of each row, right-aligned
        self.last_keep = keep_vis.gather(1, order) & visual.gather(1, order)
        self.kept += keep_vis.sum(dim=1).tolist()

    @property
    def mean_tokens(self) -> float:
        return sum(self.kept) / len(self.kept) if self.kept else float("nan")
