"""Measuring trained codecs with real files: every point is a file encoded and decoded back.

Rate–distortion rows (bpp, PSNR, token MSE against the LVLM's features of the original) over
a set of test images, the round-trip error between the file and the model's forward pass,
and example files with their decoded PNGs.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vlmcompress.codec.bitstream import coded_rate
from vlmcompress.codec.coder import (bits_per_pixel, decode_image, encode_image, image_to_tensor, tensor_to_image,
                                     write_png)
from vlmcompress.codec.losses import TokenFn
from vlmcompress.codec.model import LVLMCodec
from vlmcompress.eval.quality import psnr, to_tensor
from vlmcompress.io import atomic_path


def eval_rates(levels: int, n: int) -> list[float]:
    """``n`` rates as a file codes them (float16) evenly spaced over ``[0, levels-1]`` (both ends included)."""
    return [coded_rate(r) for r in np.linspace(0.0, levels - 1, n)]


def image_tokens(token_fn: TokenFn, img: np.ndarray) -> Tensor:
    """``token_fn`` of one ``[H,W,3]`` uint8 image, without gradients (the tower target: ``[1,N,Dv]``)."""
    with torch.no_grad():
        return token_fn(image_to_tensor(img))


def measure_rd(name: str, model: LVLMCodec, images: Sequence[np.ndarray], rates: Sequence[float],
               token_fn: TokenFn, ref_tokens: Sequence[Tensor]) -> tuple[list[dict], float]:
    """Real files at every rate: mean bpp / PSNR / token MSE per rate, and the round-trip error.

    The round-trip error is the largest ``|decode(encode(x)) - forward(x)|`` in 8-bit levels
    over all images and rates (``forward``: the model's reconstruction in eval mode, clamped
    and rounded like the decoder's output).
    """
    enc_fn = token_fn if model.needs_tokens else None
    rows, worst = [], 0
    for rate in rates:
        bpps, psnrs, tmses = [], [], []
        for img, ref in zip(images, ref_tokens):
            data = encode_image(model, img, rate, token_fn=enc_fn)
            dec = decode_image(model, data)
            x = image_to_tensor(img)
            with torch.no_grad():
                fwd = tensor_to_image(model(x, rate, ref if model.needs_tokens else None)["x_hat"])
            worst = max(worst, int(np.abs(dec.astype(np.int16) - fwd.astype(np.int16)).max()))
            h, w = img.shape[:2]
            bpps.append(bits_per_pixel(data, h, w))
            psnrs.append(float(psnr(to_tensor(img), to_tensor(dec))[0]))
            tmses.append(float((image_tokens(token_fn, dec) - ref).pow(2).mean()))
        rows.append({"model": name, "rate": rate, "bpp": float(np.mean(bpps)),
                     "psnr": float(np.mean(psnrs)), "token_mse": float(np.mean(tmses))})
    return rows, float(worst)


def write_examples(models: dict[str, LVLMCodec], img: np.ndarray, rates: Sequence[float],
                   token_fn: TokenFn, out_dir: Path) -> pd.DataFrame:
    """The original and every codec's real file + decoded PNG at each rate, with their numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_png(out_dir / "original.png", img)
    ref = image_tokens(token_fn, img)
    rows = []
    for name, model in models.items():
        for rate in rates:
            rate = coded_rate(rate)
            data = encode_image(model, img, rate, token_fn=token_fn if model.needs_tokens else None)
            stem = f"{name}_rate{rate:.2f}"
            with atomic_path(out_dir / f"{stem}.vlmc") as tmp:
                tmp.write_bytes(data)
            dec = decode_image(model, data)
            write_png(out_dir / f"{stem}.png", dec)
            h, w = img.shape[:2]
            rows.append({"model": name, "rate": rate, "bpp": bits_per_pixel(data, h, w),
                         "psnr": float(psnr(to_tensor(img), to_tensor(dec))[0]),
                         "token_mse": float((image_tokens(token_fn, dec) - ref).pow(2).mean()),
                         "png": f"{stem}.png", "file": f"{stem}.vlmc"})
    table = pd.DataFrame(rows)
    with atomic_path(out_dir / "examples.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table
