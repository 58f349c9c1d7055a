"""Encode / decode time of a 512x512 image: our codec vs VVC (VVenC), same machine, same run.

    python benchmarks/bench_codec_speed.py [--model outputs/codec/models/ours] [--rate R]
        [--repeats 5] [--threads 1] [--preset faster] [--qp 32] [--out outputs/bench/codec_speed.json]

The image is the codec stage's timing image (a mosaic of the first test images, or the first
one's 512 px centre crop). Each time is the median of ``--repeats`` runs after one warm-up run;
our encode time includes the LVLM vision tower when the codec's pre-editing net fuses its
tokens. Both codecs get the same thread count. Without ``--model`` a freshly initialised codec
of the params' architecture is timed, so the benchmark runs before the codec stage has trained
anything: the networks cost the same, but an untrained model codes almost no symbols, so its
entropy-coding time is a lower bound; pass the trained codec for the real figures.
"""
from __future__ import annotations

import argparse
import warnings

# compressai 1.2.8 calls torch.jit.script at import; the deprecation notice is noise here.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

from vlmcompress.codec.config import check_stage_params
from vlmcompress.codec.model import build_codec
from vlmcompress.codec.stage import load_test_images, lvlm_token_fn, time_codecs, timing_image
from vlmcompress.codec.train import load_codec
from vlmcompress.config import load_params
from vlmcompress.data.stage import load_all
from vlmcompress.io import write_json
from vlmcompress.lvlm.stage import load_stage_lvlm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    ap.add_argument("--model", default=None, help="trained codec folder (default: untrained, same architecture)")
    ap.add_argument("--rate", type=float, default=None, help="rate of our codec (default: the middle of its range)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch and VVenC threads (0: torch's default)")
    ap.add_argument("--preset", default=None, help="VVenC preset")
    ap.add_argument("--qp", type=int, default=None, help="VVC QP")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()

    P = load_params(args.params)
    check_stage_params(P.codec)
    E = P.codec.eval
    if args.model:
        model = load_codec(args.model)
    else:
        model = build_codec(P.codec.model)
        model.update(force=True)
        model.eval()
    token_fn = lvlm_token_fn(load_stage_lvlm(P)) if model.needs_tokens else None
    img = timing_image(load_test_images(load_all()["test"], 16))
    rate = args.rate if args.rate is not None else (model.levels - 1) / 2
    t = time_codecs(model, token_fn, img, rate,
                    vvc_preset=args.preset or E.vvc_preset, vvc_qp=args.qp if args.qp is not None else E.vvc_qp,
                    repeats=args.repeats or E.timing_repeats,
                    threads=args.threads if args.threads is not None else E.timing_threads)

    label_vvc = f"VVC {args.preset or E.vvc_preset} QP {args.qp if args.qp is not None else E.vvc_qp}"
    label_ours = f"ours rate {rate:g}" + ("" if args.model else " (untrained)")
    print(f"512x512, {t['timing_threads']} thread(s), median of {args.repeats or E.timing_repeats} after a warm-up")
    print(f"{'codec':28s} {'encode ms':>10s} {'decode ms':>10s} {'bpp':>8s}")
    print(f"{label_ours:28s} {t['encode_ms_512']:10.1f} {t['decode_ms_512']:10.1f} {t['timing_bpp_512']:8.3f}")
    print(f"{label_vvc:28s} {t['vvc_encode_ms_512']:10.1f} {t['vvc_decode_ms_512']:10.1f} "
          f"{t['vvc_timing_bpp_512']:8.3f}")
    enc_ratio = t["encode_ms_512"] / t["vvc_encode_ms_512"]
    dec_ratio = t["decode_ms_512"] / t["vvc_decode_ms_512"]
    print(f"{'ours / VVC':28s} {enc_ratio:9.2f}x {dec_ratio:9.2f}x")
    if args.out:
        write_json(args.out, {**t, "rate": rate, "model": args.model, "encode_ratio": enc_ratio,
                              "decode_ratio": dec_ratio})


if __name__ == "__main__":
    main()
