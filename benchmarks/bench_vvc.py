"""Time the VVC anchor and measure the rate range its QP sweep covers.

    python benchmarks/bench_vvc.py [--out outputs/bench/vvc.json] [--repeats 3]

* encode / decode wall time (median of ``--repeats``) of one 512x512 procedural scene
  (the embedded data set's generator, scaled up 4x) with VVenC's ``faster`` preset;
* bpp and PSNR at QP 22..47 (step 5) on a 128x128 scene of the embedded data set, the
  same generator and texture the codec is evaluated on;
* the same two numbers for the other anchors at their 10% / 90% quality settings, for scale.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

from vlmcompress.codec.anchors import ANCHORS, make_anchor
from vlmcompress.config import load_params
from vlmcompress.data.scenes import render_scene, sample_scene, scene_rng
from vlmcompress.io import write_json


def scene(size: int, index: int) -> np.ndarray:
    """One procedural scene of ``size`` px, objects scaled with the image."""
    p = load_params().data.scenes
    k = size / p.image_size
    p = dataclasses.replace(
        p, image_size=size,
        small_size=tuple(int(round(v * k)) for v in p.small_size),
        large_size=tuple(int(round(v * k)) for v in p.large_size))
    rng = scene_rng(p.seed, 99, index)
    return render_scene(sample_scene(rng, p), rng, p)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the numbers as JSON here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qp", type=int, default=32, help="QP of the timing run")
    args = ap.parse_args()

    report: dict[str, object] = {}
    big = scene(512, 0)
    vvc = make_anchor("vvc", preset="faster")
    enc_s, data = timed(lambda: vvc.encode(big, args.qp), args.repeats)
    dec_s, rec = timed(lambda: vvc.decode(data), args.repeats)
    report["vvc_512"] = {"qp": args.qp, "encode_s": enc_s, "decode_s": dec_s,
                         "bpp": 8 * len(data) / big[..., 0].size, "psnr": psnr(big, rec)}
    print(f"VVC faster 512x512 QP {args.qp}: encode {enc_s:.3f} s, decode {dec_s:.3f} s "
          f"(median of {args.repeats}), {report['vvc_512']['bpp']:.3f} bpp, "
          f"{report['vvc_512']['psnr']:.2f} dB")

    small = scene(128, 1)
    sweep = []
    for qp in range(22, 48, 5):
        d = vvc.encode(small, qp)
        sweep.append({"qp": qp, "bpp": 8 * len(d) / small[..., 0].size,
                      "psnr": psnr(small, vvc.decode(d))})
        print(f"  128x128 scene QP {qp:2d}: {sweep[-1]['bpp']:.3f} bpp  {sweep[-1]['psnr']:.2f} dB")
    report["vvc_128_sweep"] = sweep

    others = {}
    for name in ANCHORS:
        if name == "vvc" or ANCHORS[name].unavailable():
            continue
        codec = make_anchor(name)
        order = codec.scale.rate_order()
        row = {}
        for label, q in (("low", order[len(order) // 10]), ("high", order[9 * len(order) // 10])):
            t_enc, d = timed(lambda: codec.encode(big, q), 1)
            row[label] = {"q": q, "bpp": 8 * len(d) / big[..., 0].size, "encode_s": t_enc}
        others[name] = row
        print(f"  {name:5s} 512x512: q {row['low']['q']}->{row['low']['bpp']:.3f} bpp, "
              f"q {row['high']['q']}->{row['high']['bpp']:.3f} bpp, "
              f"encode {row['high']['encode_s']:.3f} s")
    report["others_512"] = others
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
