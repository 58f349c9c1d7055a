"""Tiny codec models, token stand-ins and images shared by the codec tests."""
from __future__ import annotations

import numpy as np
import torch

from vlmcompress.codec.config import CodecModelParams, PreEditParams

TOKEN_DIM = 8


def model_params(preedit: bool = True, use_tokens: bool = True, levels: int = 3) -> CodecModelParams:
    return CodecModelParams(
        name="gained-mean-scale-hyperprior", N=16, M=24, levels=levels, gain_init=(0.5, 2.0),
        hyper_gain=True,
        preedit=PreEditParams(enabled=preedit, channels=4, depth=2, use_tokens=use_tokens,
                              token_dim=TOKEN_DIM, token_channels=4))


class TinyTokens:
    """A deterministic differentiable stand-in for a vision tower: 16 tokens of dim 8."""

    def __init__(self) -> None:
        self.proj = torch.randn(3, TOKEN_DIM, generator=torch.Generator().manual_seed(1))
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)
        return torch.tanh(3 * (pooled - 0.5) @ self.proj)


def lively(model, scale: float = 10.0, seed_edit: int | None = None):
    """Make an untrained model code non-zero symbols, and optionally edit.

    An untrained g_a outputs |y| ~ 0.04, which quantises to all zeros at every rate;
    scaling y (and unscaling in g_s) gives the rate tests something to code. ``seed_edit``
    gives the pre-editing net a non-zero residual so its tokens branch matters.
    """
    with torch.no_grad():
        model.core.g_a[-1].weight.mul_(scale)
        model.core.g_a[-1].bias.mul_(scale)
        model.core.g_s[0].weight.div_(scale)
        if seed_edit is not None:
            g = torch.Generator().manual_seed(seed_edit)
            model.preedit.head.weight.copy_(torch.randn(model.preedit.head.weight.shape, generator=g) * 0.05)
    model.update(force=True)
    return model.eval()


def make_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 80 * np.cos(yy / 3.0), (xx * 3) % 256],
                    -1).astype(np.uint8)
