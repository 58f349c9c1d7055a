"""Dense supervision for the embedded vision tower, derived exactly from a scene's objects."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlmcompress.data.scenes import COLORS, SHAPES, SIZES, SceneObject

COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}   # 0 = background
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
SIZE_IDS = {s: i + 1 for i, s in enumerate(SIZES)}
_MIN_COVER = 0.2  # a patch belongs to an object if the object covers >= 20% of it


def patch_labels(objs: Sequence[SceneObject], image_size: int, patch: int) -> np.ndarray:
    """Per-patch labels ``[4, G, G]`` int64: colour, shape, size ids (0 = background) and a
    centre flag (1 on the patch holding the object's centre), for ``G = image_size // patch``.

    A patch takes the object covering most of it (ties: the later-drawn object).
    """
    g = image_size // patch
    out = np.zeros((4, g, g), dtype=np.int64)
    best = np.full((g, g), _MIN_COVER, dtype=np.float32)
    for o in objs:
        mask = Image.new("L", (image_size, image_size), 0)
        ImageDraw.Draw(mask).polygon(list(o.polygon), fill=255)
        cover = np.asarray(mask, dtype=np.float32).reshape(g, patch, g, patch).mean(axis=(1, 3)) / 255.0
        take = cover >= best
        best = np.where(take, cover, best)
        out[0][take], out[1][take], out[2][take] = COLOR_IDS[o.color], SHAPE_IDS[o.shape], SIZE_IDS[o.size]
        cy, cx = min(int(o.cy // patch), g - 1), min(int(o.cx // patch), g - 1)
        out[3, cy, cx] = 1
    return out
