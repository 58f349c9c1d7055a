"""The codec stage (``03_codec``): train our codec, its pixel baseline and ablations; measure them.

Outputs under ``outputs/codec/``::

    models/<name>/model/       the trained codec (``load_codec``; ``vlmcompress encode --model``)
    models/<name>/checkpoint/  resumable state (kept across runs: DVC ``persist``)
    models/<name>/curves.csv   training curve of that codec
    curves.csv                 all training curves, with a ``model`` column
    rd.csv                     model, rate, bpp, psnr, token_mse (real files, test images)
    examples/                  the original and each codec's decoded files at a few rates
    metrics.json               the issue's contract (train_seconds, bpp range, round trip, speed)

The token target is the LVLM vision tower's selected-layer features, the ones fed to
the projector (``VisualFeatures.hidden``), not the projected tokens: (1) they are the
vision encoder's output every LLaVA-family model built on that tower consumes, so the
codec is not tied to one projector / LM (the paper's claim of generalising across
LVLMs rests on this); (2) the projector is a frozen per-token map, so keeping its input
keeps its output, while the reverse does not hold (a projector may ignore directions a
different LM would use); (3) the trainer hands one tensor both to the loss and to the
pre-editing net's token branch, and the encoder (library and CLI) feeds the pre-editing net
these same features.

The library pieces: :mod:`vlmcompress.codec.fit` (train, resume or reuse each codec) and
:mod:`vlmcompress.codec.measure` (real-file rate–distortion and examples).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vlmcompress.codec.config import CodecStageParams, check_stage_params
from vlmcompress.codec.data import RecordImages
from vlmcompress.codec.fit import (Log, check_token_dim, combined_curves, init_dir, prune_models, tower_of,
                                   train_seconds_from_curves, train_variant, training_paths)
from vlmcompress.codec.measure import eval_rates, image_tokens, measure_rd, write_examples
from vlmcompress.codec.paths import models_dir
from vlmcompress.codec.target import lvlm_attention_fn, lvlm_token_fn
from vlmcompress.codec.timing import load_test_images, time_codecs, timing_image
from vlmcompress.codec.train import CURVES_NAME, make_accelerator
from vlmcompress.codec.variants import BASELINE, OURS, model_variants, training_order
from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import current as current_processes
from vlmcompress.io import atomic_path, write_json
from vlmcompress.paths import outputs_dir


def stage_dir() -> Path:
    return outputs_dir("codec")


# --- the stage ------------------------------------------------------------------------------

def run_codec_stage(params: Params, splits: dict[str, list[ImageRecord]], log: Log = print
                    ) -> dict[str, Any]:
    """Train every codec of ``params.codec``, measure them with real files, write the outputs.

    The token target is the pipeline's LVLM (``lvlm_from_params(params)``, see the module
    docstring). Under ``accelerate launch`` every process trains on its shard of each batch
    (its LVLM on its own device); only the main process deletes, measures and writes.
    Returns the metrics written to ``outputs/codec/metrics.json``.
    """
    P: CodecStageParams = params.codec
    check_stage_params(P)
    log = current_processes().main_log(log)
    if not splits.get("test"):
        raise ValueError(f"codec stage: the data set has no 'test' images "
                         f"(splits found: {', '.join(sorted(splits)) or 'none'})")
    train_paths = training_paths(P, splits)
    log(f"training on {len(train_paths)} images ({P.train_images or 'the train split'})")
    variants = model_variants(P)
    from vlmcompress.lvlm.load import lvlm_from_params  # late: transformers is slow to import
    procs = current_processes()
    acc = make_accelerator()           # one for every codec: this process, or those launched
    device = procs.device(params.lvlm.device)
    lvlm = lvlm_from_params(params, device=device)
    token_fn = lvlm_token_fn(lvlm)
    projector = lvlm.projector            # frozen by lvlm_token_fn
    attention_fn = lvlm_attention_fn(lvlm, token_fn)

    train_set = RecordImages(train_paths, P.train.patch_size)
    for cp in variants.values():
        check_token_dim(cp, token_fn, train_set[0][None].float() / 255.0)

    root, mdir = stage_dir(), models_dir()
    if procs.is_main:
        for name in prune_models(list(variants)):
            log(f"{name}: no longer in params, removed")
    procs.barrier()
    inits = {name: init_dir(cp, variants) for name, cp in variants.items()}
    trained = {name: train_variant(name, variants[name], train_set, token_fn, log, tower_of(lvlm, variants[name]),
                                   projector, attention_fn, inits[name], accelerator=acc)
               for name in training_order(variants)}
    if not procs.is_main:              # the main process measures and writes
        return procs.from_main(None)
    models = {name: trained[name] for name in variants}   # ours first, as before
    curves = combined_curves(list(variants))
    with atomic_path(root / "curves.csv") as tmp:
        curves.to_csv(tmp, index=False)

    images = load_test_images(splits["test"], P.eval.n_test_images)
    refs = [image_tokens(token_fn, img) for img in images]
    rates = eval_rates(P.model.levels, P.eval.n_rates)
    rows: list[dict] = []
    roundtrip = 0.0
    for name, model in models.items():
        log(f"{name}: measuring {len(images)} test images at {len(rates)} rates")
        r, err = measure_rd(name, model, images, rates, token_fn, refs)
        rows += r
        roundtrip = max(roundtrip, err)
    rd = pd.DataFrame(rows)
    with atomic_path(root / "rd.csv") as tmp:
        rd.to_csv(tmp, index=False)
    write_examples(models, images[0], P.eval.example_rates, token_fn, root / "examples")

    log("timing encode/decode of a 512x512 image, ours vs VVC")
    timing = time_codecs(models[OURS], token_fn, timing_image(images), (P.model.levels - 1) / 2,
                         vvc_preset=P.eval.vvc_preset, vvc_qp=P.eval.vvc_qp,
                         repeats=P.eval.timing_repeats, threads=P.eval.timing_threads)

    ours_rd = rd[rd["model"] == OURS]
    metrics: dict[str, Any] = {
        "train_seconds": 0.0,
        "bpp_min": round(float(ours_rd["bpp"].min()), 4),
        "bpp_max": round(float(ours_rd["bpp"].max()), 4),
        "roundtrip_max_abs_err": roundtrip,
        **timing,
        "vvc_qp": P.eval.vvc_qp,
        "test_images": len(images),
    }
    for name in variants:
        d = rd[rd["model"] == name]
        secs = train_seconds_from_curves(mdir / name / CURVES_NAME)
        metrics["train_seconds"] = round(metrics["train_seconds"] + secs, 1)
        metrics.update({f"{name}.train_seconds": secs, f"{name}.steps": variants[name].train.steps,
                        f"{name}.bpp_min": round(float(d["bpp"].min()), 4),
                        f"{name}.bpp_max": round(float(d["bpp"].max()), 4),
                        f"{name}.token_mse_at_bpp_max": round(float(d.loc[d["bpp"].idxmax(), "token_mse"]), 5),
                        f"{name}.psnr_at_bpp_max": round(float(d.loc[d["bpp"].idxmax(), "psnr"]), 2)})
    metrics["processes"] = procs.world
    write_json(root / "metrics.json", metrics)
    return procs.from_main(metrics)


__all__ = ["BASELINE", "OURS", "models_dir", "run_codec_stage", "stage_dir"]
