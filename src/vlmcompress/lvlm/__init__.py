"""LVLM layer: the embedded model's builder and trainer, the hub loader, and the adapter."""
from vlmcompress.lvlm import vision  # noqa: F401  (registers custom Auto classes)
from vlmcompress.lvlm.adapter import LVLM, Prompts, VisualFeatures
from vlmcompress.lvlm.load import ModelNotAvailableError, load_lvlm

__all__ = ["LVLM", "Prompts", "VisualFeatures", "ModelNotAvailableError", "load_lvlm"]
