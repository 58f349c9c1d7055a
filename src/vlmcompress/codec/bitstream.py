"""The codec's file format, and its defensive parser.

Layout of a version-3 file (little-endian), what :func:`pack` writes::

    size  field
    4     magic b"VLMC"
    1     format version (3)
    1..2  image height - 1, unsigned LEB128 (height 1 .. 16384)
    1..2  image width - 1, unsigned LEB128
    2     rate, float16 (the decoder uses exactly this value)
    4     model hash: first 4 bytes of SHA-256 over the writer's weights
    ...   one rANS string: the hyper latent z's symbols, then y's (the rest up to the CRC)
    4     CRC-32 of every byte before it

17 bytes of overhead for images up to 128 x 128, 19 up to 16384. bpp is always computed
on the whole file, and on a 128 px scene a byte is 0.0005 bpp, 0.6% of our codec's lowest
rate: so nothing is stored that the decoder does not need. Version 1 (37 bytes: a 16-byte
hash, uint16 sizes, a float32 rate, a uint32 z length, and z and y as two rANS strings,
each with its own flushed 64-bit state and word padding) and version 2 (the same with a
4-byte hash and a LEB128 z length, 22 bytes) are still read. Four bytes of hash tell a
file of other weights from this model's (a random match is a 1-in-4-billion event), which
is all the decoder asks of them; a float16 rate keeps every rate a sweep uses (multiples
of 1/32 are exact) and the z latent's shape follows from the image size.

:func:`unpack` never trusts a field before checking it: the magic, then the version,
then the length and the CRC (so a truncated or corrupted file is rejected before any
length is used), then dimensions, rate and string lengths, each bounded by the file
size. Every failure is a one-line :class:`BitstreamError`. The CRC guards against
accidental damage; a file crafted to carry a valid CRC still reaches CompressAI's rANS
decoder, which does no bounds checking of its own.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass


MAGIC = b"VLMC"
VERSION = 3                  # written by pack; VERSIONS are read
VERSIONS = (1, 2, 3)
MAX_DIM = 16384
HASH_LEN = 4                 # bytes of the weights' hash a version-2 or -3 file carries
_HEADERS = {1: struct.Struct("<4sBHHf16sI"),   # ..., 16-byte hash, uint32 z length
            2: struct.Struct("<4sBHHf4s")}     # ..., 4-byte hash; the z length follows as LEB128
_PREFIX = struct.Struct("<4sB")                # magic, version
_TAIL3 = struct.Struct("<e4s")                 # version 3 after the sizes: float16 rate, hash
_CRC = struct.Struct("<I")
OVERHEAD = _PREFIX.size + 2 + _TAIL3.size + _CRC.size   # version 3, images up to 128 x 128
_MAX_VARINT = 5                          # 35 bits: more than any file of MAX_DIM^2 pixels holds
# rANS (CompressAI "ans") strings are whole 32-bit words and hold at least the 64-bit state.
_MIN_STRING = 8
_WORD = 4


class BitstreamError(ValueError):
    """A file that is not a valid bitstream for this reader/model (one-line message)."""


@dataclass(frozen=True)
class Bitstream:
    height: int
    width: int
    rate: float              # float16-representable (float32 in versions 1 and 2)
    model_hash: bytes        # HASH_LEN bytes (16 in a version-1 file)
    streams: tuple[bytes, ...]  # version 3: (the one rANS string,); versions 1, 2: (z, y)


def coded_rate(value: float) -> float:
    """The float16 value a version-3 file carries (encoders must code with exactly this rate)."""
    return struct.unpack("<e", struct.pack("<e", float(value)))[0]


def leb128(n: int) -> bytes:
    """Unsigned LEB128: 7 bits a byte, low first, high bit set on all but the last."""
    if n < 0:
        raise ValueError(f"leb128: expected n >= 0, got {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_leb128(buf: bytes, pos: int, source: str = "bitstream", what: str = "z length") -> tuple[int, int]:
    """``(value, position after it)`` of the LEB128 number at ``buf[pos:]``; at most
    ``_MAX_VARINT`` bytes, the last one inside ``buf``, and in its shortest form."""
    value = 0
    for i in range(_MAX_VARINT):
        if pos + i >= len(buf):
            raise BitstreamError(f"{source}: truncated {what}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                raise BitstreamError(f"{source}: {what} not in its shortest form")
            return value, pos + i + 1
    raise BitstreamError(f"{source}: {what} longer than {_MAX_VARINT} bytes")


def pack(bs: Bitstream) -> bytes:
    """Serialise a one-string :class:`Bitstream` as a version-:data:`VERSION` file (validates the fields)."""
    if not (1 <= bs.height <= MAX_DIM and 1 <= bs.width <= MAX_DIM):
        raise ValueError(f"image size {bs.height}x{bs.width} outside 1..{MAX_DIM}")
    if len(bs.model_hash) != HASH_LEN:
        raise ValueError(f"model hash must be {HASH_LEN} bytes, got {len(bs.model_hash)}")
    if not math.isfinite(bs.rate) or bs.rate < 0 or coded_rate(bs.rate) != bs.rate:
        raise ValueError(f"rate must be a finite float16 value >= 0 (see coded_rate), got {bs.rate}")
    if len(bs.streams) != 1:
        raise ValueError(f"version {VERSION} holds one rANS string, got {len(bs.streams)}")
    body = (_PREFIX.pack(MAGIC, VERSION) + leb128(bs.height - 1) + leb128(bs.width - 1)
            + _TAIL3.pack(bs.rate, bytes(bs.model_hash)) + bytes(bs.streams[0]))
    return body + _CRC.pack(zlib.crc32(body))


def _string_ok(s: bytes) -> bool:
    return len(s) >= _MIN_STRING and len(s) % _WORD == 0


def _check_body(data: bytes, need: int, source: str) -> bytes:
    """The file without its CRC, once its length and CRC are right."""
    if len(data) < need:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes, need at least {need})")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise BitstreamError(f"{source}: corrupted or truncated (CRC mismatch)")
    return body


def _check_size_rate(h: int, w: int, rate: float, source: str) -> None:
    if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM):
        raise BitstreamError(f"{source}: image size {h}x{w} outside 1..{MAX_DIM}")
    if not math.isfinite(rate) or rate < 0:
        raise BitstreamError(f"{source}: invalid rate {rate}")


def _unpack_v3(data: bytes, source: str) -> Bitstream:
    body = _check_body(data, _PREFIX.size + 2 + _TAIL3.size + _MIN_STRING + _CRC.size, source)
    h1, pos = read_leb128(body, _PREFIX.size, source, "image height")
    w1, pos = read_leb128(body, pos, source, "image width")
    if pos + _TAIL3.size > len(body):
        raise BitstreamError(f"{source}: truncated header")
    rate, model_hash = _TAIL3.unpack_from(body, pos)
    _check_size_rate(h1 + 1, w1 + 1, rate, source)
    stream = body[pos + _TAIL3.size:]
    if not _string_ok(stream):
        raise BitstreamError(f"{source}: malformed entropy-coded string ({len(stream)} B)")
    return Bitstream(height=h1 + 1, width=w1 + 1, rate=rate, model_hash=model_hash, streams=(stream,))


def _unpack_split(data: bytes, version: int, source: str) -> Bitstream:
    """Versions 1 and 2: fixed header, then the z length, z and y strings."""
    header = _HEADERS[version]
    body = _check_body(data, header.size + (version >= 2) + _CRC.size + 2 * _MIN_STRING, source)
    fields = header.unpack(body[:header.size])
    h, w, rate, model_hash = fields[2:6]
    _check_size_rate(h, w, rate, source)
    if version == 1:
        z_len, start = fields[6], header.size
    else:
        z_len, start = read_leb128(body, header.size, source)
    payload = body[start:]
    if z_len > len(payload):
        raise BitstreamError(f"{source}: z length {z_len} exceeds the {len(payload)} payload bytes")
    z, y = payload[:z_len], payload[z_len:]
    if not (_string_ok(z) and _string_ok(y)):
        raise BitstreamError(f"{source}: malformed entropy-coded strings (z {len(z)} B, y {len(y)} B)")
    return Bitstream(height=h, width=w, rate=rate, model_hash=model_hash, streams=(z, y))


def unpack(data: bytes, source: str = "bitstream") -> Bitstream:
    """Parse and validate a file's bytes (any of :data:`VERSIONS`); ``source`` names it in errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BitstreamError(f"{source}: not a vlmcompress codec file (bad magic)")
    if len(data) < _PREFIX.size:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes)")
    version = data[4]
    if version not in VERSIONS:
        raise BitstreamError(f"{source}: format version {version} is not supported "
                             f"(this reader: {', '.join(map(str, VERSIONS))})")
    return _unpack_v3(data, source) if version == 3 else _unpack_split(data, version, source)
