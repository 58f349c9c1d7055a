"""Pre-editing network: edits the image, on the encoder side, before it is coded.

A small U-Net: a downsampling branch, an optional token branch that brings the frozen
LVLM vision tower's patch tokens of the *input* image (reshaped to their patch grid and
resized to the bottleneck) into the bottleneck, and an upsampling branch with skip
connections. The output is ``x + residual`` and the last convolution starts at zero, so
the network is exactly the identity at initialisation: training starts from "send the
image as is" and only learns edits the rate/token losses pay for.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vlmcompress.codec.config import PreEditParams


def tokens_to_grid(tokens: Tensor) -> Tensor:
    """Patch tokens ``[B, N, D]`` -> feature map ``[B, D, g, g]``.

    ``N`` must be ``g*g`` (patch tokens) or ``g*g + 1`` (a leading CLS token, dropped).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        g = math.isqrt(n - 1) if n > 1 else 0
        if g == 0 or g * g != n - 1:
            raise ValueError(f"{n} tokens are neither a square grid nor a square grid + CLS")
        tokens = tokens[:, 1:]
    return tokens.transpose(1, 2).reshape(b, d, g, g)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
    )


class PreEditNet(nn.Module):
    """``forward(x [B,3,H,W], tokens [B,N,Dv] | None) -> x_edit [B,3,H,W]``.

    ``H`` and ``W`` must be multiples of ``2**depth`` (the codec pads to 64 first).
    """

    def __init__(self, p: PreEditParams):
        super().__init__()
        self.params = p
        widths = [p.channels * 2 ** i for i in range(p.depth + 1)]
        self.stem = _block(3, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
                          nn.LeakyReLU(0.2, inplace=True), _block(widths[i + 1], widths[i + 1]))
            for i in range(p.depth))
        bottom = widths[-1]
        if p.use_tokens:
            self.token_proj = nn.Sequential(
                nn.LayerNorm(p.token_dim), nn.Linear(p.token_dim, p.token_channels))
            self.fuse = _block(bottom + p.token_channels, bottom)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(p.depth)))
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(p.depth)))
        self.head = nn.Conv2d(widths[0], 3, 3, padding=1)
        # Zero residual at init: the net starts as the identity.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def stride(self) -> int:
        return 2 ** self.params.depth

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ValueError(f"pre-edit input {tuple(x.shape[-2:])} is not a multiple of {self.stride}")
        skips = []
        h = self.stem(x)
        for down in self.down:
            skips.append(h)
            h = down(h)
        if self.params.use_tokens:
            if tokens is None:
                raise ValueError("this pre-editing net fuses LVLM tokens: pass tokens=[B, N, Dv]")
            if tokens.shape[0] != x.shape[0] or tokens.shape[-1] != self.params.token_dim:
                raise ValueError(f"tokens {tuple(tokens.shape)} do not match batch {x.shape[0]} "
                                 f"and token_dim {self.params.token_dim}")
            t = self.token_proj(tokens.to(h.dtype))
            grid = tokens_to_grid(t)
            grid = F.interpolate(grid, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = self.fuse(torch.cat([h, grid], dim=1))
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            h = merge(torch.cat([up(h), skip], dim=1))
        return x + self.head(h)
