"""Structured fuzzing of the codec decoder, each case in its own forked process.

The model is built and the decoder compiled once, in the parent; every case then forks,
decodes one mutated file and exits with a code (0 decoded, 1 refused with a
``BitstreamError``, 2 any other exception). The parent counts crashes (a child killed by
a signal), hangs (a child still running after ``timeout_s``, then killed) and the peak
resident memory of the children. Mutations are structured so that most reach the entropy
decoder: headers with valid CRCs in every format version, claimed sizes from 1 pixel to
the format's maximum, rates, stream lengths, and strings truncated, extended, spliced,
bit-flipped, random or made of escape symbols.

Run the full count from the command line::

    python tests/fuzz_decoder.py --cases 10000
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec_helpers import lively, make_image  # noqa: E402

from vlmcompress.codec.bitstream import MAX_DIM, BitstreamError, leb128, unpack  # noqa: E402
from vlmcompress.codec.coder import decode_image, encode_image  # noqa: E402
from vlmcompress.codec.model import LVLMCodec, build_codec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class FuzzReport:
    cases: int = 0
    outcomes: Counter = dataclasses.field(default_factory=Counter)   # decoded / refused / error / crash / hang
    strategies: Counter = dataclasses.field(default_factory=Counter)
    failures: list = dataclasses.field(default_factory=list)         # (strategy, outcome, file hex prefix)
    peak_rss_mib: float = 0.0          # largest resident set of any child (pages it touched)
    peak_extra_mib: float = 0.0        # most any one decode added to its child's resident set
    base_rss_mib: float = 0.0          # the parent's resident set when fuzzing started
    seconds: float = 0.0

    def summary(self) -> str:
        o = self.outcomes
        return (f"{self.cases} cases in {self.seconds:.0f} s: {o['decoded']} decoded, {o['refused']} refused, "
                f"{o['error']} other errors, {o['crash']} crashes, {o['hang']} hangs; peak child RSS "
                f"{self.peak_rss_mib:.0f} MiB, at most {self.peak_extra_mib:.1f} MiB added by one decode "
                f"(parent {self.base_rss_mib:.0f} MiB)")


def default_model() -> LVLMCodec:
    """The params.yaml codec architecture, untrained but coding non-zero symbols."""
    from vlmcompress.config import load_params
    p = load_params(REPO / "params.yaml").codec.ours.model
    p = dataclasses.replace(p, preedit=dataclasses.replace(p.preedit, use_tokens=False))
    torch.manual_seed(0)
    return lively(build_codec(p))


def recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def v3(h: int, w: int, rate_bits: bytes, model_hash: bytes, stream: bytes, *, hb: bytes | None = None,
       wb: bytes | None = None) -> bytes:
    """A version-3 file with a valid CRC; ``hb``/``wb`` override the size varints."""
    return recrc(b"VLMC\x03" + (hb if hb is not None else leb128(h - 1)) + (wb if wb is not None else leb128(w - 1))
                 + rate_bits + model_hash + stream)


def split_strings(model: LVLMCodec, img: np.ndarray, rate: float) -> tuple[bytes, bytes]:
    """CompressAI's own two strings (z, y) for ``img``, the layout of versions 1 and 2."""
    core = model.core
    x = model._prepare(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0, None)
    g, _, hg, ihg = core._gains(rate)
    with torch.no_grad():
        y = core.g_a(x) * g
        z = core.h_a(y) * hg
        z_strings = core.entropy_bottleneck.compress(z)
        z_hat = core.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        scales, means = core._y_prior(z_hat, ihg)
        idx = core.gaussian_conditional.build_indexes(scales)
        y_strings = core.gaussian_conditional.compress(y, idx, means)
    return z_strings[0], y_strings[0]


