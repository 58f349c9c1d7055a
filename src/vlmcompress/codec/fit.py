"""Fitting the codec stage's codecs into ``outputs/codec/models/<name>``.

Which images a codec trains on, whether a saved codec is reused, resumed or trained again
(its params, the LVLM tower it was fitted to, the codec it started from), and the training
records it leaves behind (``curves.csv``). Multi-process aware: under ``accelerate launch``
every process trains, only the main one deletes or writes.
"""
from __future__ import annotations

import csv
import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from vlmcompress.codec.config import CodecParams, CodecStageParams
from vlmcompress.codec.losses import TokenFn
from vlmcompress.codec.model import LVLMCodec
from vlmcompress.codec.paths import models_dir
from vlmcompress.codec.target import tower_digest
from vlmcompress.codec.train import (CURVES_NAME, MODEL_DIR, load_codec, make_accelerator, read_codec_record,
                                     resolve_model_dir, train_codec, training_state)
from vlmcompress.codec.variants import init_source
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import current as current_processes
from vlmcompress.io import atomic_path
from vlmcompress.paths import project_root

Log = Callable[[str], Any]


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


def tower_of(lvlm: Any, cp: CodecParams) -> str:
    """What a codec of params ``cp`` is fitted to: :func:`tower_digest` of ``lvlm``'s tower,
    with its projector when the token terms are on the projector's output and its attention
    layer when the low-pass term is attention-weighted."""
    return tower_digest(lvlm, projector=cp.loss.token_space == "projector", attention=uses_attention(cp))


# --- training -------------------------------------------------------------------------------

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


# --- training records -----------------------------------------------------------------------

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


def combined_curves(names: Sequence[str]) -> pd.DataFrame:
    """The ``curves.csv`` of every codec in ``names`` that has one, with a ``model`` column."""
    frames = []
    for name in names:
        path = models_dir() / name / CURVES_NAME
        if path.exists():
            frames.append(pd.read_csv(path).assign(model=name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
