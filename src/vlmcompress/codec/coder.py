"""Encode / decode real images to / from real files with a trained codec.

``encode_image(model, img, rate) -> bytes`` and ``decode_image(model, data) -> img`` work
on ``uint8 [H, W, 3]`` arrays; bpp is ``len(file) * 8 / (H * W)`` (header included).
The decoder reproduces the encoder's quantised reconstruction (the ``forward`` output in
eval mode, clamped and rounded to uint8) and is deterministic run to run.

``encode_file`` / ``decode_file`` are the command-line entry points (an image in, a PNG
out). A file names the weights that wrote it by hash, so ``decode_file`` can find its
model by itself among the saved codecs under ``outputs/codec`` when no ``model_dir`` is
given.

Files from outside are decoded defensively: the header is bounded against ``max_pixels``
and against the bits its entropy-coded string must at least hold *before* anything of the
claimed size is allocated, and the string is decoded by a bounds-checked rANS decoder
that refuses a string not used up exactly (:mod:`vlmcompress.codec.rans`).

Encoding runs on one thread: the quantised latents (and so the file's bytes) and the
decoder's entropy parameters then do not depend on the thread count; only the synthesis
transform, which makes pixels and not symbols, uses every thread.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vlmcompress.codec.bitstream import (HASH_LEN, MAX_DIM, Bitstream, BitstreamError, coded_rate,
                                         pack, unpack)
from vlmcompress.codec.losses import TokenFn
from vlmcompress.codec.model import LVLMCodec, check_rate, one_thread
from vlmcompress.codec.rans import RansError
from vlmcompress.codec.train import CHECKPOINT_DIR, CONFIG_NAME, load_codec, read_codec_record
from vlmcompress.images import read_image_rgb, write_png
from vlmcompress.io import atomic_open, check_output, read_capped

MAX_PIXELS = 1 << 23         # 8.4 MP (4K UHD fits): bounds the decoder's memory; params codec.max_pixels


def image_to_tensor(img: np.ndarray, max_pixels: int = MAX_PIXELS) -> Tensor:
    """``uint8 [H, W, 3]`` -> ``float [1, 3, H, W]`` in [0, 1] (validated)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"image must be a uint8 array [H, W, 3], got {desc}")
    h, w = img.shape[:2]
    if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM):
        raise ValueError(f"image size {h}x{w} outside 1..{MAX_DIM}")
    if h * w > max_pixels:
        raise ValueError(f"image size {h}x{w} is more than {max_pixels} pixels (codec.max_pixels)")
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0


