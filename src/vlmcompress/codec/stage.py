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
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vlmcompress.codec.bitstream import coded_rate
from vlmcompress.codec.coder import bits_per_pixel, decode_image, encode_image, image_to_tensor, tensor_to_image, write_png
from vlmcompress.codec.config import CodecParams, CodecStageParams, check_stage_params
from vlmcompress.codec.losses import TokenFn
from vlmcompress.codec.model import LVLMCodec
from vlmcompress.codec.data import RecordImages
from vlmcompress.codec.train import (CURVES_NAME, MODEL_DIR, load_codec, make_accelerator, read_codec_record,
                                     resolve_model_dir, train_codec, training_state)
from vlmcompress.codec.target import lvlm_attention_fn, lvlm_token_fn, tower_digest
from vlmcompress.codec.timing import load_test_images, time_codecs, timing_image
from vlmcompress.codec.variants import BASELINE, OURS, init_source, model_variants, training_order
from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import current as current_processes
from vlmcompress.eval.quality import psnr, to_tensor
from vlmcompress.io import atomic_path, write_json
from vlmcompress.paths import outputs_dir, project_root

Log = Callable[[str], Any]


def stage_dir() -> Path:
    return outputs_dir("codec")


def models_dir() -> Path:
    return outputs_dir("codec", "models")


# --- inputs ---------------------------------------------------------------------------------

def training_paths(P: CodecStageParams, splits: dict[str, list[ImageRecord]]) -> list[Path]:
    """The codec's training images: ``codec.train_images`` (a folder) or the ``train`` split.

    A folder must share no image (byte for byte) with the splits the pipeline evaluates on,
    so a rate–accuracy point is never measured on an image the codec was fitted to."""
    if not P.train_images:
        if not splits.get("train"):
            raise ValueError(f"codec stage: the data set has no 'train' images (splits found: "
                             f"{', '.join(sorted(splits)) or 'none'}); name a folder in codec.train_images")
        return [r.path for r in splits["train"]]
    from vlmcompress.data.folders import list_image_files
    paths = list_image_files(P.train_images)
    evaluated = {_digest(r.path): r.path for name, recs in splits.items() if name != "train" for r in recs}
    for p in paths:
        if (same := evaluated.get(_digest(p))) is not None:
            raise ValueError(f"codec.train_images: {p} is the evaluated image {same}; "
                             f"train on images the pipeline does not score")
    return paths


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_token_dim(cp: CodecParams, token_fn: TokenFn, probe: Tensor) -> None:
    """One-line error when the pre-editing net expects tokens of another width than the LVLM's."""
    pre = cp.model.preedit
    if not (pre.enabled and pre.use_tokens):
        return
    with torch.no_grad():
        dim = token_fn(probe[:1]).shape[-1]
    if dim != pre.token_dim:
        raise ValueError(f"codec.model.preedit.token_dim: is {pre.token_dim} but the LVLM's vision "
                         f"features have width {dim}")


def needs_lvlm(cp: CodecParams) -> bool:
    """Whether training or encoding with ``cp`` runs the LVLM (a token loss or token fusion)."""
    pre, lo = cp.model.preedit, cp.loss
    token_loss = lo.w_token_mse > 0 or lo.w_token_cos > 0 or lo.w_rank > 0
    return token_loss or (pre.enabled and pre.use_tokens) or uses_attention(cp)


def uses_attention(cp: CodecParams) -> bool:
    """Whether ``cp``'s low-pass term is weighted by the LVLM's CLS attention."""
    return cp.loss.w_lowpass > 0 and cp.loss.lowpass_weighting == "attention"


# --- training -------------------------------------------------------------------------------

def train_seconds_from_curves(path: Path) -> float:
    """Training wall time recorded in a ``curves.csv``, summed over resumed runs.

    Each run's rows count seconds from that run's start, so a drop in ``seconds`` marks a
    resumption; the time of a run is its last kept row (rows after the checkpoint a run
    resumed from were dropped, and their time is redone, not counted twice).
    """
    if not path.exists():
        return 0.0
    with open(path, newline="") as fh:
        secs = [float(r["seconds"]) for r in csv.DictReader(fh)]
    total, prev = 0.0, 0.0
    for s in secs:
        if s < prev:
            total += prev
        prev = s
    return round(total + prev, 1)


TOWER_NAME = "tower.txt"   # models/<name>/tower.txt: tower_digest of the LVLM a codec was trained against
INIT_NAME = "init.txt"     # models/<name>/init.txt: model_hash of the codec its training started from


def fitted_to(cp: CodecParams, tower: str | None, init: Path | None) -> dict[str, str]:
    """The markers a trained codec must carry to be reused: ``{file name: content}``.

    The tower digest for a codec that reads the LVLM; the weights hash of the codec it
    starts from (``init``), so a retrained pixel baseline makes ours fine-tune again.
    """
    marks = {}
    if tower is not None and needs_lvlm(cp):
        marks[TOWER_NAME] = tower
    if init is not None:
        marks[INIT_NAME] = str(read_codec_record(resolve_model_dir(init))["model_hash"])
    return marks


