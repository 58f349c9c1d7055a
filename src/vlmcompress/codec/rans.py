"""A bounds-checked decoder for CompressAI's rANS strings.

CompressAI encodes with ``BufferedRansEncoder`` / ``RansEncoder`` (64-bit rANS state,
32-bit words, 16-bit CDF precision, escape symbols coded in 4-bit bypass chunks). Its C++
decoder trusts the string: a crafted file makes it read past the end of its buffer, so
files from outside are decoded here instead. :class:`RansReader` decodes the same
strings, symbol for symbol, and never reads a word it does not have:

* every renormalisation checks that a word is left, else :class:`RansError`;
* an escape may hold at most 8 bypass chunks (a 32-bit value, all the encoder writes);
* :meth:`RansReader.finish` checks that the string is used up and that the state is back
  to the encoder's initial value, so a damaged or forged string is refused instead of
  being decoded into arbitrary symbols.

The coding tables are validated once per model (:func:`coder_tables`), the symbol loop
runs compiled (numba), so decoding is also faster than the reference decoder's Python
list round trips.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch.nn as nn

PRECISION = 16            # CDF precision of CompressAI's entropy models
RANS_L = 1 << 31          # lower bound of the normalised state (``RANS64_L``)
MAX_BYPASS_CHUNKS = 8     # 8 x 4 bits: a 32-bit escape value

_ERRORS = {1: "entropy-coded string ends early",
           2: "escape value longer than 32 bits",
           3: "symbol index outside the coding tables"}


class RansError(ValueError):
    """An entropy-coded string that this model's tables cannot have produced."""


@dataclass(frozen=True)
class CoderTables:
    """One entropy model's rANS tables.

    ``cdfs``: ``int32 [T, L]`` quantised CDFs (row ``t`` valid up to ``sizes[t]``),
    ``sizes``: ``int32 [T]``, ``offsets``: ``int32 [T]`` (symbol = coded index + offset).
    """

    cdfs: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray

    @property
    def count(self) -> int:
        return int(self.sizes.shape[0])

    def min_bits(self) -> np.ndarray:
        """``float64 [T]``: a lower bound on the bits a string spends per symbol coded with
        each table, net of rANS's rounding (at most ``2**-15`` relative per step while the
        state is normalised, i.e. < 4.5e-5 bits)."""
        freqs = np.diff(self.cdfs.astype(np.int64), axis=1)
        valid = np.arange(freqs.shape[1])[None, :] < (self.sizes[:, None] - 1)
        top = np.where(valid, freqs, 0).max(axis=1)
        return np.maximum(0.0, -np.log2(top / float(1 << PRECISION)) - 4.5e-5)


def coder_tables(entropy_model: nn.Module) -> CoderTables:
    """The validated tables of an updated CompressAI entropy model (``update(force=True)``)."""
    cdfs = entropy_model.quantized_cdf.detach().cpu().numpy().astype(np.int32)
    sizes = entropy_model.cdf_length.detach().cpu().reshape(-1).numpy().astype(np.int32)
    offsets = entropy_model.offset.detach().cpu().reshape(-1).numpy().astype(np.int32)
    if cdfs.ndim != 2 or cdfs.shape[0] == 0 or sizes.shape[0] != cdfs.shape[0] or offsets.shape[0] != cdfs.shape[0]:
        raise ValueError("the entropy coder tables are empty or inconsistent: call model.update(force=True)")
    if sizes.min() < 2 or sizes.max() > cdfs.shape[1]:
        raise ValueError("entropy coder table lengths out of range")
    for t, n in enumerate(sizes):
        row = cdfs[t, :n]
        if row[0] != 0 or row[-1] != 1 << PRECISION or np.any(np.diff(row) <= 0):
            raise ValueError(f"entropy coder table {t} is not a strictly increasing CDF ending at 2^{PRECISION}")
    return CoderTables(np.ascontiguousarray(cdfs), sizes, offsets)


