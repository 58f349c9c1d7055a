"""Registry of visual-token compression methods: name -> ``fn(VisualTokens, **params) -> Compressed``.

A method is one function registered with :func:`register_method` together with its params
dataclass (the schema of ``tokens.<name>`` in params.yaml); a preset (:func:`register_preset`)
is a registered method run with other defaults. Registering from any module, before use, makes
a method usable in :func:`compress`, :func:`vlmcompress.tokens.attach`, params.yaml and the
tokens stage. Every method takes the same keywords, so a runner can loop over names and budgets:

- ``budget``: ``None`` for the adaptive mode (only methods registered ``adaptive=True``),
  a float fraction of N or an int count for a fixed budget (output = exactly k tokens,
  except ``pool``, see :func:`vlmcompress.tokens.merge.pool_grid`). A budget >= N returns
  all tokens.
- ``attention``: ``'head_mean'`` (``VisualTokens.cls_attn``) or ``'full'``
  (``VisualTokens.cls_attn_full``); ignored by methods that use no attention.
- ``generator``: a ``torch.Generator`` (only ``random`` draws numbers).
- the fields of the method's params dataclass; :func:`compress` validates them against it and
  passes every field, defaults filled in.

FastV prunes inside the LM: it is registered ``in_lm=True`` for its params, and its callable
makes the transform (:class:`vlmcompress.tokens.fastv.FastV`), not a :class:`Compressed`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from vlmcompress.tokens.config import ADAPTIVE  # noqa: F401  (re-exported: callers read it here)
from vlmcompress.tokens.config import (
    IN_LM_METHODS, FastVParams, FullParams, MethodSpec, PoolParams, PruMergeParams, PruMergePlusParams, RandomParams,
    RecoverableParams, RegistryMap, VisionZipParams, add_method_spec, method_function, method_params_of, method_spec,
    method_specs, params_fields, preset_params, remove_method_spec, with_defaults,
)
from vlmcompress.tokens.config import CALL_KEYWORDS  # noqa: F401  (re-exported)
from vlmcompress.tokens.fastv import FastV
from vlmcompress.tokens.merge import (
    avg_pool_tokens, global_token, merge_into_centres, pool_cell_centres, pool_grid, visionzip_contextual, visionzip_targets,
)
from vlmcompress.tokens.select import diverse_mask, peaks_first, random_scores, split_budget, spread_mask, stride_mask
from vlmcompress.tokens.thresholds import adaptive_mask, iqr_threshold, topk_mask
from vlmcompress.tokens.types import (
    KIND_GLOBAL, KIND_MERGED, KIND_POOLED, KIND_RECOVERED, KIND_SALIENT, Compressed, VisualTokens,
    front_order, pack, resolve_budget,
)

Method = Callable[..., Any]
# Methods that compress the visual tokens before the LM (in-LM ones make a transform instead).
METHODS: Mapping[str, Method] = RegistryMap(lambda s: not s.in_lm, method_function)


def register_method(name: str, *, params: type, adaptive: bool = False, text_guided: bool = False,
                    in_lm: bool = False) -> Callable[[Method], Method]:
    """Decorator: register ``fn`` as token method ``name`` with its params dataclass.

    ``adaptive``: it accepts ``budget=None``; ``text_guided``: it reads ``vt.text_sim`` (callers
    then embed the question); ``in_lm``: it prunes inside the LM and ``fn(budget=..., **params)``
    returns a transform for ``LVLM.generate``. ``name`` becomes a key of the ``tokens`` section.
    """
    def wrap(fn: Method) -> Method:
        add_method_spec(MethodSpec(name, params, fn, adaptive=adaptive, text_guided=text_guided, in_lm=in_lm))
        return fn
    return wrap


def register_preset(name: str, *, base: str, doc: str | None = None, **defaults: Any) -> type:
    """Register ``name``: method ``base``'s function and traits with other parameter defaults.

    Returns the preset's params dataclass: ``base``'s with ``defaults`` (``doc`` is its
    docstring), the schema of ``tokens.<name>``. Parameters given at a call override them.
    """
    spec = method_spec(base)
    params = preset_params(name, spec.params, doc, **defaults)
    add_method_spec(dataclasses.replace(spec, name=name, params=params,
                                        fn=with_defaults(name, params, method_function(spec)), base=base))
    return params


def unregister_method(name: str) -> None:
    """Remove method (or preset) ``name`` from the registry."""
    remove_method_spec(name)


@contextmanager
def temporary_methods() -> Iterator[None]:
    """Methods and presets registered inside the block are unregistered when it exits."""
    before = set(method_specs())
    try:
        yield
    finally:
        for name in reversed([n for n in method_specs() if n not in before]):   # presets before their base
            remove_method_spec(name)


def method_names() -> list[str]:
    """Names of the methods that compress the visual tokens (not the in-LM ones)."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The function of a method that compresses the visual tokens."""
    if name in METHODS:
        return METHODS[name]
    known = ", ".join(METHODS)
    if name in IN_LM_METHODS:
        raise ValueError(f"token method {name!r} prunes inside the LM: it is a transform for LVLM.generate "
                         f"(make_transform), not a function of the visual tokens (known: {known})")
    raise ValueError(f"unknown token method {name!r} (known: {known})")