_MISMATCH = {TOWER_NAME: "trained against another LVLM tower", INIT_NAME: "started from another codec"}


def _training_decision(out: Path, cp: CodecParams, marks: dict[str, str]) -> tuple[str, str]:
    """``(state, why)`` of the codec folder ``out``: :func:`training_state`, turned ``stale``
    when a marker says it was fitted to another tower or started from another codec."""
    state, why = training_state(out, cp), "checkpoint of other params"
    if state in ("done", "resume"):
        for fname, want in marks.items():
            marker = out / fname
            if not marker.is_file() or marker.read_text().strip() != want:
                return "stale", _MISMATCH[fname]
    return state, why


def train_variant(name: str, cp: CodecParams, images: Sequence, token_fn: TokenFn | None,
                  log: Log = print, tower: str | None = None, token_map: Any = None,
                  attention_fn: Any = None, init: Path | None = None, accelerator: Any = None) -> LVLMCodec:
    """Train (or resume, or reuse) one codec into ``models/<name>``; returns it in eval mode.

    ``token_map``: the LVLM's frozen projector (used when ``cp.loss.token_space`` is
    ``projector``); ``attention_fn``: its CLS attention (for ``lowpass_weighting: attention``).
    ``tower``: :func:`tower_digest` of the LVLM behind ``token_fn`` (with the projector for
    such a codec). ``init``: a saved codec the training starts from (``train.init_from``).
    ``accelerator``: the processes of ``accelerate launch`` (default: this one); only the main
    process deletes or writes.
    A codec trained, or checkpointed, against another tower (when it reads the LVLM,
    :func:`needs_lvlm`) or from another starting codec starts over: its parameters alone
    cannot tell.
    """
    out = models_dir() / name
    marks = fitted_to(cp, tower, init)
    acc = accelerator or make_accelerator()
    # The main process decides, before anything changes on disk, and every process follows:
    # a process reading the folder after the main one cleared it would take another branch.
    state, why = current_processes().from_main(_training_decision(out, cp, marks) if acc.is_main_process else None)
    if state == "done":
        log(f"{name}: trained model found, {cp.train.steps} steps")
        return load_codec(out)
    if state == "stale":
        log(f"{name}: {why}, starting over")
    log(f"{name}: {'resuming' if state == 'resume' else 'training'} to {cp.train.steps} steps"
        + (f", starting from {init}" if init is not None and state != "resume" else ""))
    if acc.is_main_process:
        if state == "stale":
            shutil.rmtree(out)
        if marks:
            out.mkdir(parents=True, exist_ok=True)
        for fname, want in marks.items():   # before training: a resumed checkpoint is of these
            with atomic_path(out / fname) as tmp:
                tmp.write_text(want + "\n")
    acc.wait_for_everyone()
    res = train_codec(cp, images, token_fn if needs_lvlm(cp) else None, out,
                      token_map=token_map if needs_lvlm(cp) else None,
                      attention_fn=attention_fn if uses_attention(cp) else None, init_from=init,
                      accelerator=acc)
    log(f"{name}: {res.steps_this_run} steps in {res.seconds:.0f} s; last: "
        + ", ".join(f"{k}={v:.4g}" for k, v in res.last.items() if k not in ("step", "seconds")))
    return res.model  # updated and in eval mode: the weights just saved to models/<name>/model


def init_dir(cp: CodecParams, variants: dict[str, CodecParams]) -> Path | None:
    """Folder of the codec ``cp`` starts from: a codec of the stage (already trained, see
    :func:`training_order`) or a saved codec folder (absolute, or relative to the project)."""
    src = cp.train.init_from
    if not src:
        return None
    if init_source(cp, variants) is not None:
        return models_dir() / src / MODEL_DIR
    path = Path(src) if Path(src).is_absolute() else project_root() / src
    read_codec_record(resolve_model_dir(path))   # a one-line error now, not after other codecs trained
    return path


def prune_models(keep: Sequence[str]) -> list[str]:
    """Delete ``models/<name>`` folders not in ``keep`` (DVC persists the folder across runs,
    so a codec dropped from params would otherwise linger); returns the names removed."""
    mdir = models_dir()
    mdir.mkdir(parents=True, exist_ok=True)
    removed = sorted(d.name for d in mdir.iterdir() if d.is_dir() and d.name not in keep)
    for name in removed:
        shutil.rmtree(mdir / name)
    return removed


