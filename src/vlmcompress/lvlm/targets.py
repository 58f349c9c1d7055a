"""What a training turn is about, read from its text with the scene grammar of
:mod:`vlmcompress.data.scenes`: the phrase of each patch, the patches a turn names and the two
objects of a relation question."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlmcompress.data.scenes import (COLORS, SHAPES, SIZES, SceneObject, make_refs, object_phrases,
                                     question_objects, question_relation, question_type)
from vlmcompress.lvlm.labels import COLOR_IDS, SHAPE_IDS

PHRASES = ["background"] + [f"a {z} {c} {s}" for z in SIZES for c in COLORS for s in SHAPES]


def phrase_index(labels: Tensor) -> Tensor:
    """Per-patch index into :data:`PHRASES` from ``labels [..., 4, G, G]`` -> ``[..., G, G]``."""
    color, shape, size = labels[..., 0, :, :], labels[..., 1, :, :], labels[..., 2, :, :]
    idx = ((size - 1) * len(COLORS) + (color - 1)) * len(SHAPES) + (shape - 1) + 1
    return torch.where(color > 0, idx, torch.zeros_like(idx))


def relevant_patches(text: str, labels: Tensor) -> Tensor:
    """The patches a turn is about, from its words and the dense labels ``[4, G, G]`` -> ``[N]`` bool.

    Colour-shape pairs in the text ("the red circle") select those objects' patches; without
    a pair, or when no object matches one (a "no" existence question), any patch sharing a
    named colour or shape; a turn naming neither (a caption) is about every object patch.
    """
    named = question_objects(text)
    color, shape = labels[0].flatten(), labels[1].flatten()
    obj = color > 0
    out = torch.zeros_like(obj)
    for c, s in named:
        if c is not None and s is not None:
            out |= (color == COLOR_IDS[c]) & (shape == SHAPE_IDS[s])
    if out.any():
        return out
    cols = [COLOR_IDS[c] for c, _ in named if c is not None]
    shps = [SHAPE_IDS[s] for _, s in named if s is not None]
    if not cols and not shps:
        return obj
    for c in cols:
        out |= color == c
    for s in shps:
        out |= obj & (shape == s)
    return out


def named_patches(text: str, labels: Tensor, only: str | None = None) -> list[tuple[str, Tensor]]:
    """Each object phrase a question names, as (its head word, its patches ``[N]`` bool) from
    the dense labels ``[4, G, G]``, in the text's order: "the red circle" the red circles, "the
    circle" / "circles" every circle, "the red object" every red thing — all False when the
    scene has none (a "no" existence question's near miss is not it). Empty for a turn that is
    not a question, or whose type is not ``only`` (a :data:`QUESTION_TYPES` entry) when given.

    Example: ``"is there a red square?"`` -> ``[("square", <the red square's patches>)]``.
    """
    qtype = question_type(text)
    if qtype is None or (only is not None and qtype != only):
        return []
    return [(w, phrase_patches(labels, c, s)) for w, c, s in object_phrases(text)]


def phrase_patches(labels: Tensor, colour: str | None, shape: str | None) -> Tensor:
    """The patches of the objects of ``colour`` and ``shape`` (None: any) in the dense labels
    ``[4, G, G]`` -> ``[G * G]`` bool."""
    color, shp = labels[0].flatten(), labels[1].flatten()
    on = color > 0
    if colour is not None:
        on = on & (color == COLOR_IDS[colour])
    if shape is not None:
        on = on & (shp == SHAPE_IDS[shape])
    return on


def relation_targets(text: str, objs: Sequence[SceneObject], image_size: int
                     ) -> tuple[tuple[str, str], Tensor] | None:
    """The two objects of a relation question: their shape words and where they are, ``[2, 2]``
    = (x, y) of each centre mapped to [-1, 1], in the question's order. None for any other
    turn, or when a named object is not in ``objs`` (names are unique within a scene)."""
    parsed = question_relation(text)
    if parsed is None:
        return None
    by_name = {o.name: o for o in objs}
    first, second = by_name.get(" ".join(parsed[0])), by_name.get(" ".join(parsed[2]))
    if first is None or second is None:
        return None
    xy = torch.tensor([[first.cx, first.cy], [second.cx, second.cy]], dtype=torch.float32)
    return (first.shape, second.shape), 2 * xy / image_size - 1


def word_positions(prompt_ids: Sequence[int], first: int, second: int) -> tuple[int, int] | None:
    """Where a relation question's two shape words are among its prompt's token ids: the first
    occurrence of ``first`` and the last of ``second`` (the two may be the same word). None
    if either is missing."""
    ids = list(prompt_ids)
    if first not in ids or second not in ids:
        return None
    return ids.index(first), len(ids) - 1 - ids[::-1].index(second)


def ground_target(ref: str, objs: Sequence[SceneObject], image_size: int) -> tuple[str, Tensor, Tensor] | None:
    """The object a grounding turn refers to: its shape word, its centre ``[2]`` and its box
    ``[4]`` = (x1, y1, x2, y2) as :func:`~vlmcompress.lvlm.curriculum.box_text` writes it
    (clamped to the image), all mapped to [-1, 1]. None when ``ref`` is not the referring
    expression of one of ``objs`` (any question, a caption)."""
    refs = make_refs(objs)
    if ref not in refs:
        return None
    o = objs[refs.index(ref)]
    x, y, w, h = o.bbox
    box = torch.tensor([x, y, x + w, y + h], dtype=torch.float32).clamp(0, image_size)
    centre = torch.tensor([o.cx, o.cy], dtype=torch.float32)
    return o.shape, 2 * centre / image_size - 1, 2 * box / image_size - 1


def number_slots(labels: Sequence[int], numbers: set[int], count: int = 4) -> list[int]:
    """Indices into an answer's token ids ``labels`` of its first ``count`` number tokens (the
    box coordinates of a grounding answer); fewer when the answer has fewer."""
    return [i for i, t in enumerate(labels) if t in numbers][:count]


def modifier_before(word: int, p0: int, p_ids: Sequence[int], modifier_ids: set[int]) -> int | None:
    """The sequence index of the modifier word right before the head word at sequence index
    ``word`` (a prompt starting at ``p0`` with ids ``p_ids``): ``word - 1`` when that token is
    one of ``modifier_ids`` (e.g. the colour words) and still in the prompt, else None.

    Example: in "is there a red cube?", the index of "cube" -> the index of "red".
    """
    i = word - p0 - 1
    return word - 1 if 0 <= i < len(p_ids) and p_ids[i] in modifier_ids else None
