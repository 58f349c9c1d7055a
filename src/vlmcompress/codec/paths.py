"""Where the codec stage keeps its learned codecs, for the library code that reads or writes them."""
from __future__ import annotations

from pathlib import Path

from vlmcompress.paths import outputs_dir


def models_dir() -> Path:
    """``outputs/codec/models``: one folder per learned codec (``models/<name>/model`` etc.)."""
    return outputs_dir("codec", "models")