def compress(vt: VisualTokens, name: str, **kwargs: Any) -> Compressed:
    """Validate ``vt`` and the method's params (against its dataclass), then run method ``name``."""
    fn = get_method(name)
    call = {k: kwargs.pop(k) for k in CALL_KEYWORDS if k in kwargs}
    params = method_params_of(method_spec(name).params, name, kwargs)
    return fn(vt.validate(), **call, **params_fields(params))


# --- shared pieces ----------------------------------------------------------------------

def pick_attention(vt: VisualTokens, variant: str) -> Tensor:
    """[B, N] CLS attention of the requested variant."""
    if variant == "head_mean":
        return vt.cls_attn
    if variant == "full":
        if vt.cls_attn_full is None:
            raise ValueError("attention='full' but VisualTokens.cls_attn_full is None")
        return vt.cls_attn_full
    raise ValueError(f"attention: expected 'head_mean' or 'full', got {variant!r}")


def _fixed_k(vt: VisualTokens, budget: int | float | None, name: str) -> int:
    if budget is None:
        raise ValueError(f"{name}: has no adaptive mode; give a budget (fraction of N or token count)")
    return resolve_budget(vt.n_tokens, budget)


def _all_tokens(vt: VisualTokens) -> Compressed:
    B, N, _ = vt.tokens.shape
    kind = torch.full((B, N), KIND_SALIENT, dtype=torch.int8, device=vt.tokens.device)
    return pack(vt.tokens, kind)


def _kept_kind(*groups: tuple[Tensor, int]) -> Tensor:
    """[B, N] int8 kind map from (mask, kind) groups; later groups do not overwrite earlier."""
    out = torch.zeros(groups[0][0].shape, dtype=torch.int8, device=groups[0][0].device)
    for mask, kind in groups:
        out = torch.where(mask & (out == 0), torch.tensor(kind, dtype=torch.int8, device=out.device), out)
    return out


def _merge_values(vt: VisualTokens, space: str, method: str) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
    """What merging averages: the projected tokens [B, N, D], or the vision features [B, N, Dv]
    and the projector that maps the merged ones to [B, M, D]."""
    if space == "projected":
        return vt.tokens, None
    if space == "vision":
        if vt.hidden is None or vt.project is None:
            raise ValueError(f"{method}: merge_space='vision' needs VisualTokens.hidden and VisualTokens.project "
                             f"(the vision features and the projector)")
        return vt.hidden, vt.project
    raise ValueError(f"merge_space: expected 'projected' or 'vision', got {space!r}")


def _clusters_and_global(vt: VisualTokens, attn: Tensor, centres: Tensor, pool: Tensor,
                         members: Tensor, *, n_neighbors: int, mode: str, use_global: bool,
                         extra_score: Tensor | None = None, values: Tensor | None = None,
                         project: Callable[[Tensor], Tensor] | None = None,
                         global_without_centres: bool = True) -> list[tuple[Tensor, Tensor, int]]:
    """Merged centres (pool = what they may absorb) then the global token over ``members``.

    ``values`` [B, N, C] (default: ``vt.tokens``) are what is averaged; ``project`` maps the
    averages to the token space. ``global_without_centres=False`` drops the global token of an
    image that has no centre."""
    values = vt.tokens if values is None else values
    merged, m_valid = merge_into_centres(values, vt.keys, attn, centres, pool,
                                         n_neighbors=n_neighbors, extra_score=extra_score, mode=mode)
    cidx = front_order(centres)[:, :merged.shape[1]]                    # centres in patch order
    extras = [(merged if project is None else project(merged), m_valid, KIND_MERGED, cidx)]
    if use_global:
        g, g_valid = global_token(values, attn, members, mode=mode)
        if not global_without_centres:
            g_valid = g_valid & m_valid.any(dim=1, keepdim=True)
        extras.append((g if project is None else project(g), g_valid, KIND_GLOBAL))
    return extras


