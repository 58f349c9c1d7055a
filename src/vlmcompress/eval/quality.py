"""Pixel-fidelity metrics for rate-distortion curves: PSNR, MS-SSIM and bits per pixel.

All metrics take batches ``[B, 3, H, W]`` of floats in ``[0, 1]`` (one value per image,
no averaging over the batch) so a codec sweep can score every image of a batch at once.

MS-SSIM follows Wang et al. (2003): an 11-tap Gaussian window (sigma 1.5), K1=0.01,
K2=0.03, 2x2 average-pool downsampling and the five standard scale weights. Five scales
need the smaller image side to stay >= 11 px after four halvings (>= 161 px). For smaller
images :func:`ms_ssim` uses as many scales as fit (see :func:`ms_ssim_scales`) and
renormalises the first weights to sum to one, so the score stays in ``[0, 1]`` and equals
plain SSIM for one scale (five scales keep the published weights, as pytorch_msssim does);
images under 11 px per side are refused. Scores of images of different sizes are thus
comparable only when they use the same number of scales; the anchors and the learned
codec are always scored on the same images, so BD numbers are unaffected. Odd sides are padded by replicating the last row/column before pooling.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def bits_per_pixel(nbytes: int, height: int, width: int) -> float:
    """Rate of a coded image in bits per pixel of the *original* image size."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bits_per_pixel: image size must be positive, got {height}x{width}")
    if nbytes < 0:
        raise ValueError(f"bits_per_pixel: byte count must be >= 0, got {nbytes}")
    return 8.0 * nbytes / (height * width)


def to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """``HxWx3`` / ``BxHxWx3`` uint8 array(s) -> float32 tensor ``[B, 3, H, W]`` in ``[0, 1]``."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"to_tensor: expected HxWx3 uint8 images, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)


def _check_pair(x: Tensor, y: Tensor, who: str) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{who}: expected two [B, C, H, W] tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB over all channels and pixels.

    Args:
        x, y: ``[B, C, H, W]`` images in ``[0, data_range]`` (``1.0`` for floats in [0, 1]
            is the same as peak 255 on 8-bit data).
        max_db: cap for identical images (MSE 0), so curves stay finite for BD-rate.
    Returns:
        ``[B]`` PSNR values.
    """
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    floor = data_range ** 2 * 10.0 ** (-max_db / 10.0)
    out = 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))
    return out.to(x.dtype if x.is_floating_point() else torch.float32)


def ms_ssim_scales(height: int, width: int, win_size: int = 11, max_scales: int = 5) -> int:
    """How many MS-SSIM scales fit: each halving (ceil) must leave >= ``win_size`` px."""
    side, scales = min(height, width), 0
    while scales < max_scales and side >= win_size:
        scales += 1
        side = math.ceil(side / 2)
    return scales


def _gaussian_window(win_size: int, sigma: float, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def _blur(x: Tensor, win: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filter per channel: ``[B,C,H,W] -> [B,C,H-k+1,W-k+1]``."""
    c, k = x.shape[1], win.numel()
    x = F.conv2d(x, win.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, win.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def _ssim_terms(x: Tensor, y: Tensor, win: Tensor, data_range: float,
                k: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Mean SSIM and mean contrast-structure term per image and channel: two ``[B, C]``."""
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu_x, mu_y = _blur(x, win), _blur(y, win)
    var_x = _blur(x * x, win) - mu_x.pow(2)
    var_y = _blur(y * y, win) - mu_y.pow(2)
    cov = _blur(x * y, win) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1)
    return (lum * cs).flatten(2).mean(-1), cs.flatten(2).mean(-1)


def _halve(x: Tensor) -> Tensor:
    """2x2 average pooling; an odd side is first extended by replicating its last line."""
    pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.avg_pool2d(x, kernel_size=2)


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0, *, win_size: int = 11,
            sigma: float = 1.5, k: tuple[float, float] = (0.01, 0.03),
            max_scales: int = 5) -> Tensor:
    """Per-image multi-scale SSIM, with fewer (renormalised) scales on small images.

    Args:
        x, y: ``[B, C, H, W]`` images in ``[0, data_range]``; ``min(H, W) >= win_size``.
        max_scales: at most this many of the five standard scales.
    Returns:
        ``[B]`` MS-SSIM in ``[0, 1]`` (negative contrast terms are clipped to 0 as usual).
    """
    _check_pair(x, y, "ms_ssim")
    h, w = x.shape[-2:]
    scales = ms_ssim_scales(h, w, win_size, min(max_scales, len(MS_SSIM_WEIGHTS)))
    if scales == 0:
        raise ValueError(f"ms_ssim: images of {h}x{w} px are smaller than the "
                         f"{win_size}-px window")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    win = _gaussian_window(win_size, sigma, dtype).to(x.device)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=dtype, device=x.device)
    if scales < len(MS_SSIM_WEIGHTS):   # the full set is kept as published (it sums to 1.0001)
        weights = weights / weights.sum()
    factors = []
    for level in range(scales):
        ssim_val, cs = _ssim_terms(x, y, win, data_range, k)
        if level < scales - 1:
            factors.append(cs.clamp_min(0))
            x, y = _halve(x), _halve(y)
    factors.append(ssim_val.clamp_min(0))
    stacked = torch.stack(factors)                       # [scales, B, C]
    per_channel = torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)
    return per_channel.mean(-1)


def rd_metrics(original: np.ndarray, decoded: np.ndarray, nbytes: int) -> dict[str, float]:
    """``bpp``, ``psnr`` and ``ms_ssim`` of one decoded ``HxWx3`` uint8 image."""
    if original.shape != decoded.shape:
        raise ValueError(f"rd_metrics: decoded image is {decoded.shape}, original "
                         f"{original.shape}")
    x, y = to_tensor(original).double(), to_tensor(decoded).double()
    h, w = original.shape[:2]
    return {"bpp": bits_per_pixel(nbytes, h, w),
            "psnr": float(psnr(x, y)[0]),
            "ms_ssim": float(ms_ssim(x, y)[0])}