def tensor_to_image(x: Tensor) -> np.ndarray:
    """``[1, 3, H, W]`` in [0, 1] -> ``uint8 [H, W, 3]`` (clamped, rounded)."""
    # In place after the clamp's copy; a channels-last x (the decoder's) needs no final copy.
    return x[0].clamp(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _require_updated(model: LVLMCodec) -> None:
    if model.core.entropy_bottleneck._quantized_cdf.numel() == 0:
        raise ValueError("the codec's entropy coder tables are empty: call model.update(force=True)")


def encode_image(model: LVLMCodec, img: np.ndarray, rate: float, *,
                 token_fn: TokenFn | None = None, max_pixels: int = MAX_PIXELS) -> bytes:
    """Compress ``uint8 [H, W, 3]`` at ``rate`` (float in [0, levels-1]) to a file's bytes.

    ``token_fn`` (the LVLM vision tower) is needed only when the pre-editing net fuses
    tokens. The rate is rounded to float16 first: the value in the file is the one coded.
    Runs on one thread, so the bytes do not depend on the thread count.
    """
    with one_thread():
        return _encode(model, img, rate, token_fn, max_pixels)


def _encode(model: LVLMCodec, img: np.ndarray, rate: float, token_fn: TokenFn | None,
            max_pixels: int) -> bytes:
    _require_updated(model)
    x = image_to_tensor(img, max_pixels)
    rate = coded_rate(check_rate(rate, model.levels))  # monotone rounding keeps it in range
    device = next(model.parameters()).device
    x = x.to(device)
    tokens = None
    if model.needs_tokens:
        if token_fn is None:
            raise ValueError("this codec's pre-editing net fuses LVLM tokens: pass token_fn")
        with torch.no_grad():
            tokens = token_fn(x)
    out = model.compress(x, rate, tokens)
    (stream,) = out["strings"]
    h, w = out["size"]
    return pack(Bitstream(height=h, width=w, rate=rate, model_hash=model.weights_digest()[:HASH_LEN],
                          streams=(stream,)))


def decode_image(model: LVLMCodec, data: bytes, *, source: str = "bitstream",
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a file's bytes with the model that wrote them -> ``uint8 [H, W, 3]``.

    Raises :class:`BitstreamError` for anything wrong with the data, including a file
    written by other weights, an image of more than ``max_pixels`` pixels, or an
    entropy-coded string too short for the size the header claims.
    """
    bs = unpack(data, source)
    if bs.height * bs.width > max_pixels:
        raise BitstreamError(f"{source}: image size {bs.height}x{bs.width} is more than {max_pixels} "
                             f"pixels (codec.max_pixels)")
    mine = model.weights_digest()[:len(bs.model_hash)]   # a file carries a prefix of the hash
    if bs.model_hash != mine:
        raise BitstreamError(f"{source}: written by codec {bs.model_hash.hex()}, "
                             f"not by this one ({mine.hex()})")
    try:
        rate = check_rate(bs.rate, model.levels)
    except ValueError as exc:
        raise BitstreamError(f"{source}: {exc}") from None
    _require_updated(model)
    shape = model.latent_shape((bs.height, bs.width))
    have = 8 * sum(len(s) for s in bs.streams)
    need = model.min_stream_bits((bs.height, bs.width))
    if have < need:
        raise BitstreamError(f"{source}: {have} coded bits cannot hold a {bs.height}x{bs.width} image "
                             f"(at least {need:.0f})")
    try:
        if len(bs.streams) == 1:
            x_hat = model.decompress(list(bs.streams), shape, rate, (bs.height, bs.width))["x_hat"]
        else:   # versions 1 and 2: z and y apart
            z, y = bs.streams
            x_hat = model.decompress([[y], [z]], shape, rate, (bs.height, bs.width), split=True)["x_hat"]
    except RansError as exc:
        raise BitstreamError(f"{source}: {exc}") from None
    except (ValueError, RuntimeError, IndexError) as exc:
        raise BitstreamError(f"{source}: cannot decode payload ({type(exc).__name__})") from None
    return tensor_to_image(x_hat)


def bits_per_pixel(data: bytes, height: int, width: int) -> float:
    return len(data) * 8.0 / (height * width)


def read_png(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any supported image file -> ``uint8 [H, W, 3]`` (:func:`vlmcompress.images.read_image_rgb`)."""
    return read_image_rgb(path, max_pixels=max_pixels)


def encode_file(model_dir: str | Path, in_png: str | Path, out: str | Path, rate: float, *,
                token_fn: TokenFn | None = None, max_pixels: int = MAX_PIXELS) -> dict:
    """Encode an image file with a saved codec; returns ``{bytes, bpp, height, width, rate}``.

    ``out`` may be a new path or a regular file (replaced atomically), never a folder."""
    check_output(out)
    img = read_png(in_png, max_pixels)
    model = load_codec(model_dir)
    data = encode_image(model, img, rate, token_fn=token_fn, max_pixels=max_pixels)
    with atomic_open(out, "wb") as fh:
        fh.write(data)
    h, w = img.shape[:2]
    return {"bytes": len(data), "bpp": bits_per_pixel(data, h, w), "height": h, "width": w,
            "rate": coded_rate(rate)}


def find_model_dir(model_hash: bytes, roots: Iterable[str | Path]) -> Path | None:
    """The saved codec folder (``codec.json``) under ``roots`` whose weights' hash starts
    with ``model_hash`` (a file carries its first bytes)."""
    want = model_hash.hex()
    for root in roots:
        # A final model before a training checkpoint holding the same weights.
        for cfg in sorted(Path(root).rglob(CONFIG_NAME), key=lambda p: (p.parent.name == CHECKPOINT_DIR, p)):
            try:
                record = read_codec_record(cfg.parent)
            except (ValueError, FileNotFoundError):
                continue
            if str(record.get("model_hash", "")).startswith(want):
                return cfg.parent
    return None


def default_model_roots() -> list[Path]:
    from vlmcompress.paths import outputs_dir
    return [outputs_dir("codec")]


def _read_capped(path: Path, limit: int) -> bytes:
    """A codec file's bytes, refused past ``limit`` (no file of the allowed pixels is larger)."""
    try:
        return read_capped(path, limit, "codec file")
    except PermissionError as exc:
        raise FileNotFoundError(f"{path}: cannot read ({exc.strerror})") from None


def decode_file(in_path: str | Path, out_png: str | Path, model_dir: str | Path | None = None, *,
                search_roots: Iterable[str | Path] | None = None, max_pixels: int = MAX_PIXELS) -> dict:
    """Decode a codec file to PNG; returns ``{bytes, bpp, height, width, rate, model_dir}``.

    Without ``model_dir`` the model is looked up by the file's model hash under
    ``search_roots`` (default: ``outputs/codec``). ``out_png`` may be a new path or a
    regular file (replaced atomically), never a folder.
    """
    in_path = Path(in_path)
    check_output(out_png)
    # Raw RGB plus a margin: no file of at most max_pixels is larger.
    data = _read_capped(in_path, 3 * max_pixels + (1 << 20))
    bs = unpack(data, str(in_path))
    if model_dir is None:
        roots = list(search_roots) if search_roots is not None else default_model_roots()
        model_dir = find_model_dir(bs.model_hash, roots)
        if model_dir is None:
            raise FileNotFoundError(f"{in_path}: no saved codec with model hash {bs.model_hash.hex()} "
                                    f"under {', '.join(map(str, roots))}; pass model_dir")
    model = load_codec(model_dir)
    img = decode_image(model, data, source=str(in_path), max_pixels=max_pixels)
    write_png(out_png, img)
    return {"bytes": len(data), "bpp": bits_per_pixel(data, bs.height, bs.width),
            "height": bs.height, "width": bs.width, "rate": bs.rate, "model_dir": str(model_dir)}