def combined_curves(names: Sequence[str]) -> pd.DataFrame:
    frames = []
    for name in names:
        path = models_dir() / name / CURVES_NAME
        if path.exists():
            frames.append(pd.read_csv(path).assign(model=name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# --- measurements ---------------------------------------------------------------------------

def eval_rates(levels: int, n: int) -> list[float]:
    """``n`` rates as a file codes them (float16) evenly spaced over ``[0, levels-1]`` (both ends included)."""
    return [coded_rate(r) for r in np.linspace(0.0, levels - 1, n)]


def _tokens(token_fn: TokenFn, img: np.ndarray) -> Tensor:
    with torch.no_grad():
        return token_fn(image_to_tensor(img))


def measure_rd(name: str, model: LVLMCodec, images: Sequence[np.ndarray], rates: Sequence[float],
               token_fn: TokenFn, ref_tokens: Sequence[Tensor]) -> tuple[list[dict], float]:
    """Real files at every rate: mean bpp / PSNR / token MSE per rate, and the round-trip error.

    The round-trip error is the largest ``|decode(encode(x)) - forward(x)|`` in 8-bit levels
    over all images and rates (``forward``: the model's reconstruction in eval mode, clamped
    and rounded like the decoder's output).
    """
    enc_fn = token_fn if model.needs_tokens else None
    rows, worst = [], 0
    for rate in rates:
        bpps, psnrs, tmses = [], [], []
        for img, ref in zip(images, ref_tokens):
            data = encode_image(model, img, rate, token_fn=enc_fn)
            dec = decode_image(model, data)
            x = image_to_tensor(img)
            with torch.no_grad():
                fwd = tensor_to_image(model(x, rate, ref if model.needs_tokens else None)["x_hat"])
            worst = max(worst, int(np.abs(dec.astype(np.int16) - fwd.astype(np.int16)).max()))
            h, w = img.shape[:2]
            bpps.append(bits_per_pixel(data, h, w))
            psnrs.append(float(psnr(to_tensor(img), to_tensor(dec))[0]))
            tmses.append(float((_tokens(token_fn, dec) - ref).pow(2).mean()))
        rows.append({"model": name, "rate": rate, "bpp": float(np.mean(bpps)),
                     "psnr": float(np.mean(psnrs)), "token_mse": float(np.mean(tmses))})
    return rows, float(worst)


def write_examples(models: dict[str, LVLMCodec], img: np.ndarray, rates: Sequence[float],
                   token_fn: TokenFn, out_dir: Path) -> pd.DataFrame:
    """The original and every codec's real file + decoded PNG at each rate, with their numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_png(out_dir / "original.png", img)
    ref = _tokens(token_fn, img)
    rows = []
    for name, model in models.items():
        for rate in rates:
            rate = coded_rate(rate)
            data = encode_image(model, img, rate, token_fn=token_fn if model.needs_tokens else None)
            stem = f"{name}_rate{rate:.2f}"
            with atomic_path(out_dir / f"{stem}.vlmc") as tmp:
                tmp.write_bytes(data)
            dec = decode_image(model, data)
            write_png(out_dir / f"{stem}.png", dec)
            h, w = img.shape[:2]
            rows.append({"model": name, "rate": rate, "bpp": bits_per_pixel(data, h, w),
                         "psnr": float(psnr(to_tensor(img), to_tensor(dec))[0]),
                         "token_mse": float((_tokens(token_fn, dec) - ref).pow(2).mean()),
                         "png": f"{stem}.png", "file": f"{stem}.vlmc"})
    table = pd.DataFrame(rows)
    with atomic_path(out_dir / "examples.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


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
    if not current_processes().is_main:
        log = _quiet
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
    lvlm = lvlm_from_params(dataclasses.replace(params, lvlm=dataclasses.replace(params.lvlm, device=device)))
    token_fn = lvlm_token_fn(lvlm)
    projector = lvlm.projector            # frozen by lvlm_token_fn
    attention_fn = lvlm_attention_fn(lvlm, token_fn)

    def tower_of(cp: CodecParams) -> str:   # what a codec of these params was fitted to
        return tower_digest(lvlm, projector=cp.loss.token_space == "projector", attention=uses_attention(cp))

    train_set = RecordImages(train_paths, P.train.patch_size)
    for cp in variants.values():
        check_token_dim(cp, token_fn, train_set[0][None].float() / 255.0)

    root, mdir = stage_dir(), models_dir()
    if procs.is_main:
        for name in prune_models(list(variants)):
            log(f"{name}: no longer in params, removed")
    procs.barrier()
    inits = {name: init_dir(cp, variants) for name, cp in variants.items()}
    trained = {name: train_variant(name, variants[name], train_set, token_fn, log, tower_of(variants[name]),
                                   projector, attention_fn, inits[name], accelerator=acc)
               for name in training_order(variants)}
    if not procs.is_main:              # the main process measures and writes
        return procs.from_main(None)
    models = {name: trained[name] for name in variants}   # ours first, as before
    curves = combined_curves(list(variants))
    with atomic_path(root / "curves.csv") as tmp:
        curves.to_csv(tmp, index=False)

    images = load_test_images(splits["test"], P.eval.n_test_images)
    refs = [_tokens(token_fn, img) for img in images]
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


def _quiet(*args: Any) -> None:
    """The log of a process other than the main one: the main process speaks for all."""


__all__ = ["run_codec_stage", "stage_dir", "models_dir", "measure_rd", "train_variant", "eval_rates", "BASELINE", "OURS"]
