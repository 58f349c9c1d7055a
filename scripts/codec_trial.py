"""Train a codec of a params file (default `ours`) into a work dir and score it on VQA, outside the pipeline.

    python scripts/codec_trial.py params.yaml /tmp/codec_trial [--load] [--images 64] [--rates 0 1 2 3]
                                  [--variant pixel_baseline] [--init DIR] [--uncoded]

For comparing codec settings without touching ``outputs/codec``: trains ``--variant`` (a codec
the params derive: ``ours``, ``pixel_baseline``, ``ours-<ablation>``; resumable, against the
stage's LVLM, with its projector and CLS attention for the loss options that need them) into
the work dir, or with ``--load`` scores a trained model folder as it is (e.g.
``outputs/codec/models/ours``). Then, for each rate, the forward reconstruction of the first
``--images`` test scenes (bpp estimated from the likelihoods, not a file) goes through the
LVLM: VQA accuracy on every question about them, overall and per type, beside the bpp, its
hyper-latent (z) part and the mean PSNR of the reconstructions. ``--edited`` also scores the
pre-edited images before coding. Writes nothing else.
Results: ``docs/experiments/2026-12-03-codec-losses-warm-start.md`` and
``docs/experiments/2026-12-04-codec-narrow-tail-quality.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params")
    ap.add_argument("work", help="work dir to train into (or, with --load, a trained model folder)")
    ap.add_argument("--load", action="store_true", help="score the model folder WORK without training")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", help="a trained codec folder the training starts from (e.g. the pixel baseline)")
    ap.add_argument("--uncoded", action="store_true", help="also score the original images (the ceiling)")
    ap.add_argument("--edited", action="store_true",
                    help="also score the pre-edited images, not coded (what the pre-editing net alone costs)")
    ap.add_argument("--variant", default="ours",
                    help="which codec of the params to train: ours (default), pixel_baseline, ours-<ablation>")
    a = ap.parse_args(argv)
    if a.images < 1:
        ap.error("--images must be >= 1")
    import numpy as np
    import torch

    from vlmcompress.codec.losses import bpp_from_likelihoods
    from vlmcompress.codec.model import check_rate
    from vlmcompress.codec.data import RecordImages
    from vlmcompress.codec.variants import model_variants
    from vlmcompress.codec.train import (load_codec, read_codec_record, resolve_model_dir, train_codec,
                                         training_state)
    from vlmcompress.config import ConfigError, load_params
    from vlmcompress.eval.tasks import file_images, run_vqa
    from vlmcompress.eval.quality import psnr as image_psnr
    from vlmcompress.api import load_all, lvlm_attention_fn, lvlm_from_params, lvlm_token_fn

    torch.set_num_threads(a.threads)
    try:
        P = load_params(a.params)
        variants = model_variants(P.codec)
        if a.variant not in variants:
            raise ValueError(f"--variant {a.variant!r}: these params train {', '.join(variants)}")
        cp = variants[a.variant]
        for r in a.rates:
            check_rate(r, cp.model.levels)
        if a.edited and not a.load and not cp.model.preedit.enabled:
            raise ValueError(f"--edited: codec {a.variant!r} has no pre-editing net")
        if not a.load:   # fail before the LVLM loads, not after training starts
            if training_state(a.work, cp) == "stale":
                raise ValueError(f"{a.work}: holds a codec of other params; use another work dir or delete it")
            if a.init:
                read_codec_record(resolve_model_dir(a.init))
        splits = load_all()
        lvlm = lvlm_from_params(P)
        model = load_codec(a.work).eval() if a.load else None
        if a.edited and model is not None and model.preedit is None:
            raise ValueError(f"--edited: {a.work} has no pre-editing net")
    except (ConfigError, OSError, ValueError) as exc:
        print(f"codec_trial: {exc}", file=sys.stderr)
        return 1
    token_fn = lvlm_token_fn(lvlm)
    if model is None:
        t0 = time.perf_counter()
        res = train_codec(cp, RecordImages(splits["train"], cp.train.patch_size), token_fn, a.work,
                          token_map=lvlm.projector, attention_fn=lvlm_attention_fn(lvlm, token_fn),
                          init_from=a.init)
        print(f"trained {res.steps_this_run} steps in {time.perf_counter() - t0:.1f} s", flush=True)
        model = res.model.eval()
    records = splits["test"][: a.images]
    items = [(r, q) for r in records for q in r.questions]

    def report(what: str, res) -> None:
        types = " ".join(f"{t} {v:.1f}" for t, v in res.by_type.items())
        print(f"{what}  VQA {res.acc:.2f} ({res.n} questions)  {types}", flush=True)

    @torch.no_grad()
    def forward(x: torch.Tensor, rate: float) -> dict:
        """The codec's forward pass on ``x [1, 3, H, W]``, with the LVLM tokens its pre-edit fuses."""
        return model(x, rate, token_fn(x)) if model.needs_tokens else model(x, rate)

    if a.uncoded:
        report("uncoded", run_vqa(lvlm, items, batch_size=48, images=file_images))
    if a.edited:
        edited: dict[str, torch.Tensor] = {}
        edit_psnr: list[float] = []
        shift: list[float] = []    # mean of (edited - input): a global offset the decoder can undo
        spread: list[float] = []   # per-channel std, edited / input: contrast kept or lost

        def edit_source(rec, edited=edited, edit_psnr=edit_psnr, shift=shift, spread=spread):
            if rec.path not in edited:
                x = file_images(rec)[None]
                edited[rec.path] = forward(x, 0.0)["x_edit"].clamp(0, 1)[0]   # the image before coding
                edit_psnr.append(float(image_psnr(edited[rec.path][None], x)[0]))
                shift.append(float((edited[rec.path] - x[0]).mean()))
                spread.append(float(edited[rec.path].std((1, 2)).mean() / x[0].std((1, 2)).mean()))
            return edited[rec.path]

        res = run_vqa(lvlm, items, batch_size=48, images=edit_source)
        report(f"pre-edited, not coded: PSNR {np.mean(edit_psnr):.2f} dB, mean shift {np.mean(shift):+.3f}, "
               f"std ratio {np.mean(spread):.3f}", res)
    for rate in a.rates:
        decoded: dict[str, torch.Tensor] = {}
        bpp: list[float] = []
        zbpp: list[float] = []
        psnr: list[float] = []

        def source(rec, rate=rate, decoded=decoded, bpp=bpp, zbpp=zbpp, psnr=psnr):
            if rec.path not in decoded:
                x = file_images(rec)[None]
                out = forward(x, rate)
                bpp.append(float(bpp_from_likelihoods(out["likelihoods"], x.shape[-2] * x.shape[-1])))
                zbpp.append(float(bpp_from_likelihoods({"z": out["likelihoods"]["z"]}, x.shape[-2] * x.shape[-1])))
                decoded[rec.path] = out["x_hat"].clamp(0, 1)[0]
                psnr.append(float(image_psnr(decoded[rec.path][None], x)[0]))
            return decoded[rec.path]

        res = run_vqa(lvlm, items, batch_size=48, images=source)
        report(f"rate {rate:g}: bpp (estimated) {np.mean(bpp):.4f} (z {np.mean(zbpp):.4f}) PSNR {np.mean(psnr):.2f} dB", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
