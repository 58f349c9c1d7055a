"""Dense supervision for the embedded vision tower, derived exactly from a scene's objects."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vlmcompress.data.scenes import COLORS, SHAPES, SIZES, SceneObject

COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}   # 0 = background
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
SIZE_IDS = {s: i + 1 for i, s in enumerate(SIZES)}
_MIN_COVER = 0.2  # a patch belongs to an object if the object covers >= 20% of it


def patch_targets(objs: Sequence[SceneObject], image_size: int, patch: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`patch_labels`, :func:`patch_centres` and :func:`patch_boxes` of one scene, from
    one rasterisation."""
    g = image_size // patch
    out = np.zeros((4, g, g), dtype=np.int64)
    cells = (np.arange(g, dtype=np.float32) + 0.5) * 2 / g - 1
    centres = np.stack(np.broadcast_arrays(cells[None, :], cells[:, None])).astype(np.float32)   # own place
    half = 1.0 / g                                                                               # own cell
    boxes = np.concatenate([centres - half, centres + half]).astype(np.float32)
    best = np.full((g, g), _MIN_COVER, dtype=np.float32)
    for o in objs:
        mask = Image.new("L", (image_size, image_size), 0)
        ImageDraw.Draw(mask).polygon(list(o.polygon), fill=255)
        cover = np.asarray(mask, dtype=np.float32).reshape(g, patch, g, patch).mean(axis=(1, 3)) / 255.0
        take = cover >= best
        best = np.where(take, cover, best)
        out[0][take], out[1][take], out[2][take] = COLOR_IDS[o.color], SHAPE_IDS[o.shape], SIZE_IDS[o.size]
        centres[0][take], centres[1][take] = 2 * o.cx / image_size - 1, 2 * o.cy / image_size - 1
        x, y, w, h = o.bbox
        for k, v in enumerate((x, y, x + w, y + h)):
            boxes[k][take] = 2 * min(max(v, 0.0), image_size) / image_size - 1
        cy, cx = min(int(o.cy // patch), g - 1), min(int(o.cx // patch), g - 1)
        out[3, cy, cx] = 1
    return out, centres, boxes


def patch_labels(objs: Sequence[SceneObject], image_size: int, patch: int) -> np.ndarray:
    """Per-patch labels ``[4, G, G]`` int64: colour, shape, size ids (0 = background) and a
    centre flag (1 on the patch holding the object's centre), for ``G = image_size // patch``.

    A patch takes the object covering most of it (ties: the later-drawn object).
    """
    return patch_targets(objs, image_size, patch)[0]


def patch_centres(objs: Sequence[SceneObject], image_size: int, patch: int) -> np.ndarray:
    """Per patch, ``[2, G, G]`` float32 (x, y) in [-1, 1]: the centre of the object the patch
    belongs to (as in :func:`patch_labels`), or the patch's own centre on the background.

    The place an object's tokens can all share, to sub-patch precision: a box or a comparison
    then needs no average over the object's patches."""
    return patch_targets(objs, image_size, patch)[1]


def patch_boxes(objs: Sequence[SceneObject], image_size: int, patch: int) -> np.ndarray:
    """Per patch, ``[4, G, G]`` float32 (x1, y1, x2, y2) in [-1, 1]: the box of the object the
    patch belongs to (as in :func:`patch_labels`; clamped to the image, as
    :func:`~vlmcompress.lvlm.curriculum.box_text` writes it), or the patch's own cell on the
    background. What a grounding answer copies, if every token of the object carries it."""
    return patch_targets(objs, image_size, patch)[2]


def mirror_boxes(boxes: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """:func:`patch_boxes` ``[..., 4, G, G]`` of the horizontally flipped image: columns
    reversed, and x1, x2 = -x2, -x1."""
    flipped = boxes[..., ::-1].copy() if isinstance(boxes, np.ndarray) else boxes.flip(-1)
    x1 = -flipped[..., 2, :, :]
    x2 = -flipped[..., 0, :, :]
    flipped[..., 0, :, :], flipped[..., 2, :, :] = x1, x2
    return flipped


def mirror_centres(centres: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """:func:`patch_centres` ``[..., 2, G, G]`` of the horizontally flipped image: columns
    reversed and x negated."""
    flipped = centres[..., ::-1].copy() if isinstance(centres, np.ndarray) else centres.flip(-1)
    flipped[..., 0, :, :] = -flipped[..., 0, :, :]
    return flipped


def grid_xy(grid: int) -> Tensor:
    """Each patch's centre ``[G*G, 2]`` (x, y) in [-1, 1], row-major."""
    cell = torch.arange(grid * grid)
    return 2 * (torch.stack([cell % grid, cell // grid], -1).float() + 0.5) / grid - 1
