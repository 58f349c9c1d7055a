"""Token maps of a few test questions for figures: which cells each method keeps, and its answer."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from vlmcompress.data.records import ImageRecord, Question
from vlmcompress.eval.tasks import answer_tokens, load_image, vqa_accuracy
from vlmcompress.paths import project_relative
from vlmcompress.tokens.config import TokensParams
from vlmcompress.tokens.fastv import FastV
from vlmcompress.tokens.patch import make_transform
from vlmcompress.tokens.sweep import budget_key
from vlmcompress.tokens.types import KIND_SALIENT


def pick_examples(items: Sequence[tuple[ImageRecord, Question]], n: int) -> list[tuple[ImageRecord, Question]]:
    """Questions about images with the smallest objects, one question type after another."""
    def smallest(r: ImageRecord) -> float:
        return min((o.bbox[2] * o.bbox[3] for o in r.objects), default=math.inf)

    by_type: dict[str, list] = defaultdict(list)
    for it in sorted(items, key=lambda it: (smallest(it[0]), it[1].question_id)):
        by_type[it[1].question_type].append(it)
    out, used = [], set()
    while len(out) < n and any(by_type.values()):
        for t in sorted(by_type):
            while by_type[t] and by_type[t][0][0].image_id in used:
                by_type[t].pop(0)
            if by_type[t] and len(out) < n:
                it = by_type[t].pop(0)
                used.add(it[0].image_id)
                out.append(it)
    return out


def cell_kinds(tr: Any, n_patches: int) -> list[int]:
    """Role of every grid cell (row-major) after a one-sample call: KIND_* codes, 0 = dropped."""
    if tr is None:
        return [KIND_SALIENT] * n_patches
    if isinstance(tr, FastV):
        return [KIND_SALIENT if k else 0 for k in tr.last_keep[0].tolist()]
    return [int(k) for k in tr.last.cells[0].tolist()]


def token_examples(lvlm: Any, items: Sequence[tuple[ImageRecord, Question]], params: TokensParams,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Image, question, answer and per method (at the task budget) prediction + cell kinds."""
    E = params.eval
    n_patches = lvlm.grid[0] * lvlm.grid[1]
    out = []
    for rec, q in pick_examples(items, E.examples):
        img = load_image(rec.path).unsqueeze(0)
        entry: dict[str, Any] = {"image_id": rec.image_id, "image": project_relative(rec.path), "question": q.question,
                                 "question_type": q.question_type, "answer": q.answer,
                                 "grid": list(lvlm.grid), "budget": budget_key(E.task_budget),
                                 "objects": [{"category": o.category, "bbox": list(o.bbox)} for o in rec.objects],
                                 "methods": {}}
        for method in E.example_methods:
            tr = make_transform(lvlm, method, None if method == "full" else E.task_budget, params, seed=seed)
            pred = lvlm.generate(img, [q.question], transform=tr, max_new_tokens=answer_tokens(lvlm, q.answers))[0]
            entry["methods"][method] = {"prediction": pred, "correct": vqa_accuracy(pred, q.answers) > 0,
                                        "cells": cell_kinds(tr, n_patches)}
        out.append(entry)
    return out
