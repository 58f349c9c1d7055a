"""Real bitstreams: roundtrip vs forward, determinism, file API, defensive parsing (fuzz)."""
from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
import torch

from vlmcompress.codec.bitstream import (HASH_LEN, HEADER_SIZE, MAX_DIM, OVERHEAD, Bitstream,
                                         BitstreamError, as_float32, leb128, pack, read_leb128, unpack)
from vlmcompress.codec.coder import (decode_file, decode_image, encode_file, encode_image,
                                     image_to_tensor, read_png, tensor_to_image, write_png)
from vlmcompress.codec.model import build_codec, weights_hash
from vlmcompress.codec.train import load_codec, save_codec

from codec_helpers import TinyTokens, lively, make_image, model_params

token_fn = TinyTokens()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(build_codec(model_params(use_tokens=True)), seed_edit=3)


@pytest.fixture(scope="module")
def data(model):
    return encode_image(model, make_image(64, 64), 1.0, token_fn=token_fn)


@pytest.mark.parametrize("hw,rate", [((64, 64), 1.0), ((45, 70), 0.3), ((70, 45), 2.0)])
def test_decode_equals_forward_reconstruction(model, hw, rate):
    img = make_image(*hw)
    data = encode_image(model, img, rate, token_fn=token_fn)
    decoded = decode_image(model, data)
    assert decoded.shape == img.shape and decoded.dtype == np.uint8
    x = image_to_tensor(img)
    with torch.no_grad():
        fwd = tensor_to_image(model(x, as_float32(rate), token_fn(x))["x_hat"])
    diff = np.abs(decoded.astype(int) - fwd.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())
    # the reconstruction is not trivially constant: the latents carried information
    assert decoded.std() > 5


def test_encode_decode_deterministic(model, data):
    img = make_image(64, 64)
    assert encode_image(model, img, 1.0, token_fn=token_fn) == data
    a, b = decode_image(model, data), decode_image(model, data)
    assert np.array_equal(a, b)


def test_header_fields_and_bpp(model, data):
    bs = unpack(data)
    assert (bs.height, bs.width, bs.rate) == (64, 64, 1.0)
    assert len(bs.z) < 128 and len(data) == OVERHEAD + len(bs.y) + len(bs.z) == 22 + len(bs.y) + len(bs.z)
    assert data[4] == 2 and bs.model_hash == weights_hash(model)[:HASH_LEN]
    odd = encode_image(model, make_image(64, 64), 0.1, token_fn=token_fn)
    assert unpack(odd).rate == as_float32(0.1) != 0.1  # the coded rate is the stored float32


def test_tokens_required_when_preedit_fuses_them(model):
    with pytest.raises(ValueError, match="token_fn"):
        encode_image(model, make_image(64, 64), 1.0)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_bad_images_rejected(model, bad):
    with pytest.raises(ValueError, match="image"):
        encode_image(model, bad, 1.0, token_fn=token_fn)


def test_file_from_another_model_is_rejected(model, data):
    torch.manual_seed(1)
    other = lively(build_codec(model_params(use_tokens=True)), seed_edit=4)
    with pytest.raises(BitstreamError, match="written by codec"):
        decode_image(other, data)


def test_version_1_files_are_still_read(model, data):
    """A version-1 file: 16 bytes of hash and a uint32 z length (what the coder wrote before)."""
    bs = unpack(data)
    body = (struct.pack("<4sBHHf16sI", b"VLMC", 1, bs.height, bs.width, bs.rate, weights_hash(model), len(bs.z))
            + bs.z + bs.y)
    old = _recrc(body)
    assert len(old) == len(data) + 15
    assert unpack(old).model_hash == weights_hash(model)
    assert np.array_equal(decode_image(model, old), decode_image(model, data))
    other = _recrc(body[:13] + b"\x01" * 16 + body[29:])
    with pytest.raises(BitstreamError, match="written by codec 0101"):
        decode_image(model, other)


def test_leb128_roundtrip_and_malformed_lengths():
    for n in (0, 1, 127, 128, 300, 2 ** 14, 2 ** 35 - 1):
        enc = leb128(n)
        assert read_leb128(b"x" + enc + b"y", 1) == (n, 1 + len(enc))
    assert leb128(127) == b"\x7f" and leb128(128) == b"\x80\x01"
    for bad, fragment in ((b"\x80", "truncated"), (b"\x80\x00", "shortest form"),
                          (b"\xff" * 5 + b"\x01", "longer than 5 bytes")):
        with pytest.raises(BitstreamError, match=fragment):
            read_leb128(bad, 0)
    with pytest.raises(ValueError):
        leb128(-1)


def test_saved_model_decodes_identically(model, data, tmp_path):
    save_codec(model, tmp_path / "m")
    again = load_codec(tmp_path / "m")
    assert np.array_equal(decode_image(again, data), decode_image(model, data))


