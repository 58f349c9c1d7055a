"""Real bitstreams: roundtrip vs forward, determinism, file API, defensive parsing (fuzz)."""
from __future__ import annotations

import dataclasses
import struct
import time
import zlib

import numpy as np
import pytest
import torch

from vlmcompress.codec.bitstream import (HASH_LEN, MAX_DIM, OVERHEAD, Bitstream, BitstreamError,
                                         coded_rate, leb128, pack, read_leb128, unpack)
from vlmcompress.codec.coder import (decode_file, decode_image, encode_file, encode_image,
                                     image_to_tensor, read_png, tensor_to_image, write_png)
from vlmcompress.codec.model import build_codec, pad_to_multiple, weights_hash
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
        fwd = tensor_to_image(model(x, coded_rate(rate), token_fn(x))["x_hat"])
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
    (stream,) = bs.streams
    assert len(data) == OVERHEAD + len(stream) == 17 + len(stream)
    assert data[4] == 3 and bs.model_hash == weights_hash(model)[:HASH_LEN]
    odd = encode_image(model, make_image(64, 64), 0.1, token_fn=token_fn)
    assert unpack(odd).rate == coded_rate(0.1) != 0.1  # the coded rate is the stored float16
    assert coded_rate(0.5) == 0.5 and coded_rate(2.96875) == 2.96875   # sweep rates stay exact


def _split_strings(model, img: np.ndarray, rate: float) -> tuple[bytes, bytes]:
    """z and y as two rANS strings through CompressAI's own coders: what the version-1
    and version-2 writer stored."""
    core, x = model.core, image_to_tensor(img)
    with torch.no_grad():
        xe = model.preedit(pad_to_multiple(x, model.stride), token_fn(x))
        g, _, hg, ihg = core._gains(rate)
        y = core.g_a(xe) * g
        z = core.h_a(y) * hg
        (z_str,) = core.entropy_bottleneck.compress(z)
        z_hat = core.entropy_bottleneck.decompress([z_str], z.shape[-2:])
        scales, means = core._y_prior(z_hat, ihg)
        (y_str,) = core.gaussian_conditional.compress(y, core.gaussian_conditional.build_indexes(scales), means=means)
    return z_str, y_str


def test_one_string_equals_the_two_string_layout_and_is_smaller(model, data):
    """The joint string carries the same symbols as CompressAI's z and y strings (same
    image decoded) and saves one flushed state and padding."""
    z, y = _split_strings(model, make_image(64, 64), 1.0)
    (stream,) = unpack(data).streams
    assert 4 <= len(z) + len(y) - len(stream) <= 12
    old = _v2_file(data, z, y)
    assert np.array_equal(decode_image(model, old), decode_image(model, data))


def _v2_file(data: bytes, z: bytes, y: bytes) -> bytes:
    bs = unpack(data)
    head = struct.pack("<4sBHHf4s", b"VLMC", 2, bs.height, bs.width, bs.rate, bs.model_hash)
    return _recrc(head + leb128(len(z)) + z + y)


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


def test_version_1_and_2_files_are_still_read(model, data):
    """A version-1 file (16 bytes of hash, a uint32 z length) and a version-2 one (4 bytes, a
    LEB128 length), z and y as two strings: what the coder wrote before."""
    bs = unpack(data)
    z, y = _split_strings(model, make_image(64, 64), 1.0)
    v1 = _recrc(struct.pack("<4sBHHf16sI", b"VLMC", 1, bs.height, bs.width, bs.rate, weights_hash(model), len(z))
                + z + y)
    v2 = _v2_file(data, z, y)
    assert len(v1) == len(v2) + 15
    assert unpack(v1).model_hash == weights_hash(model) and unpack(v2).streams == (z, y)
    assert np.array_equal(decode_image(model, v1), decode_image(model, data))
    other = _recrc(v1[:13] + b"\x01" * 16 + v1[29:-4])
    with pytest.raises(BitstreamError, match="written by codec 0101"):
        decode_image(model, other)
    for bad_len, fragment in ((len(z) + len(y) + 1, "exceeds"), (5, "malformed"), (0, "malformed")):
        mutant = _recrc(v2[:17] + leb128(bad_len) + z + y)
        with pytest.raises(BitstreamError, match=fragment):
            decode_image(model, mutant)


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