def build_corpus(model: LVLMCodec) -> list[bytes]:
    """Valid files: version 3 at three sizes and rates, and versions 1 and 2 of one image."""
    files = [encode_image(model, make_image(h, w), r) for (h, w), r in
             (((64, 64), 1.0), ((45, 70), 0.25), ((130, 20), 2.0), ((1, 1), 3.0))]
    bs = unpack(files[0])
    z, y = split_strings(model, make_image(64, 64), 1.0)
    from vlmcompress.codec.model import weights_hash
    files.append(recrc(struct.pack("<4sBHHf16sI", b"VLMC", 1, 64, 64, 1.0, weights_hash(model), len(z)) + z + y))
    files.append(recrc(struct.pack("<4sBHHf4s", b"VLMC", 2, 64, 64, 1.0, bs.model_hash) + leb128(len(z)) + z + y))
    return files


def _claim(rng: np.random.Generator) -> int:
    """A claimed side length: log-uniform over 1..MAX_DIM, with the edges often."""
    if rng.random() < 0.2:
        return int(rng.choice([1, 2, 63, 64, 65, 511, 512, 513, MAX_DIM - 1, MAX_DIM]))
    return int(np.exp(rng.uniform(0, np.log(MAX_DIM))))


def _words(rng: np.random.Generator, n: int) -> bytes:
    kind = rng.integers(0, 4)
    if kind == 0:
        return bytes(4 * n)
    if kind == 1:
        return b"\xff" * (4 * n)          # cum_freq 0xffff: every symbol an escape
    if kind == 2:
        return bytes(rng.integers(0, 256, 4 * n, dtype=np.uint8))
    return (b"\xff\xff\xff\xff\x00\x00\x00\x80" * n)[:4 * n]


