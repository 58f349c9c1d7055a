"""PSNR, MS-SSIM (incl. small images) and bpp."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmcompress.eval.quality import (
    bits_per_pixel, ms_ssim, ms_ssim_scales, psnr, rd_metrics, to_tensor,
)


def smooth_batch(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """[b, 3, h, w] smooth random images in [0, 1] (upsampled noise, float64)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, h // 8 + 2, w // 8 + 2, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                           align_corners=False)


def noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


def test_psnr_known_values_per_image() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    np.testing.assert_allclose(psnr(x, y).numpy(), [20.0, 40.0], rtol=1e-5)
    assert psnr(x, x).tolist() == [100.0, 100.0]                 # capped, finite
    assert psnr(x, x, max_db=60.0)[0].item() == pytest.approx(60.0)


def test_psnr_8bit_peak_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    want = 10 * math.log10(255 ** 2 / np.mean((a.astype(float) - b) ** 2))
    assert psnr(to_tensor(a), to_tensor(b))[0].item() == pytest.approx(want, rel=1e-5)


def test_ms_ssim_matches_pytorch_msssim_on_large_images() -> None:
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x = smooth_batch(2, 176, 192)
    y = torch.stack([noisy(x[0], 0.05)[None], noisy(x[1], 0.2)[None]]).squeeze(1)
    ours = ms_ssim(x, y)
    ref = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-6)
    assert ours[0] > ours[1]


def test_one_scale_is_plain_ssim() -> None:
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x = smooth_batch(1, 24, 30)
    y = noisy(x, 0.1)
    ref = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
    np.testing.assert_allclose(ms_ssim(x, y, max_scales=1).numpy(), ref.numpy(), atol=1e-6)


def test_scale_count_for_small_images() -> None:
    assert ms_ssim_scales(161, 400) == 5
    assert ms_ssim_scales(160, 160) == 4          # pytorch_msssim refuses <= 160 for 5 scales
    assert ms_ssim_scales(48, 64) == 3
    assert ms_ssim_scales(29, 37) == 2
    assert ms_ssim_scales(11, 11) == 1
    assert ms_ssim_scales(10, 100) == 0


@pytest.mark.parametrize("h,w", [(29, 37), (48, 64), (11, 13)])
def test_ms_ssim_small_images_bounded_and_ordered(h: int, w: int) -> None:
    x = smooth_batch(1, h, w)
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-9)
    scores = [ms_ssim(x, noisy(x, s)).item() for s in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2] >= 0.0


def test_ms_ssim_refuses_images_below_the_window() -> None:
    x = torch.rand(1, 3, 10, 40)
    with pytest.raises(ValueError, match="10x40 px are smaller than the 11-px window"):
        ms_ssim(x, x)
    with pytest.raises(ValueError, match="one shape"):
        ms_ssim(x, torch.rand(1, 3, 10, 41))


def test_to_tensor_and_bpp() -> None:
    imgs = [np.full((4, 5, 3), 255, np.uint8), np.zeros((4, 5, 3), np.uint8)]
    t = to_tensor(imgs)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32
    assert t[0].min().item() == 1.0 and t[1].max().item() == 0.0
    assert to_tensor(imgs[0]).shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_tensor(np.zeros((4, 5, 3), np.float32))
    assert bits_per_pixel(100, 10, 20) == 4.0
    with pytest.raises(ValueError, match="positive"):
        bits_per_pixel(1, 0, 5)


def test_rd_metrics_of_a_decoded_image() -> None:
    a = (smooth_batch(1, 32, 40)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    m = rd_metrics(a, a, nbytes=160)
    assert m == {"bpp": 1.0, "psnr": 100.0, "ms_ssim": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="decoded image"):
        rd_metrics(a, a[:-1], nbytes=1)
