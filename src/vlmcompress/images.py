"""The one image reader: any supported image file -> ``uint8 [H, W, 3]`` RGB, and atomic PNG output.

Every image becomes an ``H x W x 3`` ``uint8`` RGB array, whatever it was on disk:

* formats: PNG, JPEG (and MPO), TIFF, WebP, BMP, PNM and single-frame GIF; anything else,
  and anything that is not a regular file (a folder, FIFO or device), is a one-line
  ``ValueError`` naming the file, raised before any pixel is decoded;
* sizes are kept as they are (odd sizes included; the codecs pad and crop themselves);
  more than ``max_pixels`` pixels is refused before decoding;
* greyscale and bilevel images are replicated to three channels, palette images are
  expanded through their palette;
* transparency (an alpha channel, a palette or colour-key ``tRNS``) is composited on a
  **white** background, ``out = a * colour + (1 - a) * 255`` — the usual look of
  transparent images in viewers and what a screen shot of them would show;
* 16-bit images are scaled to 8 bits with rounding, ``round(v * 255 / 65535)``, from all
  16 bits (Pillow alone would truncate colour PNGs to their high byte); 32-bit integer
  images are read the same way and must hold values in ``[0, 65535]``;
* floating-point images (TIFF) must hold finite values in ``[0, 1]``, scaled by 255 with
  rounding; anything else is an error rather than a silently black or white image;
* the EXIF orientation is applied, so images are upright;
* a multi-frame file (animated GIF / PNG / WebP, multi-page TIFF) is refused; an MPO
  (a camera JPEG with extra pictures) gives its first, primary picture with a warning;
* colour profiles are ignored (pixel values are taken as stored).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmcompress.io import atomic_path, check_regular_file

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".gif")
FORMATS = {"PNG", "JPEG", "MPO", "TIFF", "WEBP", "BMP", "PPM", "GIF"}
MAX_PIXELS = 178_956_970        # Pillow's own decompression-bomb limit

# 16-bit colour PNG rawmodes, and the rawmode that decodes the same bytes (same bits per
# pixel, so the same PNG un-filtering) but yields the low bytes / all bytes instead.
_PNG16_LOW = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_PNG16_ALL = {"LA;16B": "RGBA"}           # [L hi, L lo, A hi, A lo] as four 8-bit bands

# EXIF orientation -> the numpy operation that makes the image upright (axes: H, W, C).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend on white and quantise to 8 bits.

    colour: (H, W, 3) float in [0, 1]; alpha: (H, W) float in [0, 1] -> (H, W, 3) uint8.
    """
    a = alpha[..., None]
    return np.rint(255.0 * (colour * a + (1.0 - a))).astype(np.uint8)


def _to_unit(a: np.ndarray, peak: float) -> np.ndarray:
    return a.astype(np.float64) / peak


def _finish(values: np.ndarray, peak: float, alpha: np.ndarray | None) -> np.ndarray:
    """(H, W, 1|3) integers in [0, peak] (+ optional (H, W) alpha) -> (H, W, 3) uint8."""
    if values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    if alpha is None:
        if peak == 255:
            return values.astype(np.uint8)
        return np.rint(values.astype(np.float64) * (255.0 / peak)).astype(np.uint8)
    return composite_on_white(_to_unit(values, peak), _to_unit(alpha, peak))


def _colour_key(values: np.ndarray, key: int | tuple[int, ...] | bytes | None, peak: float) -> np.ndarray | None:
    """tRNS colour key of a greyscale/RGB PNG -> alpha (H, W) in [0, peak], or None."""
    if key is None or isinstance(key, bytes):
        return None
    key_arr = np.atleast_1d(np.asarray(key, dtype=np.int64))
    if key_arr.size != values.shape[-1]:
        return None
    return np.where(np.all(values == key_arr, axis=-1), 0, peak).astype(np.float64)


