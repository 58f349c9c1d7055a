"""Resolve and load an LVLM (LLaVA + CLIP) from a local folder or a Hugging Face hub id, or
the pipeline's LVLM from params (:func:`lvlm_from_params`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

from vlmcompress.config import Params
from vlmcompress.lvlm.adapter import LVLM, Prompts
from vlmcompress.paths import outputs_dir


class ModelNotAvailableError(RuntimeError):
    """Weights that are neither a local folder nor in the local Hugging Face cache."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(loader, name_or_path: str, what: str, **kwargs):
    local = Path(name_or_path).expanduser()
    try:
        if local.exists():
            return loader(str(local), **kwargs)
        return loader(name_or_path, **kwargs)
    except OSError as exc:  # transformers raises OSError for missing files / unreachable hub
        hint = (f"download it with `hf download {name_or_path}` on a machine with internet, "
                f"or set the params key to a local folder")
        if local.exists():
            raise ModelNotAvailableError(f"cannot load {what} from folder {local}: {str(exc).splitlines()[0]}") from None
        raise ModelNotAvailableError(f"cannot load {what} {name_or_path!r}: not in the local Hugging Face cache "
                                     f"and the hub is unreachable; {hint}") from None


def load_lvlm(llava: str, clip: str, *, prompts: Prompts = Prompts(), attn_layer: int = -1,
              dtype: str = "float32", device: str = "cpu", image_aspect: str = "resize") -> LVLM:
    """Load an :class:`LVLM`. ``llava``/``clip``: local folders or hub ids.

    The LLaVA vision tower *is* the CLIP image encoder (LLaVA-1.5 keeps CLIP ViT-L/14-336
    frozen; the embedded model is saved that way), so CLIP's own vision tower is dropped after
    loading and the LLaVA tower serves image and patch embeddings.
    """
    torch_dtype = _DTYPES[dtype]
    model = _load(LlavaForConditionalGeneration.from_pretrained, llava, "LLaVA model", dtype=torch_dtype)
    tok = _load(AutoTokenizer.from_pretrained, llava, "LLaVA tokenizer")
    clip_model = _load(AutoModel.from_pretrained, clip, "CLIP model", dtype=torch_dtype)
    if not isinstance(clip_model, CLIPModel):
        raise ModelNotAvailableError(f"{clip!r} is a {type(clip_model).__name__}, not a CLIP model")
    clip_tok = _load(AutoTokenizer.from_pretrained, clip, "CLIP tokenizer")
    clip_model.vision_model = None  # the LLaVA tower replaces it (saves a copy of the encoder)
    lvlm = LVLM(model, tok, clip_model, clip_tok, prompts=prompts, attn_layer=attn_layer, image_aspect=image_aspect)
    return lvlm.to(device).eval()


def lvlm_model_dir() -> Path:
    """Where the LVLM stage writes its model (``outputs/lvlm/model``): the ``llava/`` and ``clip/``
    folders it trains, or a ``source.json`` naming the hub checkpoints."""
    return outputs_dir("lvlm", "model")


def model_paths(params: Params) -> tuple[str, str]:
    """(llava, clip) locations of the pipeline's LVLM: the folders the LVLM stage trains into
    (``lvlm.source: train``) or the params' hub ids / folders."""
    if params.lvlm.source == "train":
        root = lvlm_model_dir()
        return str(root / "llava"), str(root / "clip")
    return params.lvlm.llava, params.lvlm.clip


def lvlm_from_params(params: Params, device: str | None = None) -> LVLM:
    """The pipeline's LVLM (:func:`model_paths`) with the prompts, attention layer, dtype, device
    and image aspect of ``params.lvlm``: the model every stage after the LVLM stage scores with.
    ``device`` overrides ``lvlm.device`` (each of several processes takes its own GPU)."""
    llava, clip = model_paths(params)
    L = params.lvlm
    return load_lvlm(llava, clip, prompts=Prompts(**dataclasses.asdict(L.prompts)), attn_layer=L.attn_layer,
                     dtype=L.dtype, device=device or L.device, image_aspect=L.image_aspect)