def mutate(rng: np.random.Generator, corpus: list[bytes]) -> tuple[str, bytes]:
    """One structured mutation of a corpus file -> (strategy name, file bytes)."""
    base = corpus[int(rng.integers(0, 4))]             # a version-3 file
    bs = unpack(base)
    rate_bits = struct.pack("<e", bs.rate)
    (stream,) = bs.streams
    s = int(rng.integers(0, 12))
    if s == 0:
        return "size", v3(_claim(rng), _claim(rng), rate_bits, bs.model_hash, stream)
    if s == 1:
        return "rate", v3(bs.height, bs.width, bytes(rng.integers(0, 256, 2, dtype=np.uint8)), bs.model_hash, stream)
    if s == 2:
        cut = int(rng.integers(0, len(stream) + 1))
        if rng.random() < 0.5:
            cut -= cut % 4
        return "truncate", v3(bs.height, bs.width, rate_bits, bs.model_hash, stream[:cut])
    if s == 3:
        return "extend", v3(bs.height, bs.width, rate_bits, bs.model_hash,
                            stream + _words(rng, int(rng.integers(1, 64))))
    if s == 4:
        buf = bytearray(stream)
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(0, len(buf)))] ^= 1 << int(rng.integers(0, 8))
        return "flip", v3(bs.height, bs.width, rate_bits, bs.model_hash, bytes(buf))
    if s == 5:
        n = int(np.exp(rng.uniform(np.log(2), np.log(1 << 14))))
        return "random", v3(bs.height, bs.width, rate_bits, bs.model_hash, _words(rng, n))
    if s == 6:
        other = unpack(corpus[int(rng.integers(0, 4))]).streams[0]
        return "splice", v3(bs.height, bs.width, rate_bits, bs.model_hash,
                            other if rng.random() < 0.5 else stream[: len(stream) // 2] + other[len(other) // 2:])
    if s == 7:   # a large claim carried by a long string, so the bits bound alone does not refuse it
        n = int(rng.integers(1 << 10, 1 << 16))
        return "big_claim", v3(_claim(rng), _claim(rng), rate_bits, bs.model_hash, _words(rng, n))
    if s == 8:   # varints: non-shortest, over-long, with the continuation bit dangling
        forms = [b"\x80\x00", b"\xff" * 5 + b"\x01", b"\xff\xff\x03", b"\x80", leb128(MAX_DIM), leb128(1 << 20)]
        return "varint", v3(0, 0, rate_bits, bs.model_hash, stream, hb=forms[int(rng.integers(0, len(forms)))],
                            wb=leb128(bs.width - 1))
    if s == 9:   # version 2: a LEB128 z length that may not fit the payload
        v2 = corpus[5]
        head, rest = v2[:17], unpack(v2)
        z, y = rest.streams
        zlen = int(rng.choice([0, 4, 8, len(z) - 4, len(z) + 4, len(z) + len(y), int(rng.integers(0, 1 << 28))]))
        return "v2_zlen", recrc(head + leb128(max(zlen, 0)) + z + y)
    if s == 10:  # version 1: random sizes, rate and z length under a valid CRC
        v1 = unpack(corpus[4])
        z, y = v1.streams
        hdr = struct.pack("<4sBHHf16sI", b"VLMC", 1, _claim(rng) % 65536, _claim(rng) % 65536,
                          float(rng.choice([0.0, 1.0, 2.5, -1.0, np.inf, np.nan])), v1.model_hash,
                          int(rng.integers(0, len(z) + len(y) + 8)))
        return "v1", recrc(hdr + z + y)
    buf = bytearray(base)       # plain damage, CRC left stale
    buf[int(rng.integers(0, len(buf)))] ^= int(rng.integers(1, 256))
    return "stale_crc", bytes(buf)


def _rss_mib_self() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_case(decode: Callable[[bytes], object], data: bytes, timeout_s: float) -> tuple[str, float, float]:
    """Decode ``data`` in a forked child -> (outcome, the child's peak RSS in MiB, how much the
    decode itself added to the child's resident set at its peak, in MiB; -1 when unknown)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: never returns into the caller's code
        os.close(read_end)
        code = 2
        start = _status_kib("VmRSS")
        try:
            decode(data)
            code = 0
        except BitstreamError:
            code = 1
        except BaseException:
            code = 2
        os.write(write_end, struct.pack("<q", _status_kib("VmHWM") - start))
        os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                return "hang", usage.ru_maxrss / 1024, -1.0
            time.sleep(0.0005)
        report = os.read(read_end, 8)
    finally:
        os.close(read_end)
    rss = usage.ru_maxrss / 1024
    growth = struct.unpack("<q", report)[0] / 1024 if len(report) == 8 else -1.0
    if os.WIFSIGNALED(status):
        return "crash", rss, growth
    return {0: "decoded", 1: "refused"}.get(os.WEXITSTATUS(status), "error"), rss, growth


def fuzz(model: LVLMCodec, cases: int, *, seed: int = 0, timeout_s: float = 20.0,
         max_pixels: int | None = None) -> FuzzReport:
    """Run ``cases`` mutations of the corpus through ``decode_image`` in forked children."""
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    corpus = build_corpus(model)

    def decode(data: bytes) -> object:
        return decode_image(model, data, **kw)

    for f in corpus:                      # warm up (and compile the rANS decoder) before forking
        decode(f)
    rng = np.random.default_rng(seed)
    report = FuzzReport(base_rss_mib=_rss_mib_self())
    t0 = time.perf_counter()
    for _ in range(cases):
        strategy, data = mutate(rng, corpus)
        outcome, rss, growth = run_case(decode, data, timeout_s)
        report.cases += 1
        report.outcomes[outcome] += 1
        report.strategies[strategy] += 1
        report.peak_rss_mib = max(report.peak_rss_mib, rss)
        report.peak_extra_mib = max(report.peak_extra_mib, growth)
        if outcome in ("crash", "hang", "error") and len(report.failures) < 20:
            report.failures.append((strategy, outcome, data[:32].hex()))
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = fuzz(default_model(), args.cases, seed=args.seed, timeout_s=args.timeout)
    print(report.summary())
    print("strategies:", dict(sorted(report.strategies.items())))
    for f in report.failures:
        print("failure:", *f)
    return 0 if report.outcomes["crash"] + report.outcomes["hang"] + report.outcomes["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
