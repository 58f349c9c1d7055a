"""Images of any size -> the vision tower's square input, as the model's own processor does it.

Three policies (``lvlm.image_aspect``):

* ``pad`` — LLaVA-1.5 (``expand2square``): centre the image on a square canvas of its longer
  side filled with the processor's mean colour (``int(mean * 255)`` per channel, as the
  original code fills a PIL canvas), then resize to the tower's size;
* ``crop`` — transformers' ``CLIPImageProcessor``: resize the shorter side to the tower's
  size, then take the centre square;
* ``resize`` — stretch to the square (the embedded scenes are square, so it changes nothing
  there).

Every step runs in float32 (an antialiased resize in half precision is lossy, and absent on
CPU) and is differentiable: the codec trains through it. Boxes follow the same geometry:
:func:`box_to_input` maps a box given as fractions of the original image onto the square input.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Aspect = Literal["pad", "crop", "resize"]


def pad_to_square(x: Tensor, fill: Sequence[float]) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, S, S]``, ``S = max(H, W)``, centred (the extra pixel of an
    odd margin goes right / bottom, as ``expand2square`` pastes at ``(S - W) // 2``)."""
    h, w = x.shape[-2:]
    s = max(h, w)
    if h == w:
        return x
    top, left = (s - h) // 2, (s - w) // 2
    out = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, 3, 1, 1).repeat(x.shape[0], 1, s, s)
    out[..., top:top + h, left:left + w] = x          # differentiable with respect to x
    return out


def centre_crop_square(x: Tensor, size: int) -> Tensor:
    """Resize the shorter side of ``[B, 3, H, W]`` to ``size``, then cut the centre ``size`` square."""
    h, w = x.shape[-2:]
    short = min(h, w)      # integer sizes as transformers' processor computes them
    nh, nw = max(size, h * size // short), max(size, w * size // short)
    x = _resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def to_square(x: Tensor, size: int, aspect: Aspect, mean: Sequence[float]) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] (float32) -> ``[B, 3, size, size]`` under ``aspect``."""
    if aspect == "pad":
        fill = [int(m * 255) / 255.0 for m in mean]
        return _resize(pad_to_square(x, fill), size, size)
    if aspect == "crop":
        return centre_crop_square(x, size)
    if aspect == "resize":
        return _resize(x, size, size)
    raise ValueError(f"image_aspect: expected 'pad', 'crop' or 'resize', got {aspect!r}")


def prepare(images: Tensor | Sequence[Tensor], size: int, aspect: Aspect, mean: Sequence[float],
            std: Sequence[float]) -> Tensor:
    """A batch ``[B, 3, H, W]`` or a list of ``[3, H_i, W_i]`` (any sizes) in [0, 1] ->
    normalised ``[B, 3, size, size]`` float32. Images of one size are processed together."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        out = to_square(images.float(), size, aspect, mean)
    else:
        imgs = list(images)
        if not imgs or any(t.ndim != 3 or t.shape[0] != 3 for t in imgs):
            raise ValueError("images must be a non-empty list of [3, H, W] tensors")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(imgs):
            groups.setdefault(tuple(t.shape[-2:]), []).append(i)
        out = torch.empty(len(imgs), 3, size, size, device=imgs[0].device)
        for idx in groups.values():
            out[idx] = to_square(torch.stack([imgs[i].float() for i in idx]), size, aspect, mean)
    m = torch.tensor(mean, device=out.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=out.device).view(1, 3, 1, 1)
    return (out - m) / s


def box_to_input(box: tuple[float, float, float, float], height: int, width: int, aspect: Aspect
                 ) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` as fractions of a ``height x width`` image -> fractions of the
    square the tower sees (what LLaVA-1.5's normalised box answers refer to)."""
    x1, y1, x2, y2 = box
    if aspect == "resize" or height == width:
        return box
    s = max(height, width)
    if aspect == "pad":
        ox, oy = (s - width) // 2, (s - height) // 2
        return ((x1 * width + ox) / s, (y1 * height + oy) / s, (x2 * width + ox) / s, (y2 * height + oy) / s)
    m = min(height, width)                       # crop: the centre m x m square of the image
    ox, oy = (width - m) / 2, (height - m) / 2
    clip = lambda v: min(1.0, max(0.0, v))       # noqa: E731
    return (clip((x1 * width - ox) / m), clip((y1 * height - oy) / m),
            clip((x2 * width - ox) / m), clip((y2 * height - oy) / m))
