"""LVLM-oriented learned image codec (arXiv 2407.17060): pre-editing net, variable-rate
CompressAI model, token losses, trainer and a real file format.

Names are imported lazily so that ``vlmcompress.codec.config`` (read by the params
loader) does not pull in torch and CompressAI.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CodecParams": "config", "CodecModelParams": "config", "LossParams": "config",
    "CodecTrainParams": "config", "PreEditParams": "config", "check_codec_params": "config",
    "PreEditNet": "preedit",
    "MODELS": "model", "register_model": "model", "LVLMCodec": "model", "build_codec": "model",
    "weights_hash": "model",
    "CodecLoss": "losses", "RANK_LOSSES": "losses", "register_rank_loss": "losses",
    "BitstreamError": "bitstream",
    "encode_image": "coder", "decode_image": "coder", "encode_file": "coder", "decode_file": "coder",
    "train_codec": "train", "load_codec": "train", "save_codec": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlmcompress.codec' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlmcompress.codec.{_EXPORTS[name]}"), name)
