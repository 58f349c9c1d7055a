"""Encode / decode time of a 512x512 image: our codec vs VVC (VVenC), same machine, same run.

    python benchmarks/bench_codec_speed.py [--model outputs/codec/models/ours/model] [--rate R]
        [--repeats 5] [--threads 1] [--preset faster] [--presets faster,medium] [--qp 32]
        [--y-scale 2] [--set codec.model.synthesis_tail=32 ...] [--profile]
        [--out outputs/bench/codec_speed.json]

The image is the codec stage's timing image (a mosaic of the first test images, or the first
one's 512 px centre crop). Each time is the median of ``--repeats`` runs after one warm-up run
(so numba's and oneDNN's first-call compilation is excluded); our encode time includes the LVLM
vision tower when the codec's pre-editing net fuses its tokens. Both codecs get the same thread
count. Ours and VVC at ``--preset`` are timed by the codec stage's own ``time_codecs`` (the
numbers ``outputs/codec/metrics.json`` records); VVC at every other ``--presets`` entry the
anchor supports is timed after it, in the same run.

Without ``--model`` a freshly initialised codec of the params' architecture is timed, so the
benchmark runs before the codec stage has trained anything: the networks cost the same, but an
untrained analysis transform outputs ``|y| ~ 0.04``, which quantises to zeros; ``--y-scale``
multiplies ``y`` (and divides it back before the synthesis transform) so that the file codes
symbols at a trained model's rate (the default 2.6 gives 0.055 bpp on the timing image, a
trained codec 0.057). When the stage's LVLM is not on disk, a
randomly initialised one of the params' architecture stands in for the tower (same cost).
``--set KEY=VALUE`` (repeatable; a dotted params path, a YAML value) times another
architecture at random init without editing params.yaml, e.g. a narrower synthesis tail:
``--set codec.model.synthesis_tail=32 --set codec.model.synthesis_tail_kernel=3``.

Besides wall-clock medians, the CPU time per decode (user + system, this process and its
children, mean over the repeats) of ours and of VVC at ``--preset`` is printed: on a shared
machine it moves less than wall time.

``--profile`` adds where the time goes: the decoder's steps (file parsing, model checks,
entropy decoding, hyper-synthesis, synthesis, conversion), the synthesis transform layer by
layer (multiply-accumulates, reference modules vs the inference kernels), and the encoder's
steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

# compressai 1.2.8 calls torch.jit.script at import; the deprecation notice is noise here.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

import numpy as np
import torch
import torch.nn as nn
import yaml

from vlmcompress.api import load_all, lvlm_from_params, lvlm_token_fn
from vlmcompress.codec.anchors import make_anchor
from vlmcompress.codec.bitstream import unpack
from vlmcompress.codec.coder import decode_image, encode_image, image_to_tensor, tensor_to_image
from vlmcompress.codec.config import check_stage_params
from vlmcompress.codec.model import LVLMCodec, build_codec, inference_ops, one_thread, run_ops
from vlmcompress.codec.rans import RansReader
from vlmcompress.codec.timing import load_test_images, time_codecs, timing_image
from vlmcompress.codec.train import load_codec
from vlmcompress.config import Params, check_params, from_dict, load_params, to_dict
from vlmcompress.io import write_json


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time (ms) of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Mean CPU time (ms, user + system of this process and its finished children) of
    ``repeats`` calls after one warm-up call."""
    def used() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    fn()
    t0 = used()
    for _ in range(repeats):
        fn()
    return (used() - t0) * 1e3 / repeats


def with_overrides(P: Params, sets: list[str]) -> Params:
    """``P`` with each ``"a.b.c=VALUE"`` of ``sets`` applied (an existing key; VALUE read as YAML),
    checked like a params file."""
    data = to_dict(P)
    for item in sets:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not sep or not isinstance(node, dict) or parts[-1] not in node:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY an existing params path")
        node[parts[-1]] = yaml.safe_load(text)
    out = from_dict(type(P), data, "", strict=True)
    check_params(out)
    return out


def scale_latent(model: LVLMCodec, scale: float) -> None:
    """Multiply ``y`` by ``scale`` in the analysis and divide it back in the synthesis (the
    function the codec computes is unchanged, only how finely ``y`` is quantised)."""
    core = model.core
    with torch.no_grad():
        core.g_a[-1].weight.mul_(scale)
        core.g_a[-1].bias.mul_(scale)
        core.g_s[0].weight.div_(scale)
    model.update(force=True)


