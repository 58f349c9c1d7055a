"""The codec's file format, and its defensive parser.

Layout (little-endian)::

    offset  size  field
    0       4     magic b"VLMC"
    4       1     format version (1)
    5       2     image height  (1 .. 16384)
    7       2     image width   (1 .. 16384)
    9       4     rate, float32 (the decoder uses exactly this value)
    13      16    model hash: first 16 bytes of SHA-256 over the writer's weights
    29      4     length of the z string (entropy-coded hyper latent)
    33      ...   z string, then the y string (the rest up to the CRC)
    end-4   4     CRC-32 of every byte before it

37 bytes of overhead; bpp is always computed on the whole file. The z latent's shape
follows from the image size, so it is not stored.

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
VERSION = 1
MAX_DIM = 16384
HASH_LEN = 16
_HEADER = struct.Struct("<4sBHHf16sI")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
OVERHEAD = _HEADER.size + _CRC.size
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
    model_hash: bytes    # 16 bytes
    z: bytes
    y: bytes


def as_float32(value: float) -> float:
    """The float32 value the file will carry (encoders must code with exactly this rate)."""
    return struct.unpack("<f", struct.pack("<f", float(value)))[0]


def pack(bs: Bitstream) -> bytes:
    """Serialise a :class:`Bitstream` (validates the fields it writes)."""
    if not (1 <= bs.height <= MAX_DIM and 1 <= bs.width <= MAX_DIM):
        raise ValueError(f"image size {bs.height}x{bs.width} outside 1..{MAX_DIM}")
    if len(bs.model_hash) != HASH_LEN:
        raise ValueError(f"model hash must be {HASH_LEN} bytes, got {len(bs.model_hash)}")
    if not math.isfinite(bs.rate) or bs.rate < 0:
        raise ValueError(f"rate must be finite and >= 0, got {bs.rate}")
    body = _HEADER.pack(MAGIC, VERSION, bs.height, bs.width, bs.rate, bytes(bs.model_hash),
                        len(bs.z)) + bytes(bs.z) + bytes(bs.y)
    return body + _CRC.pack(zlib.crc32(body))


def _string_ok(s: bytes) -> bool:
    return len(s) >= _MIN_STRING and len(s) % _WORD == 0


def unpack(data: bytes, source: str = "bitstream") -> Bitstream:
    """Parse and validate a file's bytes; ``source`` names it in error messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BitstreamError(f"{source}: not a vlmcompress codec file (bad magic)")
    if len(data) < len(MAGIC) + 1:
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes)")
    if data[4] != VERSION:
        raise BitstreamError(f"{source}: format version {data[4]} is not supported (this reader: {VERSION})")
    if len(data) < OVERHEAD + 2 * _MIN_STRING:
        need = OVERHEAD + 2 * _MIN_STRING
        raise BitstreamError(f"{source}: truncated ({len(data)} bytes, need at least {need})")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise BitstreamError(f"{source}: corrupted or truncated (CRC mismatch)")
    _, _, h, w, rate, model_hash, z_len = _HEADER.unpack(body[:HEADER_SIZE])
    if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM):
        raise BitstreamError(f"{source}: image size {h}x{w} outside 1..{MAX_DIM}")
    if not math.isfinite(rate) or rate < 0:
        raise BitstreamError(f"{source}: invalid rate {rate}")
    payload = body[HEADER_SIZE:]
    if z_len > len(payload):
        raise BitstreamError(f"{source}: z length {z_len} exceeds the {len(payload)} payload bytes")
    z, y = payload[:z_len], payload[z_len:]
    if not (_string_ok(z) and _string_ok(y)):
        raise BitstreamError(f"{source}: malformed entropy-coded strings (z {len(z)} B, y {len(y)} B)")
    return Bitstream(height=h, width=w, rate=rate, model_hash=model_hash, z=z, y=y)
