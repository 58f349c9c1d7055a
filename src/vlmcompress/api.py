"""The public API: what a user, the CLI, scripts and benchmarks call.

Importing this module loads neither torch nor transformers; each name imports its library
module on first use.

Params and LVLM
    ``load_params(path=None) -> Params``            a params file, checked (default: the project's ``params.yaml``)
    ``model_paths(params=None) -> (llava, clip)``   where the pipeline's LVLM is: trained folders or hub ids
    ``lvlm_from_params(params=None) -> LVLM``       the pipeline's LVLM (``params``: a path, a ``Params`` or None)
    ``attach(model, method, budget, ...)``          a token method on a stock Hugging Face model
                                                    (:func:`vlmcompress.tokens.hf.attach`)

Codec
    ``load_codec(model_dir) -> LVLMCodec``          a saved codec, ready to code
    ``encode_file(model_dir, png, out, rate, token_fn=...)`` / ``decode_file(file, png, model_dir=None)``
    ``lvlm_token_fn(lvlm) -> TowerTarget``          the LVLM token target a codec trains and encodes with:
                                                    ``x [B,3,H,W] in [0,1] -> [B,N,Dv]`` vision features
    ``lvlm_attention_fn(lvlm, token_fn=None)``      ``x -> [B,N]`` CLS attention (the low-pass term's weights)

Data set
    ``dataset_root() -> Path``                      where the data stage writes the data set
    ``load_all(root=None) -> {split: [ImageRecord]}``  every split of the data set as records
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmcompress.config import Params, load_params

if TYPE_CHECKING:
    from vlmcompress.lvlm.adapter import LVLM

# Library functions re-exported as they are, imported by ``__getattr__`` when first asked for.
_LAZY = frozenset({"attach", "dataset_root", "decode_file", "encode_file", "load_all", "load_codec",
                   "lvlm_attention_fn", "lvlm_token_fn"})
__all__ = sorted(_LAZY | {"load_params", "lvlm_from_params", "model_paths"})

ParamsLike = str | Path | Params | None


def _params(params: ParamsLike) -> Params:
    """``params`` itself, or the params file it names (None: the project's ``params.yaml``)."""
    return params if isinstance(params, Params) else load_params(params)


def model_paths(params: ParamsLike = None) -> tuple[str, str]:
    """(llava, clip) locations of the pipeline's LVLM: the LVLM stage's trained folders
    (``lvlm.source: train``) or the params' hub ids / folders."""
    from vlmcompress.lvlm.load import model_paths as paths
    return paths(_params(params))


def lvlm_from_params(params: ParamsLike = None) -> LVLM:
    """The pipeline's LVLM, loaded with the prompts, attention layer, dtype, device and image
    aspect of ``params.lvlm`` (``params``: a ``Params``, a params file, or None for the project's)."""
    from vlmcompress.lvlm.load import lvlm_from_params as load
    return load(_params(params))


def __getattr__(name: str) -> Any:
    """The names of ``_LAZY``, from their library modules."""
    if name == "attach":
        from vlmcompress.tokens.hf import attach
        return attach
    if name in ("encode_file", "decode_file"):
        from vlmcompress.codec import coder
        return getattr(coder, name)
    if name == "load_codec":
        from vlmcompress.codec.train import load_codec
        return load_codec
    if name in ("lvlm_token_fn", "lvlm_attention_fn"):
        from vlmcompress.codec import target
        return getattr(target, name)
    if name in ("dataset_root", "load_all"):
        from vlmcompress.data import dataset
        return getattr(dataset, name)
    raise AttributeError(f"module 'vlmcompress.api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
