"""VVenC presets of the VVC anchor: encode cost and rate at equal PSNR, ``medium`` vs ``faster``.

    python benchmarks/bench_vvc_presets.py [--presets faster medium] [--qps 22 27 32 37 42 47]
                                           [--out outputs/bench/vvc_presets.json]

Every image is 512x512: procedural scenes of the embedded data set (its generator at 512 px)
and, when matplotlib ships it, the centre crop of its sample photograph ``grace_hopper.jpg``.
Each is coded by the ``vvc`` anchor (all-intra, 10-bit 4:2:0, constant QP, QPA off, one
thread) at every QP and preset; per preset it prints the encode time (wall and CPU of the
ffmpeg child, summed over QPs and images, and per encode), the decode time, then the
BD-rate (PSNR, pchip) of every preset against the first one, per image and averaged.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def photo_512() -> np.ndarray | None:
    """Centre 512x512 crop of matplotlib's sample photograph, if it is installed."""
    try:
        import matplotlib
        from PIL import Image
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        return None
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    top, left = (h - 512) // 2, (w - 512) // 2
    return np.ascontiguousarray(img[top:top + 512, left:left + 512])


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    from bench_vvc import psnr, scene

    from vlmcompress.codec.anchors import make_anchor
    from vlmcompress.eval.bdrate import bd_rate_result
    from vlmcompress.io import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["faster", "medium"])
    ap.add_argument("--qps", nargs="+", type=int, default=[22, 27, 32, 37, 42, 47])
    ap.add_argument("--scenes", type=int, default=2, help="procedural 512x512 scenes")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()

    images = {f"scene{i}": scene(512, i) for i in range(args.scenes)}
    photo = photo_512()
    if photo is not None:
        images["grace_hopper"] = photo
    report: dict[str, dict] = {}
    for preset in args.presets:
        codec = make_anchor("vvc", preset=preset, qpa=False, threads=1)
        enc_wall, enc_cpu, dec_wall, curves = [], [], [], {}
        for name, img in images.items():
            rate, quality = [], []
            for qp in args.qps:
                t0, c0 = time.perf_counter(), child_cpu()
                data = codec.encode(img, qp)
                enc_wall.append(time.perf_counter() - t0)
                enc_cpu.append(child_cpu() - c0)
                t0 = time.perf_counter()
                rec = codec.decode(data)
                dec_wall.append(time.perf_counter() - t0)
                rate.append(8 * len(data) / (img.shape[0] * img.shape[1]))
                quality.append(psnr(img, rec))
            curves[name] = {"bpp": rate, "psnr": quality}
        report[preset] = {"encode_wall_s_median": statistics.median(enc_wall),
                          "encode_cpu_s_median": statistics.median(enc_cpu),
                          "encode_cpu_s_total": sum(enc_cpu),
                          "decode_wall_s_median": statistics.median(dec_wall), "curves": curves}
        print(f"{preset:7s}: encode median {report[preset]['encode_wall_s_median']:.2f} s wall, "
              f"{report[preset]['encode_cpu_s_median']:.2f} s CPU per 512x512 image "
              f"(total CPU {sum(enc_cpu):.1f} s over {len(enc_cpu)} encodes); "
              f"decode median {report[preset]['decode_wall_s_median']:.3f} s")
        for name, c in curves.items():
            pts = ", ".join(f"QP{q} {b:.3f}/{p:.2f}" for q, b, p in zip(args.qps, c["bpp"], c["psnr"]))
            print(f"    {name}: bpp/dB {pts}")
    ref = args.presets[0]
    for preset in args.presets[1:]:
        per_image = {}
        for name in images:
            a, t = report[ref]["curves"][name], report[preset]["curves"][name]
            per_image[name] = bd_rate_result(a["bpp"], a["psnr"], t["bpp"], t["psnr"]).value
        mean = float(np.mean(list(per_image.values())))
        report[preset]["bd_rate_psnr_vs_" + ref] = {**per_image, "mean": mean}
        speed = report[preset]["encode_cpu_s_total"] / report[ref]["encode_cpu_s_total"]
        print(f"{preset} vs {ref}: BD-rate (PSNR) "
              + ", ".join(f"{k} {v:+.2f}%" for k, v in per_image.items())
              + f"; mean {mean:+.2f}%; encode CPU x{speed:.2f}")
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
