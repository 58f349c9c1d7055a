"""The training pool (fresh scenes with dense labels) and the vocabulary of the scenes' language."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vlmcompress.data.config import ScenesParams
from vlmcompress.data.scenes import (QUESTION_TYPES, SceneObject, make_captions, make_refs, make_scene,
                                     question_candidates, sample_scene, scene_rng)
from vlmcompress.lvlm.adapter import Prompts
from vlmcompress.lvlm.labels import patch_targets
from vlmcompress.lvlm.targets import PHRASES
from vlmcompress.lvlm.tokenizer import build_vocab

POOL_STREAM = 100          # seed stream of the training pool (val/test use 1..3)
VOCAB_STREAM = 99          # scenes whose language seeds the vocabulary


@dataclass


class Pool:
    images: Tensor                      # [M, H, W, 3] uint8
    labels: Tensor                      # [M, 4, G, G] int64 (colour, shape, size, centre)
    centres: Tensor                     # [M, 2, G, G] float32: each patch's object centre (labels.patch_centres)
    boxes: Tensor                       # [M, 4, G, G] float32: each patch's object box (labels.patch_boxes)
    objects: list[list[SceneObject]]
    captions: list[list[str]]


def _pool_item(p: ScenesParams, index: int, patch: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list, list]:
    s = make_scene(p, POOL_STREAM, index, n_questions=0)
    return s.image, *patch_targets(s.objects, p.image_size, patch), s.objects, s.captions


def build_pool(p: ScenesParams, n: int, patch: int, workers: int = 2) -> Pool:
    """``n`` training scenes with their dense labels (process pool; deterministic)."""
    with ProcessPoolExecutor(max_workers=workers) as ex:
        items = list(ex.map(_pool_item, [p] * n, range(n), [patch] * n, chunksize=max(1, n // 32)))
    return Pool(images=torch.from_numpy(np.stack([i[0] for i in items])),
                labels=torch.from_numpy(np.stack([i[1] for i in items])),
                centres=torch.from_numpy(np.stack([i[2] for i in items])),
                boxes=torch.from_numpy(np.stack([i[3] for i in items])),
                objects=[i[4] for i in items], captions=[i[5] for i in items])


def scene_vocab(p: ScenesParams, prompts: Prompts, n_scenes: int = 400) -> list[str]:
    """Every word the scenes' language and the prompts can produce, plus box coordinates."""
    corpus: list[str] = [prompts.system, prompts.template, prompts.vqa, prompts.caption, prompts.ground, *PHRASES]
    for i in range(n_scenes):
        rng = scene_rng(p.seed, VOCAB_STREAM, i)
        objs = sample_scene(rng, p)
        corpus += make_captions(objs, rng, 5) + make_refs(objs)
        for t in QUESTION_TYPES:
            corpus += [f"{q} {a}" for q, a in question_candidates(objs, rng, t)]
    extra = [f"{i / 100:.2f}" for i in range(101)] + [str(i) for i in range(10)] + ["yes", "no", "[", "]", ","]
    return build_vocab(corpus, extra)


def to_pixels(images_u8: Tensor) -> Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, H, W]`` float in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 255.0
