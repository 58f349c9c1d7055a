"""What the codec evaluation codes: the learned codecs, the anchors, and the sets of images.

The learned codecs are the folders the codec stage saved (``outputs/codec/models/<name>/``);
the anchors are ``params.anchors``. The image sets are the test images of the data set, each
folder of ``data.image_folders`` and the photographs of ``eval_codec.photos``; each is coded by
every codec (:func:`sweep_set`): the learned codecs at their rate points, the anchors at
quality points picked to span the learned codecs' bpp range.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmcompress.codec.paths import models_dir
from vlmcompress.config import ConfigError, Params
from vlmcompress.eval.config import (check_anchors_params, check_bdrate_params,
                                     check_eval_codec_params)
from vlmcompress.eval.sweep import CodecSpec, code_images, learned_points, plan_anchor_points, span_of
from vlmcompress.paths import project_root

OURS, PIXEL = "ours", "pixel_baseline"


# --- the codecs ---------------------------------------------------------------------------------

def learned_codecs(root: Path | None = None) -> list[CodecSpec]:
    """Every saved codec under ``root`` (default ``outputs/codec/models``): ours, the pixel
    baseline, then any ablation, by name. A folder without a saved model is an error."""
    root = Path(root) if root is not None else models_dir()
    if not root.is_dir():
        return []
    specs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            specs.append(CodecSpec.learned(folder.name, folder))
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder}: no saved codec (codec.json) in it; "
                                    "re-run the codec stage") from None
    rank = {OURS: 0, PIXEL: 1}
    return sorted(specs, key=lambda s: (rank.get(s.name, 2), s.name))


def anchor_codecs(params: Params) -> list[CodecSpec]:
    """The anchors of ``params.anchors``; one that cannot run here is a one-line error."""
    from vlmcompress.codec.anchors import ANCHORS

    specs = []
    for i, c in enumerate(params.anchors.codecs):
        reason = ANCHORS[c.name].unavailable()
        if reason:
            raise RuntimeError(f"anchors.codecs[{i}] ({c.key}): {reason}")
        specs.append(CodecSpec.anchor(c.key, c.options, codec=c.name))
    return specs


def check_stage_params(params: Params) -> None:
    """All checks of the sections the codec evaluation reads, before any work."""
    check_anchors_params(params.anchors)
    check_bdrate_params(params.bdrate)
    check_eval_codec_params(params.eval_codec)
    names = [c.key for c in params.anchors.codecs]
    if params.bdrate.anchor not in names:
        raise ConfigError(f"bdrate.anchor: {params.bdrate.anchor!r} is not among anchors.codecs "
                          f"({', '.join(names)})")
    photos_folder(params)


# --- coding a set of images -----------------------------------------------------------------------

def sweep_set(images: Mapping[str, np.ndarray], learned: Sequence[CodecSpec], anchors: Sequence[CodecSpec],
              params: Params, pool, cache: Path, *, tokens: Mapping[str, Any] | None = None,
              progress: bool = True, log: Callable[[str], None] = print
              ) -> tuple[pd.DataFrame, dict[str, list], tuple[float, float]]:
    """Code ``images`` with the learned codecs, then with the anchors at points spanning them.

    Returns per-image rate-distortion rows, the points of every codec and the anchors' bpp range.
    """
    A, E = params.anchors, params.eval_codec
    points: dict[str, list] = {s.name: learned_points(s, E.learned_rates, A.n_points) for s in learned}
    rd_learned = code_images([(s, points[s.name]) for s in learned], images, cache, pool,
                             tokens=tokens, progress=progress, desc="encode learned")
    span = span_of(rd_learned, E.anchor_span) if E.anchor_span > 0 else None
    bpp_range = span or tuple(A.bpp_range)
    log(f"anchors span {bpp_range[0]:.3f}..{bpp_range[1]:.3f} bpp"
        + (" (learned codecs' range, widened)" if span else " (anchors.bpp_range)"))
    calib = [images[k] for k in list(images)[: A.n_calibration]]
    points.update(plan_anchor_points(anchors, calib, bpp_range, A.n_points, pool, explicit=A.qualities,
                                     cache_file=cache / "anchor_points.json", progress=progress))
    rd_anchor = code_images([(s, points[s.name]) for s in anchors], images, cache, pool,
                            progress=progress, desc="encode anchors")
    return pd.concat([rd_learned, rd_anchor], ignore_index=True), points, bpp_range


# --- the image sets ---------------------------------------------------------------------------------

def _unique_key(name: str, taken: Mapping[str, Any]) -> str:
    """``name`` made safe as a file name, suffixed with ``_`` until no key of ``taken`` has it."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    while key in taken:
        key += "_"
    return key


def folder_sets(params: Params) -> dict[str, Path]:
    """``data.image_folders`` by a unique short name (checked to list images before any work)."""
    from vlmcompress.data.folders import list_image_files

    out: dict[str, Path] = {}
    for i, entry in enumerate(params.data.image_folders):
        path = Path(entry) if Path(entry).is_absolute() else project_root() / entry
        try:
            list_image_files(path)
        except ValueError as exc:
            raise ValueError(f"data.image_folders[{i}]: {exc}") from None
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name) or "folder"
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out[name] = path
    return out


def folder_images(path: Path) -> dict[str, np.ndarray]:
    """A folder's images keyed by a file-name stem safe as a file name (unique)."""
    from vlmcompress.data.folders import iter_image_folder

    out: dict[str, np.ndarray] = {}
    for fname, img in iter_image_folder(path):
        out[_unique_key(Path(fname).stem, out)] = img
    return out


def photos_folder(params: Params) -> Path | None:
    """``eval_codec.photos`` resolved against the project root and checked to list images."""
    from vlmcompress.data.folders import list_image_files

    entry = params.eval_codec.photos
    if entry is None:
        return None
    path = Path(entry) if Path(entry).is_absolute() else project_root() / entry
    try:
        list_image_files(path)
    except ValueError as exc:
        raise ConfigError(f"eval_codec.photos: {exc}") from None
    return path


def fit_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """``img`` (``HxWx3`` uint8) downscaled (Lanczos) so its longer side is <= ``max_side``
    (0: unchanged); the aspect ratio is kept, each side at least 16 px."""
    h, w = img.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return img
    from PIL import Image

    k = max_side / max(h, w)
    size = (max(16, round(w * k)), max(16, round(h * k)))
    return np.array(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def photo_images(path: Path, max_photos: int, max_side: int) -> dict[str, np.ndarray]:
    """The first ``max_photos`` images of ``path`` by file name (0: all), each fitted to
    ``max_side``, keyed by a unique file-name-safe stem."""
    from vlmcompress.data.folders import list_image_files
    from vlmcompress.images import read_image_rgb

    files = list_image_files(path)
    out: dict[str, np.ndarray] = {}
    for f in files[:max_photos] if max_photos > 0 else files:
        img = fit_side(read_image_rgb(f), max_side)
        if min(img.shape[:2]) < 11:
            raise ValueError(f"{f}: {img.shape[1]}x{img.shape[0]} is too small for MS-SSIM (11 px a side)")
        out[_unique_key(f.stem, out)] = img
    return out