def _with_sizes(data: bytes, h1: bytes, w1: bytes) -> bytes:
    """``data`` (a 64 x 64 file: one-byte sizes) with its size fields replaced (CRC recomputed)."""
    return _recrc(data[:5] + h1 + w1 + data[7:-4])


def test_structural_errors_with_valid_crc(model, data):
    """Fields that are wrong although the CRC matches (a file written by a buggy writer)."""
    cases = [  # (mutated file, fragment of the one-line message)
        (_with_field(data, 0, "<4s", b"PNG\x00"), "bad magic"),
        (_with_field(data, 4, "<B", 4), "version 4"),
        (_with_sizes(data, leb128(MAX_DIM), b"\x3f"), "outside"),
        (_with_sizes(data, b"\x80\x00", b"\x3f"), "image height not in its shortest form"),
        (_with_sizes(data, b"\x3f", b"\xff" * 5 + b"\x01"), "image width longer than 5 bytes"),
        (_with_field(data, 7, "<e", float("nan")), "invalid rate"),
        (_with_field(data, 7, "<e", -1.0), "invalid rate"),
        (_with_field(data, 7, "<e", 2.5), "rate must be in [0, 2]"),
        (_with_field(data, 9, "<4s", b"\x01" * 4), "written by codec"),
        (_recrc(data[:13] + data[13:-4][:-1]), "malformed"),
        (_recrc(data[:13] + b"\x00" * 4), "truncated"),
    ]
    for bad, fragment in cases:
        with pytest.raises(BitstreamError) as err:
            decode_image(model, bad)
        msg = str(err.value)
        assert "\n" not in msg and fragment in msg, (fragment, msg)


def test_fuzz_mutated_files_raise_bitstream_error_quickly(model, data):
    rng = np.random.default_rng(1234)
    mutants: list[bytes] = [b"", b"VLMC", data[:13], data + b"\x00", b"\x00" * len(data),
                            rng.integers(0, 256, 200, dtype=np.uint8).tobytes()]
    for i in range(300):
        kind = i % 6
        buf = bytearray(data)
        if kind == 0:  # flip 1..4 random bytes
            for pos in rng.choice(len(buf), size=rng.integers(1, 5), replace=False):
                buf[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            buf = buf[:int(rng.integers(0, len(buf)))]
        elif kind == 2:  # change a size byte, keep the old CRC
            buf[int(rng.choice([5, 6]))] = int(rng.integers(0, 256))
        elif kind == 3:  # insert or delete a byte in the middle
            pos = int(rng.integers(0, len(buf)))
            buf = buf[:pos] + buf[pos + 1:] if rng.random() < 0.5 else buf[:pos] + b"\x5a" + buf[pos:]
        elif kind == 4:  # append garbage
            buf = buf + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        else:  # corrupt header dims / rate, keep the old CRC
            off = int(rng.choice([7, 8, 9]))
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
    good = Bitstream(height=4, width=4, rate=1.0, model_hash=b"\x00" * 4, streams=(b"\x00" * 8,))
    assert unpack(pack(good)) == good and len(pack(good)) == OVERHEAD + 8
    big = Bitstream(height=MAX_DIM, width=200, rate=0.5, model_hash=b"\x00" * 4, streams=(b"\x00" * 400,))
    assert unpack(pack(big)) == big and len(pack(big)) == OVERHEAD + 2 + 400   # two 2-byte sizes
    for bad in (dict(height=0), dict(model_hash=b"\x00" * 16), dict(rate=0.1), dict(rate=-1.0),
                dict(streams=(b"\x00" * 8, b"\x00" * 8))):
        with pytest.raises(ValueError):
            pack(dataclasses.replace(good, **bad))


def test_encoding_runs_on_one_thread_so_bytes_ignore_the_thread_count(model, data):
    """The file's symbols are decided on one thread; the caller's thread count is restored."""
    seen: list[int] = []

    def watched(x):
        seen.append(torch.get_num_threads())
        return token_fn(x)

    before = torch.get_num_threads()
    try:
        for threads in (2, 1, 3):
            torch.set_num_threads(threads)
            assert encode_image(model, make_image(64, 64), 1.0, token_fn=watched) == data
            assert torch.get_num_threads() == threads
            assert np.array_equal(decode_image(model, data), decode_image(model, data))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1]
