"""How well the CLIP text tower points a question at the patches it asks about.

Text-guided token recovery keeps the patches whose joint-space embedding is most similar to
the question's text embedding; this probe measures that ranking directly on scenes records,
before any LM is involved: for every question that names something, the share of the top-k
patches that are relevant (precision@k, beside the base rate of relevant patches) and how
often the single most similar patch is relevant (hit@1). A patch is relevant as in the LM
phase (:func:`vlmcompress.lvlm.targets.relevant_patches`), with each object's patches taken
from its box (records keep boxes, not polygons).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from vlmcompress.data.records import ImageRecord
from vlmcompress.lvlm.labels import COLOR_IDS, SHAPE_IDS


def box_labels(rec: ImageRecord, grid: int) -> Tensor | None:
    """Colour and shape ids per patch from the record's object boxes -> ``[4, G, G]`` long
    (rows 2 and 3 zero; later objects overwrite earlier ones), or ``None`` when the objects
    carry no scenes colour/shape attributes (e.g. COCO)."""
    out = torch.zeros(4, grid, grid, dtype=torch.long)
    sx, sy = grid / rec.width, grid / rec.height
    for o in rec.objects:
        color, shape = o.attributes.get("color"), o.attributes.get("shape")
        if color not in COLOR_IDS or shape not in SHAPE_IDS:
            return None
        x, y, w, h = o.bbox
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = min(grid - 1, int((x + w) * sx)), min(grid - 1, int((y + h) * sy))
        out[0, y0:y1 + 1, x0:x1 + 1] = COLOR_IDS[color]
        out[1, y0:y1 + 1, x0:x1 + 1] = SHAPE_IDS[shape]
    return out


@torch.inference_mode()
def text_localisation(lvlm, records: Sequence[ImageRecord], k: int, images) -> dict[str, dict[str, float]] | None:
    """Per question type (and ``all``): ``precision`` of the top-``k`` patches, the ``base``
    rate of relevant patches, ``hit1`` and the number ``n`` of questions, as percentages.

    ``images(rec) -> [3, H, W]`` loads a record's image. ``None`` when the records are not
    scenes (no colour/shape attributes to decide relevance).
    """
    from vlmcompress.lvlm.targets import relevant_patches

    stats: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for rec in records:
        qs = [q for q in rec.questions]
        if not qs:
            continue
        feats = lvlm.visual_features(images(rec)[None])
        grid = int(round(feats.tokens.shape[1] ** 0.5))
        labels = box_labels(rec, grid)
        if labels is None:
            return None
        patches = lvlm.patch_embeddings(feats)[0]                          # [N, P]
        sims = lvlm.text_embeddings([q.question for q in qs]) @ patches.T  # [Q, N]
        for q, sim in zip(qs, sims):
            rel = relevant_patches(q.question, labels)
            if not rel.any():
                continue
            top = sim.topk(min(k, sim.numel())).indices
            stats[q.question_type].append((rel[top].float().mean().item(), rel.float().mean().item(),
                                           float(rel[sim.argmax()])))
    stats["all"] = [s for v in list(stats.values()) for s in v]
    return {t: {"precision": round(100 * sum(s[0] for s in v) / len(v), 2),
                "base": round(100 * sum(s[1] for s in v) / len(v), 2),
                "hit1": round(100 * sum(s[2] for s in v) / len(v), 2), "n": len(v)}
            for t, v in sorted(stats.items()) if v}