# --- methods ----------------------------------------------------------------------------

@register_method("full", params=FullParams)
def full(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
         generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """All N tokens, in order (the uncompressed reference)."""
    method_params_of(FullParams, "full", params)
    if budget is not None and resolve_budget(vt.n_tokens, budget) != vt.n_tokens:
        raise ValueError(f"full: keeps all {vt.n_tokens} tokens; got budget {budget!r}")
    return _all_tokens(vt)


@register_method("random", params=RandomParams)
def random(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
           generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """k tokens drawn uniformly without replacement per image, kept in patch order.
    Deterministic given ``generator`` state (or ``seed`` when no generator is given)."""
    p: RandomParams = method_params_of(RandomParams, "random", params)
    k = _fixed_k(vt, budget, "random")
    scores = random_scores((vt.batch_size, vt.n_tokens), generator, p.seed, vt.tokens.device)
    keep = topk_mask(scores, k)
    return pack(vt.tokens, _kept_kind((keep, KIND_SALIENT)))


@register_method("pool", params=PoolParams)
def pool(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
         generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """Uniform spatial average pooling to the largest h x w grid with h·w <= k."""
    p: PoolParams = method_params_of(PoolParams, "pool", params)
    k = _fixed_k(vt, budget, "pool")
    if k >= vt.n_tokens:
        return _all_tokens(vt)
    out_grid = pool_grid(vt.grid, k, p.max_aspect)
    pooled = avg_pool_tokens(vt.tokens, vt.grid, out_grid)
    B, M, _ = pooled.shape
    valid = torch.ones(B, M, dtype=torch.bool, device=pooled.device)
    none = torch.zeros(vt.tokens.shape[:2], dtype=torch.int8, device=pooled.device)
    centres = pool_cell_centres(vt.grid, out_grid).to(pooled.device).expand(B, M)
    out = pack(vt.tokens, none, [(pooled, valid, KIND_POOLED, centres)])
    out.cells = torch.full_like(none, KIND_POOLED)      # every patch is averaged into a cell
    return out


@register_method("prumerge", params=PruMergeParams, adaptive=True)
def prumerge(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
             generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """PruMerge: centres = IQR outliers of CLS attention (adaptive) or the top k-1 (fixed;
    the global token is the k-th); each centre absorbs its nearest tokens among all others.
    Output: cluster tokens in patch order of their centres, then the global token."""
    p: PruMergeParams = method_params_of(PruMergeParams, "prumerge", params)
    attn = pick_attention(vt, attention)
    if budget is None:
        centres = iqr_threshold(attn, whisker=p.whisker, min_keep=p.min_keep)
    else:
        k = resolve_budget(vt.n_tokens, budget)
        if k >= vt.n_tokens:
            return _all_tokens(vt)
        centres = topk_mask(attn, k - 1 if p.global_token else k)
    return _prumerge_output(vt, attn, centres, p)


@register_method("prumerge_plus", params=PruMergePlusParams, adaptive=True)
def prumerge_plus(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
                  generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """PruMerge+: PruMerge centres plus spatially uniform ones.

    Adaptive (official): IQR outliers, plus every s-th patch, s = max(1, (N // n_out) //
    stride_divisor), over positions 0..N-2 (the official code samples ``arange(0, 575)``).
    Fixed: round((k-1)·attn_share) centres by attention, the rest of the k-1 spread evenly
    over the other patches, plus the global token."""
    p: PruMergePlusParams = method_params_of(PruMergePlusParams, "prumerge_plus", params)
    attn = pick_attention(vt, attention)
    N = vt.n_tokens
    if budget is None:
        outl = iqr_threshold(attn, whisker=p.whisker, min_keep=max(1, p.min_keep))
        stride = (N // outl.sum(dim=1).clamp(min=1)) // p.stride_divisor
        centres = outl | stride_mask(N, stride, limit=N - 1)
    else:
        k = resolve_budget(N, budget)
        if k >= N:
            return _all_tokens(vt)
        n_c = k - 1 if p.global_token else k
        n_attn, n_spatial = split_budget(n_c, (p.attn_share,))
        by_attn = topk_mask(attn, n_attn)
        centres = by_attn | spread_mask(~by_attn, n_spatial)
    return _prumerge_output(vt, attn, centres, p)


def _prumerge_output(vt: VisualTokens, attn: Tensor, centres: Tensor, p: PruMergeParams) -> Compressed:
    everyone = torch.ones_like(centres)
    extras = _clusters_and_global(vt, attn, centres, everyone, ~centres, n_neighbors=p.n_neighbors,
                                  mode=p.merge_mode, use_global=p.global_token)
    return pack(vt.tokens, torch.zeros_like(centres, dtype=torch.int8), extras)


@register_method("visionzip", params=VisionZipParams)
def visionzip(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
              generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """VisionZip: k - c dominant tokens (top CLS attention, patch order) + c contextual
    tokens, c = round(k·contextual_share). Unlike the official code no CLS token is kept
    (LLaVA-1.5 feeds patch tokens only)."""
    p: VisionZipParams = method_params_of(VisionZipParams, "visionzip", params)
    attn = pick_attention(vt, attention)
    k = _fixed_k(vt, budget, "visionzip")
    if k >= vt.n_tokens:
        return _all_tokens(vt)
    n_ctx, n_dom = split_budget(k, (p.contextual_share,))
    dominant = topk_mask(attn, n_dom)
    ctx, valid = visionzip_contextual(vt.tokens, vt.keys, ~dominant, n_ctx)
    targets = front_order(visionzip_targets(~dominant, n_ctx)[0])[:, :ctx.shape[1]]
    return pack(vt.tokens, _kept_kind((dominant, KIND_SALIENT)), [(ctx, valid, KIND_MERGED, targets)])


@register_method("recoverable", params=RecoverableParams, adaptive=True, text_guided=True)
def recoverable(vt: VisualTokens, *, budget: int | float | None = None, attention: str = "head_mean",
                generator: torch.Generator | None = None, **params: Any) -> Compressed:
    """Recoverable Compression (text-guided recovery), three steps:

    1. salient: CLS-attention outliers (adaptive rule) or the top ``salient_share·k``;
    2. recovered: among the rest, the tokens most similar to the question text, by the same
       rule on ``text_sim`` (official: LOF with salient scores set to the minimum) or the
       top ``recovered_share·k``;
    3. merged: centres = attention-ranked leftovers (LOF fraction of the leftover attention,
       or the remaining budget minus one); each absorbs its ``merge_neighbors`` best leftover
       tokens by key cosine + ``text_weight``·text_sim; one global token summarises the
       leftovers that are not centres.

    Output: salient and recovered tokens in patch order (as the official code), then cluster
    tokens in patch order of their centres (official: by decreasing attention), then the
    global token. Where ours differs from the official code a switch selects the official
    behaviour (``merge_space``, ``global_without_centres``, ``min_salient``, ``text_pooling``,
    ``text_weight``; all set by the ``recoverable_official`` preset). Official bugs not
    reproduced: a batch of several images fails (one LOF fit over the whole batch, image 0's
    salient tokens masked in every image), the centre count uses the vision width instead of
    N, and merge keys are read at the leftover tokens' ranks instead of their patches.
    """
    return _recoverable(vt, budget, attention, method_params_of(RecoverableParams, "recoverable", params))


def official_text_weight(width: int) -> float:
    """50/√P: the official code scales the text cosine by P^-1/2 (P = width of the joint space)
    and then by 50 when it adds it to the key cosine."""
    return 50.0 / math.sqrt(width)


def _text_weight(vt: VisualTokens, p: RecoverableParams, method: str) -> float:
    if p.text_weight is not None:
        return p.text_weight
    if vt.text_dim is None:
        raise ValueError(f"{method}: text_weight=None derives 50/sqrt(P) from VisualTokens.text_dim, which is None")
    return official_text_weight(vt.text_dim)


def _salient_by_source(vt: VisualTokens, attn: Tensor, source: str, count: int | Tensor) -> Tensor:
    """``count`` salient tokens per image (int or ``[B]``) where ``salient_source`` puts them:
    'cls' the highest CLS attention, 'spread' evenly over the grid, 'diverse' max-min diversity
    of the projected tokens. -> ``[B, N]`` bool"""
    if source == "spread":
        return spread_mask(torch.ones_like(attn, dtype=torch.bool), count)
    if source == "diverse":
        return diverse_mask(vt.tokens, count)
    return topk_mask(attn, count)


def _recoverable(vt: VisualTokens, budget: int | float | None, attention: str, p: RecoverableParams) -> Compressed:
    attn = pick_attention(vt, attention)
    text = vt.text_sim
    if text is None and (p.recover or (p.merge and p.text_weight != 0.0)):
        raise ValueError("recoverable: VisualTokens.text_sim is required "
                         "(or set recover: false and text_weight: 0)")
    N = attn.shape[1]
    none = torch.zeros_like(attn, dtype=torch.bool)
    use_global = p.global_token
    if budget is None:
        salient = adaptive_mask(p.salient_rule, attn, None, whisker=p.whisker,
                                n_neighbors=p.salient_neighbors, lof_threshold_value=p.lof_threshold,
                                min_keep=p.min_salient)
        if p.salient_source != "cls":   # the rule says how many; the source says which
            salient = _salient_by_source(vt, attn, p.salient_source, salient.sum(dim=1))
        recovered = none
        if p.recover:
            recovered = adaptive_mask(p.recovery_rule, text, ~salient, whisker=p.whisker,
                                      n_neighbors=p.recovery_neighbors, lof_threshold_value=p.lof_threshold,
                                      ineligible="fill_min", count_base="eligible")
            if p.recovery_peaks:   # the rule says how many; the peaks say which
                recovered = topk_mask(peaks_first(text, vt.grid, p.peak_window, p.peak_floor), recovered.sum(dim=1), ~salient)
        leftover = ~(salient | recovered)
        centres = none
        if p.merge:
            base = "all" if p.centre_count_base == "all" else "eligible"
            centres = adaptive_mask(p.centre_rule, attn, leftover, whisker=p.whisker,
                                    n_neighbors=p.centre_neighbors, lof_threshold_value=p.lof_threshold,
                                    ineligible="exclude", count_base=base)
    else:
        k = resolve_budget(N, budget)
        if k >= N:
            return _all_tokens(vt)
        n_sal, n_rec, rest = split_budget(k, (p.salient_share, p.recovered_share if p.recover else 0.0))
        n_glob = 1 if (p.global_token and rest >= 1) else 0
        n_ctr = rest - n_glob if p.merge else 0
        if n_glob and n_ctr == 0 and not p.global_without_centres:
            n_glob = 0
        use_global = n_glob == 1
        back = rest - n_glob - n_ctr   # no centres (or no global token): the kept tokens take the share
        if p.recover:
            n_rec += back
        else:
            n_sal += back
        salient = _salient_by_source(vt, attn, p.salient_source, n_sal)
        rank_by = peaks_first(text, vt.grid, p.peak_window, p.peak_floor) if p.recovery_peaks else text
        recovered = topk_mask(rank_by, n_rec, ~salient) if p.recover else none
        leftover = ~(salient | recovered)
        centres = topk_mask(attn, n_ctr, leftover)
    weight = _text_weight(vt, p, "recoverable") if text is not None else 0.0
    extra = weight * text if weight != 0.0 else None
    values, project = _merge_values(vt, p.merge_space, "recoverable")
    extras = _clusters_and_global(vt, attn, centres, leftover, leftover & ~centres,
                                  n_neighbors=p.merge_neighbors, mode=p.merge_mode,
                                  use_global=use_global, extra_score=extra, values=values, project=project,
                                  global_without_centres=p.global_without_centres)
    return pack(vt.tokens, _kept_kind((salient, KIND_SALIENT), (recovered, KIND_RECOVERED)), extras)


# FastV prunes inside the LM: registered for its params; FastV(budget=..., layer=...) is its transform.
register_method("fastv", params=FastVParams, in_lm=True)(FastV)
