"""Training images for the codec: any image files or data set records, read on demand."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlmcompress.data.records import ImageRecord
from vlmcompress.images import read_image_rgb


class RecordImages(Sequence):
    """Map-style data set of training images: ``[3, H, W]`` uint8 tensors, read on demand.

    Images with a side below ``min_side`` are scaled up (aspect kept) so every one can give
    a ``min_side`` crop; reading on demand keeps COCO-sized splits out of memory.
    ``records``: image records or plain image paths.
    """

    def __init__(self, records: Sequence[ImageRecord | str | Path], min_side: int):
        self.paths = [r.path if isinstance(r, ImageRecord) else Path(r) for r in records]
        self.min_side = int(min_side)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        img = read_image_rgb(self.paths[i])
        h, w = img.shape[:2]
        if min(h, w) < self.min_side:
            k = self.min_side / min(h, w)
            size = (max(self.min_side, math.ceil(w * k)), max(self.min_side, math.ceil(h * k)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