def test_file_api_roundtrip_finds_model_by_hash(tmp_path):
    torch.manual_seed(2)
    m = lively(build_codec(model_params(use_tokens=False)))
    save_codec(m, tmp_path / "codecs" / "a" / "model")
    img = make_image(45, 70)
    write_png(tmp_path / "in.png", img)
    info = encode_file(tmp_path / "codecs" / "a" / "model", tmp_path / "in.png", tmp_path / "x.vlmc", 1.5)
    assert info["bytes"] == (tmp_path / "x.vlmc").stat().st_size
    assert info["bpp"] == pytest.approx(info["bytes"] * 8 / (45 * 70))
    out = decode_file(tmp_path / "x.vlmc", tmp_path / "out.png", search_roots=[tmp_path / "codecs"])
    assert out["model_dir"].endswith("model") and (out["height"], out["width"]) == (45, 70)
    assert np.array_equal(read_png(tmp_path / "out.png"), decode_image(m, (tmp_path / "x.vlmc").read_bytes()))
    with pytest.raises(FileNotFoundError, match="no saved codec"):
        decode_file(tmp_path / "x.vlmc", tmp_path / "o2.png", search_roots=[tmp_path / "nowhere"])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png"):
        encode_file(tmp_path / "codecs" / "a" / "model", tmp_path / "junk.png", tmp_path / "y.vlmc", 1.0)


# --- defensive parsing --------------------------------------------------------------------

def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _with_field(data: bytes, offset: int, fmt: str, value) -> bytes:
    body = bytearray(data[:-4])
    struct.pack_into(fmt, body, offset, value)
    return _recrc(bytes(body))


def _with_length(data: bytes, z_len: int) -> bytes:
    """``data`` with its z length replaced (and the CRC recomputed)."""
    _, start = read_leb128(data, HEADER_SIZE)
    return _recrc(data[:HEADER_SIZE] + leb128(z_len) + data[start:-4])


def test_structural_errors_with_valid_crc(model, data):
    """Fields that are wrong although the CRC matches (a file written by a buggy writer)."""
    payload = len(data) - OVERHEAD
    cases = [  # (mutated file, fragment of the one-line message)
        (_with_field(data, 0, "<4s", b"PNG\x00"), "bad magic"),
        (_with_field(data, 4, "<B", 3), "version 3"),
        (_with_field(data, 5, "<H", 0), "image size 0x64"),
        (_with_field(data, 7, "<H", MAX_DIM + 1), "outside"),
        (_with_field(data, 9, "<f", float("nan")), "invalid rate"),
        (_with_field(data, 9, "<f", -1.0), "invalid rate"),
        (_with_field(data, 9, "<f", 2.5), "rate must be in [0, 2]"),
        (_with_field(data, 13, "<4s", b"\x01" * 4), "written by codec"),
        (_with_length(data, payload + 1), "exceeds"),
        (_with_length(data, 2 ** 35 - 1), "exceeds"),
        (_with_length(data, 5), "malformed"),
        (_with_length(data, 0), "malformed"),
    ]
    for bad, fragment in cases:
        with pytest.raises(BitstreamError) as err:
            decode_image(model, bad)
        msg = str(err.value)
        assert "\n" not in msg and fragment in msg, (fragment, msg)


def test_fuzz_mutated_files_raise_bitstream_error_quickly(model, data):
    rng = np.random.default_rng(1234)
    mutants: list[bytes] = [b"", b"VLMC", data[:HEADER_SIZE], data + b"\x00", b"\x00" * len(data),
                            rng.integers(0, 256, 200, dtype=np.uint8).tobytes()]
    for i in range(300):
        kind = i % 6
        buf = bytearray(data)
        if kind == 0:  # flip 1..4 random bytes
            for pos in rng.choice(len(buf), size=rng.integers(1, 5), replace=False):
                buf[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            buf = buf[:int(rng.integers(0, len(buf)))]
        elif kind == 2:  # change the z length's byte, keep the old CRC
            buf[HEADER_SIZE] = int(rng.integers(0, 256))
        elif kind == 3:  # insert or delete a byte in the middle
            pos = int(rng.integers(0, len(buf)))
            buf = buf[:pos] + buf[pos + 1:] if rng.random() < 0.5 else buf[:pos] + b"\x5a" + buf[pos:]
        elif kind == 4:  # append garbage
            buf = buf + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        else:  # corrupt header dims / rate, keep the old CRC
            off = int(rng.choice([5, 7, 9]))
            buf[off] ^= int(rng.integers(1, 256))
        mutants.append(bytes(buf))
    t0 = time.perf_counter()
    for bad in mutants:
        if bad == data:
            continue
        with pytest.raises(BitstreamError):
            decode_image(model, bad)
    assert time.perf_counter() - t0 < 5.0


def test_non_bytes_input_is_rejected(model):
    with pytest.raises(BitstreamError, match="expected bytes"):
        decode_image(model, "VLMC")


def test_pack_validates_fields():
    good = Bitstream(height=4, width=4, rate=1.0, model_hash=b"\x00" * 4, z=b"\x00" * 8, y=b"\x00" * 8)
    assert unpack(pack(good)) == good
    big = Bitstream(height=4, width=4, rate=1.0, model_hash=b"\x00" * 4, z=b"\x00" * 400, y=b"\x00" * 8)
    assert unpack(pack(big)) == big and len(pack(big)) == OVERHEAD + 1 + 408   # a 2-byte z length
    with pytest.raises(ValueError):
        pack(Bitstream(0, 4, 1.0, b"\x00" * 4, b"", b""))
    with pytest.raises(ValueError):
        pack(Bitstream(4, 4, 1.0, b"\x00" * 16, b"", b""))
