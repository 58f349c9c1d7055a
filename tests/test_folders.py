"""Image folders as extra RD evaluation sets: conversions to 8-bit RGB and clear errors."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from vlmcompress.data.folders import load_image_folder
from vlmcompress.images import composite_on_white, read_image_rgb

RNG = np.random.default_rng(0)


def _png16(arr: np.ndarray, color_type: int, trns: tuple[int, ...] | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour), rows cycling all 5 filters."""
    h, w = arr.shape[:2]
    bpp = arr.reshape(h, w, -1).shape[2] * 2
    rows = arr.reshape(h, -1).astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(np.int64)
    out, prev = [], np.zeros(w * bpp, np.int64)
    for y, x in enumerate(rows):
        a = np.concatenate([np.zeros(bpp, np.int64), x[:-bpp]])
        c = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        b = prev
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        ftype = y % 5
        pred = [0 * x, a, b, (a + b) // 2, paeth][ftype]
        out.append(bytes([ftype]) + ((x - pred) % 256).astype(np.uint8).tobytes())
        prev = x

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    extra = chunk(b"tRNS", struct.pack(f">{len(trns)}H", *trns)) if trns else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + extra + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


def _scale16(v: np.ndarray) -> np.ndarray:
    return np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_png_odd_size_is_exact(tmp_path):
    rgb = RNG.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = read_image_rgb(_save(Image.fromarray(rgb), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3) and np.array_equal(out, rgb)


def test_grey_bilevel_and_palette(tmp_path):
    g = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    assert np.array_equal(read_image_rgb(_save(Image.fromarray(g), tmp_path / "g.png")), np.stack([g] * 3, -1))
    bits = Image.fromarray(g > 128).convert("1")
    assert np.array_equal(read_image_rgb(_save(bits, tmp_path / "b.png")),
                          np.stack([np.where(g > 128, 255, 0)] * 3, -1).astype(np.uint8))
    rgb = RNG.integers(0, 256, (5, 9, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=8)
    expect = np.asarray(pal.convert("RGB"))
    assert np.array_equal(read_image_rgb(_save(pal, tmp_path / "p.png")), expect)
    pal.info["transparency"] = 0                              # palette entry 0 is transparent
    out = read_image_rgb(_save(pal, tmp_path / "pt.png", transparency=0))
    idx = np.asarray(pal)
    assert np.array_equal(out[idx == 0], np.full(((idx == 0).sum(), 3), 255, np.uint8))
    assert np.array_equal(out[idx != 0], expect[idx != 0])


def test_alpha_is_composited_on_white(tmp_path):
    rgba = RNG.integers(0, 256, (6, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 0, 0)      # fully transparent -> white
    rgba[0, 1] = (200, 100, 0, 255)    # opaque -> itself
    out = read_image_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    c, a = rgba[..., :3].astype(float), rgba[..., 3:].astype(float)
    assert np.array_equal(out, np.rint((c * a + 255 * (255 - a)) / 255).astype(np.uint8))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (200, 100, 0)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    out = read_image_rgb(_save(la, tmp_path / "la.png"))
    assert np.array_equal(out[..., 0], composite_on_white(c[..., :1].repeat(3, -1) / 255, a[..., 0] / 255)[..., 0])
    assert np.array_equal(out[..., 0], out[..., 2])


def test_colour_key_transparency(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (10, 20, 30)
    out = read_image_rgb(_save(Image.fromarray(rgb), tmp_path / "k.png", transparency=(0, 0, 0)))
    assert tuple(out[0, 0]) == (10, 20, 30) and (out[1] == 255).all()


def test_16bit_grey_png_is_scaled_with_rounding(tmp_path):
    v = np.array([[0, 255, 256, 32767, 32896, 65535, 383, 65407]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    (tmp_path / "g16b.png").write_bytes(_png16(v, 0))
    for name in ("g16.png", "g16b.png"):
        out = read_image_rgb(tmp_path / name)
        assert out[0, :, 0].tolist() == [0, 1, 1, 127, 128, 255, 1, 255]
        assert np.array_equal(out, np.stack([_scale16(v)] * 3, -1))


def test_16bit_colour_png_uses_all_16_bits(tmp_path):
    rgb = RNG.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
    rgb[0, 0] = (255, 32767, 383)      # truncation to the high byte would give (0, 127, 1)
    (tmp_path / "c16.png").write_bytes(_png16(rgb, 2))
    out = read_image_rgb(tmp_path / "c16.png")
    assert np.array_equal(out, _scale16(rgb)) and tuple(out[0, 0]) == (1, 127, 1)


def test_16bit_alpha_pngs_composite_in_16_bits(tmp_path):
    rgba = RNG.integers(0, 65536, (5, 4, 4)).astype(np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    (tmp_path / "a16.png").write_bytes(_png16(rgba, 6))
    c, a = rgba[..., :3] / 65535.0, rgba[..., 3] / 65535.0
    assert np.array_equal(read_image_rgb(tmp_path / "a16.png"), composite_on_white(c, a))
    la = rgba[..., [0, 3]]
    (tmp_path / "la16.png").write_bytes(_png16(la, 4))
    expect = composite_on_white(np.repeat(la[..., :1] / 65535.0, 3, -1), la[..., 1] / 65535.0)
    assert np.array_equal(read_image_rgb(tmp_path / "la16.png"), expect)
    key = tuple(int(x) for x in rgba[1, 1, :3])
    (tmp_path / "k16.png").write_bytes(_png16(rgba[..., :3], 2, trns=key))
    out = read_image_rgb(tmp_path / "k16.png")
    assert tuple(out[1, 1]) == (255, 255, 255) and np.array_equal(out[2], _scale16(rgba[2, :, :3]))


def test_jpeg_cmyk_and_exif_orientation(tmp_path):
    rgb = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    _save(Image.fromarray(rgb), tmp_path / "a.jpg", quality=90)
    assert np.array_equal(read_image_rgb(tmp_path / "a.jpg"), np.asarray(Image.open(tmp_path / "a.jpg")))
    _save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.jpg")
    assert np.array_equal(read_image_rgb(tmp_path / "cmyk.jpg"),
                          np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = _save(Image.fromarray(rgb), tmp_path / f"o{orientation}.jpg", exif=exif, quality=90)
        expect = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        assert np.array_equal(read_image_rgb(path), expect), orientation


def test_load_folder_sorted_and_skips_hidden_and_subfolders(tmp_path):
    for name, size in [("b.png", (3, 2)), ("a.JPG", (5, 4)), ("c.jpeg", (7, 6))]:
        fmt = "PNG" if name.endswith("png") else "JPEG"
        Image.new("RGB", size, (1, 2, 3)).save(tmp_path / name, fmt)
    (tmp_path / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("ignored")
    items = load_image_folder(tmp_path)
    assert [(n, a.shape) for n, a in items] == [("a.JPG", (4, 5, 3)), ("b.png", (2, 3, 3)), ("c.jpeg", (6, 7, 3))]


def _animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (4, 4), (200 * i, 0, 0)) for i in range(2)]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])
    return path


def _ico(path: Path) -> Path:
    Image.new("RGB", (16, 16)).save(path, "ICO")
    return path


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:600])
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "notes.txt").write_text("hi"), r"notes.txt: not an image file \(allowed"),
    (lambda d: (d / "x.png").write_bytes(b"\x89PNG garbage"), r"x.png: cannot read image"),
    (lambda d: _truncated_jpeg(d / "t.jpg"), r"t.jpg: cannot read image"),
    (lambda d: _animated_gif(d / "g.gif"), r"g.gif: 2 frames; expected a single image"),
    (lambda d: _ico(d / "i.png"), r"i.png: unsupported image format ICO"),
    (lambda d: os.mkfifo(d / "f.png"), r"f.png: not a regular file"),
    (lambda d: None, r"no images in folder"),
])
def test_errors_name_the_file(tmp_path, make, match):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (2, 2)).save(folder / "ok.png") if "folder" not in match else None
    make(folder)
    with pytest.raises(ValueError, match=match) as err:
        load_image_folder(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="nope: not a folder"):
        load_image_folder(tmp_path / "nope")
