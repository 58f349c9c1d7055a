"""Training-free visual-token compression: pure, batched tensor functions.

``types`` (VisualTokens in, Compressed out), ``thresholds`` (IQR, LOF, top-k rules),
``select`` (budget splits, spatial/random choice, FastV's keep rule), ``merge``
(clusters, global token, VisionZip contextual tokens, pooling), ``methods`` (the methods and
the decorators that register them: :func:`register_method`, :func:`register_preset`),
``fastv`` (pruning inside the LM), ``patch`` (a method as a transform for ``LVLM.generate``),
``flops`` (prefill cost), ``config`` (the params schema and the method registry), ``stage`` (the evaluation stage),
``attach`` (a method on a stock transformers model, through its own ``generate``).
"""
from vlmcompress.tokens.attach import AttachHandle, attach
from vlmcompress.tokens.config import (
    IN_LM_METHODS, METHOD_PARAMS, TEXT_GUIDED, MethodSpec, TokensParams, method_spec, method_specs,
)
from vlmcompress.tokens.fastv import FastV
from vlmcompress.tokens.methods import (
    ADAPTIVE, METHODS, compress, get_method, method_names, pick_attention, register_method, register_preset,
    temporary_methods, unregister_method,
)
from vlmcompress.tokens.patch import TokenCompressor, make_transform
from vlmcompress.tokens.select import fastv_keep, fastv_scores
from vlmcompress.tokens.thresholds import iqr_threshold, lof_scores, lof_threshold, topk_mask
from vlmcompress.tokens.types import (
    KIND_GLOBAL, KIND_MERGED, KIND_NAMES, KIND_PAD, KIND_POOLED, KIND_RECOVERED, KIND_SALIENT,
    Compressed, VisualTokens, resolve_budget,
)

__all__ = [
    "attach", "AttachHandle",
    "ADAPTIVE", "METHODS", "METHOD_PARAMS", "IN_LM_METHODS", "TEXT_GUIDED", "TokensParams", "FastV", "TokenCompressor",
    "make_transform", "compress", "get_method", "method_names", "method_spec", "method_specs", "MethodSpec",
    "pick_attention", "register_method", "register_preset", "unregister_method", "temporary_methods", "fastv_keep", "fastv_scores", "iqr_threshold", "lof_scores",
    "lof_threshold", "topk_mask", "Compressed", "VisualTokens", "resolve_budget", "KIND_PAD",
    "KIND_SALIENT", "KIND_RECOVERED", "KIND_MERGED", "KIND_GLOBAL", "KIND_POOLED", "KIND_NAMES",
]
