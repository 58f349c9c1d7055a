"""Encode/decode wall time of a codec against VVC on one timing image (the codec stage's
``*_ms_512`` metrics and ``benchmarks/bench_codec_speed.py``), and the test images it is built from."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmcompress.codec.anchors import make_anchor
from vlmcompress.codec.coder import bits_per_pixel, decode_image, encode_image, read_png
from vlmcompress.codec.losses import TokenFn
from vlmcompress.codec.model import LVLMCodec
from vlmcompress.data.records import ImageRecord

TIMING_SIZE = 512


def load_test_images(records: Sequence[ImageRecord], n: int) -> list[np.ndarray]:
    """The first ``n`` test images (all when ``n == 0``) as ``uint8 [H, W, 3]``."""
    chosen = records[:n] if n > 0 else records
    return [read_png(r.path) for r in chosen]


def _square(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[top:top + s, left:left + s]
    if s == side:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BICUBIC))


def timing_image(images: Sequence[np.ndarray], size: int = TIMING_SIZE) -> np.ndarray:
    """A ``size`` x ``size`` test image: the first image's centre crop if it is large enough,
    else a k x k mosaic of the first k*k test images (real content at the data set's scale,
    e.g. 16 scenes of 128 px)."""
    if not images:
        raise ValueError("no test images to build the timing image from")
    first = images[0]
    h, w = first.shape[:2]
    if min(h, w) >= size:  # native resolution: no resampling
        top, left = (h - size) // 2, (w - size) // 2
        return np.ascontiguousarray(first[top:top + size, left:left + size])
    k = math.ceil(size / min(first.shape[:2]))
    tile = size // k
    tiles = [_square(images[i % len(images)], tile) for i in range(k * k)]
    rows = [np.concatenate(tiles[r * k:(r + 1) * k], axis=1) for r in range(k)]
    mosaic = np.concatenate(rows, axis=0)
    return _square(mosaic, size) if mosaic.shape[0] != size else mosaic


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (allocations, caches, the ffmpeg binary's first start)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2), out


def time_codecs(model: LVLMCodec, token_fn: TokenFn | None, img: np.ndarray, rate: float, *,
                vvc_preset: str, vvc_qp: int, repeats: int, threads: int) -> dict[str, float]:
    """Encode/decode wall time (ms, median of ``repeats`` after a warm-up) of ``img``, ours vs VVC.

    Both run in this process with the same thread count (``threads``; 0: torch's current one).
    Our encode time includes the LVLM tower when the pre-editing net fuses its tokens.
    """
    old = torch.get_num_threads()
    n = threads if threads > 0 else old
    torch.set_num_threads(n)
    try:
        enc_fn = token_fn if model.needs_tokens else None
        enc_ms, data = _median_ms(lambda: encode_image(model, img, rate, token_fn=enc_fn), repeats)
        dec_ms, _ = _median_ms(lambda: decode_image(model, data), repeats)
        vvc = make_anchor("vvc", preset=vvc_preset, threads=n)
        vvc_enc_ms, vvc_data = _median_ms(lambda: vvc.encode(img, vvc_qp), repeats)
        vvc_dec_ms, _ = _median_ms(lambda: vvc.decode(vvc_data), repeats)
    finally:
        torch.set_num_threads(old)
    h, w = img.shape[:2]
    return {"encode_ms_512": enc_ms, "decode_ms_512": dec_ms, "vvc_encode_ms_512": vvc_enc_ms,
            "vvc_decode_ms_512": vvc_dec_ms, "timing_bpp_512": round(bits_per_pixel(data, h, w), 4),
            "vvc_timing_bpp_512": round(bits_per_pixel(vvc_data, h, w), 4), "timing_threads": n}
