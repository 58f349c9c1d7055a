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
from vlmcompress.lvlm.targets import modifier_before, phrase_patches


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


SHARES = ("named", "same_shape", "same_colour", "other_objects", "background", "text")


def attention_shares(vis: Tensor, labels: Tensor, colour: str | None, shape: str | None) -> dict[str, float]:
    """Where one attention row goes, for an object phrase of ``colour`` / ``shape`` (None: any):
    ``vis [N]`` its mass on the N visual tokens (the rest went to text), ``labels [4, G, G]``
    (N = G * G) -> the mass on the ``named`` objects' patches, on other objects of the same
    shape, then of the same colour, on the remaining objects, on the background and on ``text``.
    A head that reads the shape word alone puts a "red cube"'s mass on every cube."""
    obj, named = phrase_patches(labels, None, None), phrase_patches(labels, colour, shape)
    none = torch.zeros_like(obj)
    same_shape = obj & ~named & (phrase_patches(labels, None, shape) if shape is not None else none)
    same_colour = obj & ~named & ~same_shape & (phrase_patches(labels, colour, None) if colour is not None else none)
    other = obj & ~named & ~same_shape & ~same_colour
    parts = {"named": named, "same_shape": same_shape, "same_colour": same_colour, "other_objects": other,
             "background": ~obj}
    out = {k: float(vis[m].sum()) for k, m in parts.items()}
    out["text"] = max(0.0, 1.0 - float(vis.sum()))
    return out


@torch.inference_mode()
def hop_attention(lvlm, records: Sequence[ImageRecord], layer: int, heads: int, images
                  ) -> tuple[dict[str, dict[str, float]], dict[int, list[float]]] | None:
    """Where the LM's attention goes from the head word of each question's first object phrase
    ("cube" in "is there a red cube?"), with every visual token in the sequence.

    Returns (1) in layer ``layer``, mean of its first ``heads`` heads (0: all): per question
    type, split by whether the scene holds the named object (``exists+`` / ``exists-``), and
    ``all``, the mean :func:`attention_shares` as percentages and the number ``n`` of
    questions; (2) for each earlier layer, each head's mean mass (%) on the colour word right
    before the head word, where there is one: the composition the hop reads. ``images(rec) ->
    [3, H, W]``. ``None`` when the records are not scenes (no colour/shape attributes)."""
    from vlmcompress.data.scenes import COLORS, object_phrases

    lm = lvlm.language_model
    impl = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"      # the fused kernels return no attention weights
    stats: dict[str, list[dict[str, float]]] = defaultdict(list)
    colour_ids = set(lvlm.tokenizer.convert_tokens_to_ids(list(COLORS)))
    on_colour: list[Tensor] = []        # [layer, H] per question with a colour word before its head word
    try:
        for rec in records:
            if not rec.questions:
                continue
            feats = lvlm.visual_features(images(rec)[None])
            n = feats.tokens.shape[1]
            labels = box_labels(rec, int(round(n ** 0.5)))
            if labels is None:
                return None
            for q in rec.questions:
                phrases = object_phrases(q.question)
                if not phrases:
                    continue
                word, colour, shape = phrases[0]
                pre, post = lvlm._prompt_ids("vqa", [q.question])[0]
                word_id = lvlm.tokenizer.convert_tokens_to_ids(word)
                at = [i for i, t in enumerate(post) if t == word_id]
                if not at:
                    continue
                emb, mask, _ = lvlm.build_inputs(feats.tokens, torch.ones(1, n, dtype=torch.bool), "vqa", [q.question])
                out = lm(inputs_embeds=emb, attention_mask=mask, output_attentions=True, return_dict=True)
                p0 = len(pre) + n                       # the prompt after the image
                pos = p0 + at[0]
                row = out.attentions[layer][0, : heads or None].mean(0)[pos]
                colour_at = modifier_before(pos, p0, post, colour_ids)
                if colour_at is not None:
                    on_colour.append(torch.stack([a[0, :, pos, colour_at] for a in out.attentions[:layer]]))
                shares = attention_shares(row[len(pre):p0], labels, colour, shape)
                there = "+" if bool(phrase_patches(labels, colour, shape).any()) else "-"
                for key in ("all", f"{q.question_type}{there}"):
                    stats[key].append(shares)
    finally:
        lm.config._attn_implementation = impl
    shares = {k: {**{s: round(100 * sum(r[s] for r in v) / len(v), 2) for s in SHARES}, "n": len(v)}
              for k, v in sorted(stats.items())}
    mean = torch.stack(on_colour).mean(0) if on_colour else torch.zeros(layer, 0)
    return shares, {i: [round(100 * float(v), 2) for v in mean[i]] for i in range(layer)}

