"""LVLM layer: the embedded model's builder and trainer, the hub loader, and the adapter.

Names are imported lazily so that ``vlmcompress.lvlm.config`` (read by the params loader)
does not pull in torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"LVLM": "adapter", "Prompts": "adapter", "VisualFeatures": "adapter",
            "ModelNotAvailableError": "load", "load_lvlm": "load"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlmcompress.lvlm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlmcompress.lvlm.{_EXPORTS[name]}"), name)
