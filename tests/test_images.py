"""The one image reader: bit depths, floats, alpha, orientation, frames, non-regular files."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from PIL import Image

from vlmcompress.images import read_image_rgb


def test_float_tiff_is_scaled_from_unit_range(tmp_path):
    v = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    Image.fromarray(v, mode="F").save(tmp_path / "f.tif")
    out = read_image_rgb(tmp_path / "f.tif")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], np.rint(v * 255).astype(np.uint8))


@pytest.mark.parametrize("bad", [np.full((2, 2), 7.0), np.array([[0.5, np.nan], [0, 1]])])
def test_float_tiff_outside_unit_range_is_an_error_not_a_white_image(tmp_path, bad):
    Image.fromarray(bad.astype(np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f.tif: floating-point image must hold finite values in \[0, 1\]"):
        read_image_rgb(tmp_path / "f.tif")


def test_int32_and_16bit_grey_are_scaled_from_16_bits(tmp_path):
    v = np.array([[0, 257, 65535]], dtype=np.int32)
    Image.fromarray(v, mode="I").save(tmp_path / "i.tif")
    assert read_image_rgb(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 1, 255]
    Image.fromarray(v.astype(np.uint16)).save(tmp_path / "g.png")
    assert read_image_rgb(tmp_path / "g.png")[0, :, 1].tolist() == [0, 1, 255]
    Image.fromarray(np.array([[70000]], dtype=np.int32), mode="I").save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        read_image_rgb(tmp_path / "big.tif")


def test_alpha_is_composited_on_white_and_exif_orientation_applied(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255                       # one opaque red pixel, the rest transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.webp", lossless=True)
    out = read_image_rgb(tmp_path / "a.webp")
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 2].tolist() == [255, 255, 255]
    im = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)
    exif = Image.Exif()
    exif[0x0112] = 6                          # rotate 90 degrees clockwise to view
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert read_image_rgb(tmp_path / "r.jpg").shape == (3, 2, 3)


def test_multipage_tiff_is_refused(tmp_path):
    pages = [Image.new("RGB", (4, 4), (i * 100, 0, 0)) for i in range(3)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ValueError, match="m.tif: 3 frames; expected a single image"):
        read_image_rgb(tmp_path / "m.tif")


def test_fifo_folder_and_device_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(ValueError, read_image_rgb, fifo).value))
    t.start()
    t.join(10)
    assert not t.is_alive() and "not a regular file" in str(result[0])
    with pytest.raises(ValueError, match="a folder"):
        read_image_rgb(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        read_image_rgb("/dev/zero")


def test_pixel_cap_is_checked_before_decoding(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="300x200 image has more than 50000 pixels"):
        read_image_rgb(tmp_path / "big.png", max_pixels=50_000)
