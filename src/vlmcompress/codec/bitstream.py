"""The codec's file format, and its defensive parser.

Layout of a version-2 file (little-endian), what :func:`pack` writes::

    offset  size  field
    0       4     magic b"VLMC"
    4       1     format version (2)
    5       2     image height  (1 .. 16384)
    7       2     image width   (1 .. 16384)
    9       4     rate, float32 (the decoder uses exactly this value)
    13      4     model hash: first 4 bytes of SHA-256 over the writer's weights
    17      1..5  length of the z string, unsigned LEB128
    ...     ...   z string (entropy-coded hyper latent), then the y string (the rest up to the CRC)
    end-4   4     CRC-32 of every byte before it

22 bytes of overhead for any z string under 128 bytes; bpp is always computed on the whole
file. On a 128 px scene a byte is 0.0005 bpp, and version 1 (a 16-byte hash and a 4-byte z
length, 37 bytes, still read) spent 0.018 bpp on its header alone, a fifth of our codec's
lowest rate: 4 bytes of hash still tell a file of other weights from this model's (a random
match is a 1-in-4-billion event), which is all the decoder asks of them. The z latent's
shape follows from the image size, so it is not stored.

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
VERSION = 2                  # written by pack; VERSIONS are read
VERSIONS = (1, 2)
MAX_DIM = 16384
HASH_LEN = 4                 # bytes of the weights' hash a version-2 file carries
_HEADERS = {1: struct.Struct("<4sBHHf16sI"),   # ..., 16-byte hash, uint32 z length
            2: struct.Struct("<4sBHHf4s")}     # ..., 4-byte hash; the z length follows as LEB128
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADERS[VERSION].size
OVERHEAD = HEADER_SIZE + 1 + _CRC.size   # with a one-byte z length (z strings under 128 bytes)
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
    rate: float          # float32-representable
    model_hash: bytes    # HASH_LEN bytes (16 in a version-1 file)
    z: bytes
    y: bytes


def as_float32(value: float) -> float:
    """The float32 value the file will carry (encoders must code with exactly this rate)."""
    return struct.unpack("<f", struct.pack("<f", float(value)))[0]


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


def read_leb128(buf: bytes, pos: int, source: str = "bitstream") -> tuple[int, int]:
    """``(value, position after it)`` of the LEB128 number at ``buf[pos:]``; at most
    ``_MAX_VARINT`` bytes, the last one inside ``buf``, and in its shortest form."""
    value = 0
    for i in range(_MAX_VARINT):
        if pos + i >= len(buf):
            raise BitstreamError(f"{source}: truncated z length")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                raise BitstreamError(f"{source}: z length not in its shortest form")
            return value, pos + i + 1
    raise BitstreamError(f"{source}: z length longer than {_MAX_VARINT} bytes")


def pack(bs: Bitstream) -> bytes:
    """Serialise a :class:`Bitstream` as a version-:data:`VERSION` file (validates the fields)."""
    if not (1 <= bs.height <= MAX_DIM and 1 <= bs.width <= MAX_DIM):
        raise ValueError(f"image size {bs.height}x{bs.width} outside 1..{MAX_DIM}")
    if len(bs.model_hash) != HASH_LEN:
        raise ValueError(f"model hash must be {HASH_LEN} bytes, got {len(bs.model_hash)}")
    if not math.isfinite(bs.rate) or bs.rate < 0:
        raise ValueError(f"rate must be finite and >= 0, got {bs.rate}")
    body = (_HEADERS[VERSION].pack(MAGIC, VERSION, bs.height, bs.width, bs.rate, bytes(bs.model_hash))
            + leb128(len(bs.z)) + bytes(bs.z) + bytes(bs.y))
    return body + _CRC.pack(zlib.crc32(body))


def _string_ok(s: bytes) -> bool:
    return len(s) >= _MIN_STRING and len(s) % _WORD == 0


def unpack(data: bytes, source: str = "bitstream") -> Bitstream:
    """Parse and validate a file's bytes (any of :data:`VERSIONS`); ``source`` names it in errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BitstreamError(f"{source}: not a vlmcompress codec file (bad magic)")
    if len(data) < len(MAGIC) + 1:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes)")
    version = data[4]
    if version not in VERSIONS:
        raise BitstreamError(f"{source}: format version {version} is not supported "
                             f"(this reader: {', '.join(map(str, VERSIONS))})")
    header = _HEADERS[version]
    need = header.size + (version >= 2) + _CRC.size + 2 * _MIN_STRING
    if len(data) < need:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes, need at least {need})")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise BitstreamError(f"{source}: corrupted or truncated (CRC mismatch)")
    fields = header.unpack(body[:header.size])
    h, w, rate, model_hash = fields[2:6]
    if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM):
        raise BitstreamError(f"{source}: image size {h}x{w} outside 1..{MAX_DIM}")
    if not math.isfinite(rate) or rate < 0:
        raise BitstreamError(f"{source}: invalid rate {rate}")
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
    return Bitstream(height=h, width=w, rate=rate, model_hash=model_hash, z=z, y=y)