def random_stage_lvlm(P: Params) -> Any:
    """A randomly initialised LVLM of ``P.lvlm.arch`` (what the codec stage's tower costs)."""
    from vlmcompress.lvlm.build import ModelSpec, build_clip, build_llava, save_lvlm
    from vlmcompress.lvlm.load import Prompts, load_lvlm
    from vlmcompress.lvlm.tokenizer import build_tokenizers
    from vlmcompress.lvlm.pool import scene_vocab

    torch.manual_seed(0)
    spec = ModelSpec(**dataclasses.asdict(P.lvlm.arch))
    prompts = Prompts(**dataclasses.asdict(P.lvlm.prompts))
    vocab = scene_vocab(P.data.scenes, prompts)
    tok, clip_tok = build_tokenizers(vocab)
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
    clip = build_clip(spec, len(vocab), ids["<pad>"], ids["<s>"], ids["</s>"])
    llava = build_llava(spec, clip, len(vocab), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"])
    with tempfile.TemporaryDirectory(prefix="vlmc-bench-") as tmp:
        root = save_lvlm(f"{tmp}/lvlm", llava, tok, clip, clip_tok)
        return load_lvlm(str(root / "llava"), str(root / "clip"), prompts=prompts,
                         attn_layer=P.lvlm.attn_layer, dtype=P.lvlm.dtype, device=P.lvlm.device,
                         image_aspect=P.lvlm.image_aspect)


def stage_or_random_lvlm(P: Params) -> tuple[Any, str]:
    from vlmcompress.lvlm.load import ModelNotAvailableError
    try:
        return lvlm_from_params(P), "the stage's LVLM"
    except (ModelNotAvailableError, OSError):
        return random_stage_lvlm(P), "a random LVLM of lvlm.arch (the stage's is not on disk)"


# --- profiles ---------------------------------------------------------------------------------

def layer_macs(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-accumulates of one layer mapping ``x`` to ``y`` (conv taps that hit the input only)."""
    if isinstance(layer, nn.ConvTranspose2d):   # every input pixel meets k*k taps
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return x.numel() // x.shape[0] * layer.out_channels * k * x.shape[0]
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return y.numel() * layer.in_channels * k // layer.groups
    if hasattr(layer, "gamma"):                 # GDN: a 1x1 convolution of x^2
        return x.numel() * x.shape[1]
    return 0


def synthesis_profile(model: LVLMCodec, y_hat: torch.Tensor, repeats: int) -> list[dict]:
    """Per layer of ``g_s``: shapes, MACs and ms through the module and through the kernel."""
    seq = model.core.g_s
    ops = inference_ops(seq)
    rows = []
    x = y_hat
    with torch.inference_mode():
        for layer, op in zip(seq, ops):
            y = layer(x)
            xc = x.contiguous(memory_format=torch.channels_last)
            rows.append({"layer": type(layer).__name__, "in": tuple(x.shape[1:]), "out": tuple(y.shape[1:]),
                         "gmac": layer_macs(layer, x, y) / 1e9,
                         "module_ms": median_ms(lambda layer=layer, x=x: layer(x), repeats),
                         "kernel_ms": median_ms(lambda op=op, xc=xc: op(xc), repeats)})
            x = y
    return rows


def decode_profile(model: LVLMCodec, data: bytes, repeats: int) -> dict[str, float]:
    """Median ms of each step of :func:`~vlmcompress.codec.coder.decode_image` (same calls)."""
    core = model.core
    bs = unpack(data)
    shape = model.latent_shape((bs.height, bs.width))
    _, ig, _, ihg = core._gains(bs.rate)
    steps: dict[str, Callable[[], Any]] = {}
    state: dict[str, Any] = {}

    def entropy_z():
        state["reader"] = reader = RansReader(bs.streams[0])
        state["z"] = core._decode_z(reader, shape)

    def hyper():
        with one_thread():
            state["prior"] = core._y_prior(state["z"], ihg)

    def entropy_y():
        reader = RansReader(bs.streams[0])
        core._decode_z(reader, shape)
        scales, means = state["prior"]
        state["y"] = core._decode_y(reader, scales, means)
        reader.finish()

    def synth():
        state["x"] = core._transform("g_s", state["y"] * ig, True).clamp_(0, 1)

    steps["parse file (unpack, CRC)"] = lambda: unpack(data)
    steps["model checks (hash, min bits)"] = lambda: (model.weights_digest(), model.min_stream_bits((bs.height, bs.width)))
    steps["entropy decode z (numba rANS)"] = entropy_z
    steps["hyper-synthesis h_s"] = hyper
    steps["entropy decode z+y (indexes, rANS)"] = entropy_y
    steps["synthesis g_s"] = synth
    steps["to uint8 HWC"] = lambda: tensor_to_image(state["x"][..., :bs.height, :bs.width])
    with torch.no_grad():
        out = {name: median_ms(fn, repeats) for name, fn in steps.items()}
        out["rANS symbols"] = float(state["y"].numel() + state["z"].numel())
    return out


def encode_profile(model: LVLMCodec, token_fn: Any, img: np.ndarray, rate: float, repeats: int
                   ) -> dict[str, float]:
    """Median ms of the encoder's steps (one thread, like :func:`encode_image`)."""
    core = model.core
    x = image_to_tensor(img)
    out: dict[str, float] = {}
    state: dict[str, Any] = {}
    g = core._gains(rate)[0]
    with torch.no_grad(), one_thread():
        if model.needs_tokens:
            out["LVLM tower tokens"] = median_ms(lambda: state.update(tok=token_fn(x)), repeats)
        out["pre-edit net"] = median_ms(lambda: state.update(xe=model._prepare(x, state.get("tok"))), repeats)
        out["analysis g_a"] = median_ms(
            lambda: state.update(y=core._transform("g_a", state["xe"], True).contiguous() * g), repeats)
        out["hyper-analysis h_a"] = median_ms(lambda: state.update(z=core.h_a(state["y"])), repeats)
        out["whole core.compress (incl. g_a, h_a, h_s, rANS encode)"] = median_ms(
            lambda: core.compress(state["xe"], rate), repeats)
    return out


# --- main -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    ap.add_argument("--model", default=None, help="trained codec folder (default: untrained, same architecture)")
    ap.add_argument("--rate", type=float, default=None, help="rate of our codec (default: the middle of its range)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch and VVenC threads (0: torch's default)")
    ap.add_argument("--preset", default=None, help="VVenC preset timed with ours (default: codec.eval.vvc_preset)")
    ap.add_argument("--presets", default="faster,medium", help="VVenC presets to time as well (comma-separated)")
    ap.add_argument("--qp", type=int, default=None, help="VVC QP")
    ap.add_argument("--y-scale", type=float, default=2.6,
                    help="untrained codec only: scale of y so that it codes symbols (1: as initialised)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params value (dotted path, YAML value), e.g. codec.model.synthesis_tail=32")
    ap.add_argument("--profile", action="store_true", help="also print where our codec's time goes")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()

    P = load_params(args.params)
    if args.set:
        P = with_overrides(P, args.set)
    check_stage_params(P.codec)
    E = P.codec.eval
    if args.model:
        model, what = load_codec(args.model), f"trained codec {args.model}"
    else:
        torch.manual_seed(0)
        model = build_codec(P.codec.model)
        model.update(force=True)
        model.eval()
        m = P.codec.model
        what = (f"untrained codec (params' architecture: N={m.N}, M={m.M}, synthesis tail "
                f"{m.synthesis_tail or m.N} ch {m.synthesis_tail_kernel}x{m.synthesis_tail_kernel})")
        if args.y_scale != 1.0:
            scale_latent(model, args.y_scale)
            what += f", y scaled by {args.y_scale:g}"
    token_fn, tower = None, "none"
    if model.needs_tokens:
        lvlm, tower = stage_or_random_lvlm(P)
        token_fn = lvlm_token_fn(lvlm)
    img = timing_image(load_test_images(load_all()["test"], 16))
    rate = args.rate if args.rate is not None else (model.levels - 1) / 2
    preset = args.preset or E.vvc_preset
    qp = args.qp if args.qp is not None else E.vvc_qp
    repeats = args.repeats or E.timing_repeats
    threads = args.threads if args.threads is not None else E.timing_threads
    t = time_codecs(model, token_fn, img, rate, vvc_preset=preset, vvc_qp=qp, repeats=repeats, threads=threads)

    n = t["timing_threads"]
    torch.set_num_threads(n)
    data_ours = encode_image(model, img, rate, token_fn=token_fn if model.needs_tokens else None)
    vvc_ref = make_anchor("vvc", preset=preset, threads=n)
    data_vvc = vvc_ref.encode(img, qp)
    cpu = {"decode_cpu_ms_512": cpu_ms(lambda: decode_image(model, data_ours), repeats),
           "vvc_decode_cpu_ms_512": cpu_ms(lambda: vvc_ref.decode(data_vvc), repeats)}
    vvc_rows = {preset: (t["vvc_encode_ms_512"], t["vvc_decode_ms_512"], t["vvc_timing_bpp_512"])}
    old = torch.get_num_threads()
    for p in [s.strip() for s in args.presets.split(",") if s.strip()]:
        if p in vvc_rows:
            continue
        try:
            vvc = make_anchor("vvc", preset=p, threads=n)
            data = vvc.encode(img, qp)
            enc = median_ms(lambda vvc=vvc: vvc.encode(img, qp), repeats)
            dec = median_ms(lambda vvc=vvc, data=data: vvc.decode(data), repeats)
        except (ValueError, TypeError) as exc:     # AnchorError is a ValueError
            print(f"VVC preset {p!r}: not timed ({exc})")
            continue
        vvc_rows[p] = (enc, dec, len(data) * 8 / (img.shape[0] * img.shape[1]))

    print(f"512x512, {n} thread(s), median of {repeats} after a warm-up; {what}; tower: {tower}")
    print(f"{'codec':32s} {'encode ms':>10s} {'decode ms':>10s} {'bpp':>8s}")
    label_ours = f"ours rate {rate:g}" + ("" if args.model else " (untrained)")
    print(f"{label_ours:32s} {t['encode_ms_512']:10.1f} {t['decode_ms_512']:10.1f} {t['timing_bpp_512']:8.3f}")
    for p, (enc, dec, bpp) in vvc_rows.items():
        print(f"{f'VVC {p} QP {qp}':32s} {enc:10.1f} {dec:10.1f} {bpp:8.3f}")
    enc_ratio = t["encode_ms_512"] / t["vvc_encode_ms_512"]
    dec_ratio = t["decode_ms_512"] / t["vvc_decode_ms_512"]
    print(f"{f'ours / VVC {preset}':32s} {enc_ratio:9.2f}x {dec_ratio:9.2f}x")
    cpu_ratio = cpu["decode_cpu_ms_512"] / cpu["vvc_decode_cpu_ms_512"]
    print(f"CPU ms per decode (mean of {repeats}): ours {cpu['decode_cpu_ms_512']:.1f}, "
          f"VVC {preset} {cpu['vvc_decode_cpu_ms_512']:.1f} ({cpu_ratio:.2f}x)")
    result: dict[str, Any] = {**t, **cpu, "decode_cpu_ratio": cpu_ratio, "rate": rate,
                              "synthesis_tail": P.codec.model.synthesis_tail,
                              "synthesis_tail_kernel": P.codec.model.synthesis_tail_kernel, "model": args.model or what, "tower": tower,
                              "encode_ratio": enc_ratio, "decode_ratio": dec_ratio,
                              "vvc_presets": {p: {"encode_ms": e, "decode_ms": d, "bpp": b}
                                              for p, (e, d, b) in vvc_rows.items()}}

    if args.profile:
        torch.set_num_threads(n if n > 0 else old)
        data = encode_image(model, img, rate, token_fn=token_fn)
        dec = decode_profile(model, data, repeats)
        print("\ndecode steps (ms, median)")
        for k, v in dec.items():
            print(f"  {k:40s} {v:8.1f}" if k != "rANS symbols" else f"  {k:40s} {v:8.0f}")
        with torch.no_grad():
            bs, core = unpack(data), model.core
            _, ig, _, ihg = core._gains(bs.rate)
            reader = RansReader(bs.streams[0])
            shape = model.latent_shape((bs.height, bs.width))
            scales, means = core._y_prior(core._decode_z(reader, shape), ihg)
            y_hat = core._decode_y(reader, scales, means) * ig
        layers = synthesis_profile(model, y_hat, repeats)
        print("\nsynthesis g_s per layer")
        print(f"  {'layer':16s} {'in':>16s} {'out':>16s} {'GMAC':>6s} {'module ms':>10s} {'kernel ms':>10s}")
        for r in layers:
            print(f"  {r['layer']:16s} {r['in']!s:>16s} {r['out']!s:>16s} {r['gmac']:6.3f} "
                  f"{r['module_ms']:10.1f} {r['kernel_ms']:10.1f}")
        print(f"  {'total':16s} {'':16s} {'':16s} {sum(r['gmac'] for r in layers):6.3f} "
              f"{sum(r['module_ms'] for r in layers):10.1f} {sum(r['kernel_ms'] for r in layers):10.1f}")
        with torch.inference_mode():
            z = core._decode_z(RansReader(bs.streams[0]), shape) * ihg if ihg is not None else \
                core._decode_z(RansReader(bs.streams[0]), shape)
            hs_ops = inference_ops(core.h_s)
            print(f"  hyper-synthesis h_s: module {median_ms(lambda: core.h_s(z), repeats):.1f} ms, same "
                  f"kernels {median_ms(lambda: run_ops(hs_ops, z), repeats):.1f} ms (not used: the entropy "
                  f"parameters must stay bit-identical to the encoder's)")
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        gemm = median_ms(lambda: a @ b, repeats)
        print(f"  one-thread SGEMM 1024^3 on this machine now: {1024 ** 3 / gemm / 1e6:.1f} GMAC/s")
        enc = encode_profile(model, token_fn, img, rate, repeats)
        print("\nencode steps (ms, median)")
        for k, v in enc.items():
            print(f"  {k:56s} {v:8.1f}")
        torch.set_num_threads(old)
        result["profile"] = {"decode": dec, "synthesis": layers, "encode": enc,
                             "sgemm_gmac_per_s": 1024 ** 3 / gemm / 1e6}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
