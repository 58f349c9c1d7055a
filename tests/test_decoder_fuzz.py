"""The decoder against hostile files: structured fuzzing in forked processes, bombs, escapes."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from fuzz_decoder import build_corpus, default_model, fuzz, recrc, v3

from vlmcompress.codec.bitstream import BitstreamError, unpack
from vlmcompress.codec.coder import decode_image
from vlmcompress.codec.rans import RansError, RansReader, coder_tables


@pytest.fixture(scope="module")
def model():
    return default_model()


def _assert_clean(report, bound_mib: float) -> None:
    o = report.outcomes
    assert o["crash"] == 0 and o["hang"] == 0 and o["error"] == 0, (report.summary(), report.failures)
    assert o["refused"] > 0.9 * report.cases, report.summary()
    assert 0 < report.peak_extra_mib <= bound_mib, report.summary()


def _legit_bound_mib(model) -> float:
    """What decoding a genuine 512 x 512 file adds to a process (the fuzz runs with
    max_pixels = 512 x 512, so no hostile file may cost more), with 32 MiB of slack."""
    from fuzz_decoder import run_case

    from vlmcompress.codec.coder import encode_image
    from codec_helpers import make_image

    data = encode_image(model, make_image(512, 512), 1.0)
    outcome, _, growth = run_case(lambda d: decode_image(model, d, max_pixels=512 * 512), data, 60.0)
    assert outcome == "decoded" and growth > 0
    return growth + 32.0


def test_fuzz_2000_structured_mutations_no_crash_hang_or_stray_error(model):
    bound = _legit_bound_mib(model)
    report = fuzz(model, 2000, seed=1, timeout_s=20.0, max_pixels=512 * 512)
    print(report.summary(), f"(bound {bound:.0f} MiB)")
    _assert_clean(report, bound)
    assert len(report.strategies) == 12     # every strategy ran


@pytest.mark.slow
def test_fuzz_10000_structured_mutations(model):
    bound = _legit_bound_mib(model)
    report = fuzz(model, 10_000, seed=2, timeout_s=20.0, max_pixels=512 * 512)
    print(report.summary(), f"(bound {bound:.0f} MiB)")
    _assert_clean(report, bound)


def test_a_few_bytes_claiming_a_huge_image_are_refused_before_allocating(model):
    data = build_corpus(model)[0]
    bs = unpack(data)
    rate = struct.pack("<e", bs.rate)
    bomb = v3(8192, 8192, rate, bs.model_hash, bytes(8))
    assert len(bomb) == 27
    with pytest.raises(BitstreamError, match="more than .* pixels"):
        decode_image(model, bomb)
    assert model.min_stream_bits((2000, 2000)) > 8 * 64
    with pytest.raises(BitstreamError, match="coded bits cannot hold a 2000x2000 image"):
        decode_image(model, v3(2000, 2000, rate, bs.model_hash, bytes(64)))


def test_escape_symbols_everywhere_are_bounded(model):
    """0xff words make every symbol an escape; the value chunks must end or be refused."""
    tables = coder_tables(model.core.gaussian_conditional)
    reader = RansReader(b"\xff" * 64)
    with pytest.raises(RansError, match="escape value longer than 32 bits|ends early"):
        reader.decode(np.zeros(10_000, np.int32), tables)


def test_a_string_must_be_used_up_exactly(model):
    data = build_corpus(model)[0]
    bs = unpack(data)
    extended = v3(bs.height, bs.width, struct.pack("<e", bs.rate), bs.model_hash, bs.streams[0] + bytes(8))
    with pytest.raises(BitstreamError, match="unused words|does not end where"):
        decode_image(model, extended)


def test_rans_reader_decodes_what_compressai_encodes_including_escapes():
    from compressai.ans import BufferedRansEncoder
    from compressai.entropy_models import GaussianConditional

    gc = GaussianConditional(None)
    gc.update_scale_table(torch.exp(torch.linspace(np.log(0.11), np.log(64), 16)))
    gc.update()
    tables = coder_tables(gc)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, tables.count, 5000).astype(np.int32)
    sym = np.round(rng.normal(0, 1, 5000) * np.exp(idx / 3)).astype(np.int32)
    sym[::97] = rng.integers(-10**6, 10**6, sym[::97].shape)       # far outside the tables: escapes
    enc = BufferedRansEncoder()
    enc.encode_with_indexes(sym.tolist(), idx.tolist(), gc.quantized_cdf.tolist(),
                            gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist())
    data = enc.flush()
    reader = RansReader(data)
    out = np.concatenate([reader.decode(idx[:1234], tables), reader.decode(idx[1234:], tables)])
    reader.finish()
    assert np.array_equal(out, sym)


def test_crc_valid_file_with_foreign_string_is_refused_not_decoded(model):
    data = build_corpus(model)[0]
    bs = unpack(data)
    rng = np.random.default_rng(5)
    for _ in range(50):
        junk = bytes(rng.integers(0, 256, len(bs.streams[0]), dtype=np.uint8))
        with pytest.raises(BitstreamError):
            decode_image(model, v3(bs.height, bs.width, struct.pack("<e", bs.rate), bs.model_hash, junk))
    assert recrc(data[:-4]) == data
