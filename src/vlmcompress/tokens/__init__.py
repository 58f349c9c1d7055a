"""Training-free visual-token compression: pure, batched tensor functions.

``types`` (VisualTokens in, Compressed out), ``thresholds`` (IQR, LOF, top-k rules),
``select`` (budget splits, spatial/random choice, FastV's keep rule), ``merge``
(clusters, global token, VisionZip contextual tokens, pooling), ``methods`` (the built-in
methods and the decorators that register more: :func:`register_method`,
:func:`register_preset`), ``peers`` (DivPrune, CDPruner), ``fastv`` (pruning inside the LM),
``patch`` (a method as a transform for ``LVLM.generate``), ``flops`` (prefill cost),
``config`` (the params schema and the method registry), ``hf`` (:func:`attach`: a method on a
stock transformers model, through its own ``generate``; its architecture families in ``hf_archs``,
vision attention scores in ``hf_scores``, the question's place in the prompt in ``hf_prompt``),
``sweep`` (runs, batches and the sweep over them), ``compare`` (accuracy tables, paired
differences, equal cost), ``examples`` (token maps for figures), ``stage`` (the evaluation stage).

Names are imported lazily so that ``vlmcompress.tokens.config`` (read by the params loader)
does not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attach": "hf", "AttachHandle": "hf",
    "IN_LM_METHODS": "config", "METHOD_PARAMS": "config", "TEXT_GUIDED": "config", "MethodSpec": "config",
    "TokensParams": "config", "method_spec": "config", "method_specs": "config",
    "FastV": "fastv",
    "ADAPTIVE": "methods", "METHODS": "methods", "compress": "methods", "get_method": "methods",
    "method_names": "methods", "pick_attention": "methods", "register_method": "methods",
    "register_preset": "methods", "temporary_methods": "methods", "unregister_method": "methods",
    "TokenCompressor": "patch", "make_transform": "patch",
    "fastv_keep": "select", "fastv_scores": "select",
    "iqr_threshold": "thresholds", "lof_scores": "thresholds", "lof_threshold": "thresholds", "topk_mask": "thresholds",
    "KIND_GLOBAL": "types", "KIND_MERGED": "types", "KIND_NAMES": "types", "KIND_PAD": "types",
    "KIND_POOLED": "types", "KIND_RECOVERED": "types", "KIND_SALIENT": "types", "Compressed": "types",
    "VisualTokens": "types", "resolve_budget": "types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlmcompress.tokens' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlmcompress.tokens.{_EXPORTS[name]}"), name)
