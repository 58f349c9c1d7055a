"""Adapters that let other tools run vlmcompress; each imports its tool only when used.

``lmms_eval``: the lmms-eval model ``vlmcompress`` (install the ``lmms`` extra). lmms-eval
finds it through the entry-point group ``lmms_eval.models``, which names
:func:`lmms_eval_models` here: it returns the model's manifest without importing torch or
the model code, so listing lmms-eval's models stays cheap.
"""
from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL = "vlmcompress"
_MODULE = "vlmcompress.integrations.lmms_eval"


def lmms_eval_models() -> Any:
    """The ``ModelManifest`` of the lmms-eval model ``vlmcompress``: the chat implementation
    (tasks' messages, lmms-eval's default) and the simple one (``--force_simple``: tasks'
    text and visuals, and log-likelihood requests)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL, chat_class_path=f"{_MODULE}.VlmcompressChat",
                         simple_class_path=f"{_MODULE}.VlmcompressSimple")
