"""The LVLM's tasks on decoded images: every score of one (codec, point) of the codec evaluation.

VQA (overall and per question type), captioning (CIDEr), retrieval (R@1 / R@5 both ways),
grounding (accuracy at IoU >= 0.5, mean IoU) and the token-level distortion (MSE and cosine
similarity of the projected visual tokens of decoded vs original images).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmcompress.data.records import ImageRecord
from vlmcompress.eval.sweep import CodecSpec, decoded_path
from vlmcompress.eval.tasks import (ImageSource, file_images, load_image, run_captions, run_grounding,
                                    run_retrieval, run_vqa)


def vision_tokens(lvlm, images: Mapping[str, np.ndarray], batch_size: int) -> dict[str, torch.Tensor]:
    """The LVLM's vision features ``[1, N, Dv]`` per image (what token-fusing pre-editing reads)."""
    from vlmcompress.eval.quality import to_tensor

    keys = list(images)
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(0, len(keys), batch_size):
            chunk = keys[i:i + batch_size]
            same = len({images[k].shape for k in chunk}) == 1
            groups = [chunk] if same else [[k] for k in chunk]   # folders mix sizes
            for g in groups:
                hidden = lvlm.visual_features(to_tensor([images[k] for k in g])).hidden.float().cpu()
                out.update({k: hidden[j:j + 1].clone() for j, k in enumerate(g)})
    return out


@torch.inference_mode()
def token_distortion(lvlm, records: Sequence[ImageRecord], images: ImageSource, batch_size: int
                     ) -> dict[str, float]:
    """Mean MSE and cosine similarity of the projected visual tokens, decoded vs original."""
    mse, cos = [], []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        ref = lvlm.visual_features([file_images(r) for r in batch]).tokens.float()
        got = lvlm.visual_features([images(r) for r in batch]).tokens.float()
        mse.append((ref - got).pow(2).mean(dim=(1, 2)))                  # [B]
        cos.append(F.cosine_similarity(ref, got, dim=-1).mean(dim=1))    # [B]
    return {"token_mse": float(torch.cat(mse).mean()), "token_cos": float(torch.cat(cos).mean())}


def task_scores(lvlm, records: Sequence[ImageRecord], images: ImageSource,
                items: Sequence, batch_size: int, max_captions: int, max_refs: int) -> dict[str, float]:
    """Every task metric of one set of (decoded) images, percentages except the token terms."""
    vqa = run_vqa(lvlm, items, batch_size=batch_size, images=images)
    caps = records[:max_captions] if max_captions > 0 else records
    cider, _ = run_captions(lvlm, caps, batch_size=batch_size, images=images)
    g50, miou = run_grounding(lvlm, records, batch_size=batch_size, max_refs=max_refs, images=images)
    return {"vqa_acc": vqa.acc, **{f"vqa_acc_{t}": a for t, a in vqa.by_type.items()},
            "caption_cider": cider, **run_retrieval(lvlm, records, images=images),
            "grounding_acc50": g50, "grounding_miou": miou,
            **token_distortion(lvlm, records, images, batch_size)}


def decoded_source(cache: Path, spec: CodecSpec, point) -> ImageSource:
    """The decoded images of ``spec`` at ``point`` (under ``cache``), by record."""
    return lambda r: load_image(decoded_path(cache, spec, point, str(r.image_id)))