def _png16_colour(path: Path, im: Image.Image, raw: str) -> np.ndarray:
    """All 16 bits of a 16-bit colour PNG: (H, W, C) uint16 with C in {2, 3, 4}.

    Pillow decodes these to 8 bits by dropping the low byte; decoding the same stream
    again with a rawmode of equal pixel size recovers the missing bytes. ``im`` is the
    already loaded normal decode (the high bytes), ``raw`` its PNG rawmode.
    """
    with Image.open(path) as again:
        try:
            tile = again.tile[0]
            again.tile = [tile._replace(args=_PNG16_LOW.get(raw) or _PNG16_ALL[raw])]
        except (AttributeError, IndexError, TypeError) as exc:   # Pillow internals changed
            raise ValueError(f"{path}: this Pillow cannot decode 16-bit colour PNGs at full "
                             f"precision ({exc})") from None
        again.load()
        other = np.asarray(again).astype(np.uint16)
    if raw in _PNG16_ALL:                    # other holds L hi, L lo, A hi, A lo
        return np.stack([other[..., 0] * 256 + other[..., 1], other[..., 2] * 256 + other[..., 3]], -1)
    return np.asarray(im).astype(np.uint16) * 256 + other


def _decode(path: Path, im: Image.Image, raw: str | None) -> np.ndarray:
    """A loaded, format-checked image -> (H, W, 3) uint8 (orientation not yet applied).

    ``raw``: the PNG rawmode captured before loading (None for JPEG).
    """
    key = im.info.get("transparency")
    if raw in _PNG16_LOW or raw in _PNG16_ALL:
        v = _png16_colour(path, im, raw)
        if v.shape[-1] in (2, 4):
            return _finish(v[..., :-1], 65535, v[..., -1])
        return _finish(v, 65535, _colour_key(v, key, 65535))
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16-bit greyscale PNG
        v = np.asarray(im).astype(np.int64)[..., None]
        if v.min() < 0 or v.max() > 65535:
            raise ValueError(f"{path}: integer image outside the 16-bit range")
        return _finish(v, 65535, _colour_key(v, key, 65535))
    if im.mode == "F":
        return _finish(_float_unit(path, im), 255, None)
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if key is not None or im.mode == "PA" else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(f"{path}: unsupported image mode {im.mode}")
    v = np.asarray(im)
    if v.ndim == 2:
        v = v[..., None]
    if im.mode in ("LA", "RGBA"):
        return _finish(v[..., :-1], 255, v[..., -1])
    return _finish(v, 255, _colour_key(v, key, 255))


def _float_unit(path: Path, im: Image.Image) -> np.ndarray:
    """A mode-``F`` image -> (H, W, 1) uint8, from finite values in [0, 1]."""
    v = np.asarray(im, dtype=np.float64)
    if not np.all(np.isfinite(v)) or v.min() < 0.0 or v.max() > 1.0:
        raise ValueError(f"{path}: floating-point image must hold finite values in [0, 1]")
    return np.rint(v * 255.0).astype(np.uint8)[..., None]


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:                         # a broken EXIF block must not lose the image
        return 1


def _frames(path: Path, im: Image.Image) -> None:
    """Refuse multi-frame files; an MPO's first picture is its primary image."""
    n = getattr(im, "n_frames", 1)
    if n <= 1:
        return
    if im.format == "MPO":
        warnings.warn(f"{path}: MPO with {n} pictures; reading the first (primary) one", stacklevel=3)
        return
    raise ValueError(f"{path}: {n} frames; expected a single image")


def read_image_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image file -> (H, W, 3) uint8 RGB (see the module docstring for the rules)."""
    path = check_regular_file(path)
    try:
        with Image.open(path) as im:
            if im.format not in FORMATS:
                raise ValueError(f"{path}: unsupported image format {im.format} "
                                 f"(supported: {', '.join(sorted(FORMATS))})")
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"{path}: {w}x{h} image has more than {max_pixels} pixels")
            _frames(path, im)
            raw = im.tile[0].args if im.format == "PNG" and im.tile else None
            im.load()
            rgb = _decode(path, im, raw if isinstance(raw, str) else None)
            orient = _orientation(im)
    except (ValueError, UnidentifiedImageError, OSError, SyntaxError, EOFError,
            Image.DecompressionBombError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: cannot read image ({msg})") from None
    if orient in _ORIENT:
        rgb = _ORIENT[orient](rgb)
    return np.ascontiguousarray(rgb)


def write_png(path: str | Path, img: np.ndarray) -> None:
    """``uint8 [H, W, 3]`` -> a PNG file, written atomically (replaces only a regular file)."""
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