@numba.njit(cache=True, nogil=True, inline="always")
def _renorm(words, pos, state):  # pragma: no cover - compiled
    """Refill a state that fell below ``RANS_L`` with the next word: ``(ok, pos, state)``;
    not ok when the string has no word left."""
    if state < np.uint64(RANS_L):
        if pos >= words.shape[0]:
            return False, pos, state
        state = (state << np.uint64(32)) | np.uint64(words[pos])
        pos += 1
    return True, pos, state


@numba.njit(cache=True, nogil=True)
def _decode(words, pos, state, indexes, cdfs, sizes, offsets, out):  # pragma: no cover - compiled
    """Decode ``len(indexes)`` symbols into ``out``; returns ``(status, pos, state)``."""
    n_tables = sizes.shape[0]
    mask = np.uint64(0xFFFF)
    shift = np.uint64(PRECISION)
    four = np.uint64(4)
    nibble = np.uint64(15)
    for i in range(indexes.shape[0]):
        t = indexes[i]
        if t < 0 or t >= n_tables:
            return 3, pos, state
        size = sizes[t]
        cum = np.int64(state & mask)
        lo = 0
        hi = size - 1                      # cdfs[t, size - 1] = 2^16 > cum
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if cdfs[t, mid] <= cum:
                lo = mid
            else:
                hi = mid
        start = np.uint64(cdfs[t, lo])
        freq = np.uint64(cdfs[t, lo + 1] - cdfs[t, lo])
        state = freq * (state >> shift) + (state & mask) - start
        ok, pos, state = _renorm(words, pos, state)
        if not ok:
            return 1, pos, state
        value = np.int64(lo)
        if lo == size - 2:                 # escape: the value follows in 4-bit chunks
            chunks = 0
            val = np.int64(15)
            while val == 15:               # the chunk count, 15 meaning "more follows"
                val = np.int64(state & nibble)
                ok, pos, state = _renorm(words, pos, state >> four)
                if not ok:
                    return 1, pos, state
                chunks += val
                if chunks > MAX_BYPASS_CHUNKS:
                    return 2, pos, state
            raw = np.int64(0)
            for j in range(chunks):
                val = np.int64(state & nibble)
                ok, pos, state = _renorm(words, pos, state >> four)
                if not ok:
                    return 1, pos, state
                raw |= val << (4 * j)
            if raw & 1:
                value = -(raw >> 1) - 1
            else:
                value = (raw >> 1) + size - 2
        out[i] = value + offsets[t]
    return 0, pos, state


class RansReader:
    """Sequential decoding of one rANS string: ``decode`` any number of times, then ``finish``."""

    def __init__(self, data: bytes):
        if len(data) < 8 or len(data) % 4:
            raise RansError(f"malformed entropy-coded string ({len(data)} B)")
        self._words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        self._state = np.uint64(int(self._words[0]) | (int(self._words[1]) << 32))
        self._pos = 2

    def decode(self, indexes: np.ndarray, tables: CoderTables) -> np.ndarray:
        """Symbols ``int32 [N]`` coded with ``tables`` row ``indexes[i]`` (``int [N]``)."""
        idx = np.ascontiguousarray(indexes, dtype=np.int32).reshape(-1)
        out = np.empty(idx.shape[0], dtype=np.int32)
        status, pos, state = _decode(self._words, self._pos, self._state, idx,
                                     tables.cdfs, tables.sizes, tables.offsets, out)
        if status:
            raise RansError(_ERRORS[int(status)])
        self._pos, self._state = int(pos), np.uint64(state)
        return out

    def finish(self) -> None:
        """Refuse a string with words left over, or whose state did not return to the start."""
        if self._pos != self._words.shape[0]:
            raise RansError(f"{self._words.shape[0] - self._pos} unused words after the last symbol")
        if int(self._state) != RANS_L:
            raise RansError("entropy-coded string does not end where the encoder started")
