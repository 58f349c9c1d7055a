"""The codec-evaluation stage (``04_eval_codec``): rate vs LVLM accuracy, against the anchors.

1. Every learned codec under ``outputs/codec/models/<name>/`` is coded at its rate points
   (``eval_codec.learned_rates``), with real bitstreams (``codec.coder``).
2. Each anchor's quality points are picked to span the learned codecs' bpp range
   (``codec.anchors.pick_qualities``) and the test images are coded at them (real files).
3. The decoded images of every (codec, point) go through the LVLM adapter: VQA (overall and
   per question type), captioning (CIDEr), retrieval (R@1 / R@5 both ways), grounding
   (accuracy at IoU >= 0.5), plus PSNR, MS-SSIM and the token-level distortion (MSE and
   cosine similarity of the projected visual tokens of decoded vs original images).
4. BD-rate of every codec against ``bdrate.anchor`` (VVC) on each metric, and of every
   learned codec against ``pixel_baseline``.
5. Each folder in ``data.image_folders`` gets the same sweep, rate-distortion only.
6. The photographs of ``eval_codec.photos`` (any folder, mixed sizes, the first
   ``max_photos``, downscaled to ``photo_max_side``) get it too, reported per image. The
   learned codecs are trained on the data set's scenes: on photographs they show how far
   that training carries, not what a codec trained on photographs would do.

Outputs (``outputs/eval_codec/``)::

    curves.csv       one row per (codec, point): bpp and every metric; ``original`` = no coding
    rd_images.csv    per-image bpp / PSNR / MS-SSIM of every (codec, point)
    bd_table.csv     every BD-rate and BD-quality with its anchor, overlap and the reason when undefined
    examples.csv + examples/<image>/<codec>.png   decoded images at about equal bpp
    folders.csv      rate-distortion curves of each extra image folder (``folder`` column)
    photos_rd.csv    per-photo bpp / PSNR / MS-SSIM of every (codec, point), then their means
                     (``image`` = ``mean``); only the header when ``eval_codec.photos`` is null
    metrics.json     bd_rate.<codec>.<metric>, bd_rate_vs_pixel_baseline.<metric>, ...
    cache/           coded files and decoded PNGs per (codec, point) (kept across runs)
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vlmcompress.config import ConfigError, Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import Processes, merge_shards
from vlmcompress.distributed import current as current_processes
from vlmcompress.eval.bdrate import bd_table_results
from vlmcompress.eval.config import (check_anchors_params, check_bdrate_params,
                                     check_eval_codec_params)
from vlmcompress.eval.sweep import (CodecSpec, code_images, decoded_path, learned_points, make_pool,
                                    plan_anchor_points, span_of)
from vlmcompress.eval.tasks import (ImageSource, file_images, load_image, run_captions, run_grounding,
                                    run_retrieval, run_vqa, vqa_items)
from vlmcompress.io import atomic_path, write_json
from vlmcompress.paths import outputs_dir, project_root

# Metrics the BD tables are computed on (higher is better for each); per-type VQA columns
# (vqa_acc_<type>) are added when present.
BD_METRICS = ("vqa_acc", "caption_cider", "retrieval_i2t_r1", "retrieval_t2i_r1", "grounding_acc50",
              "psnr", "ms_ssim", "token_cos")
RD_METRICS = ("psnr", "ms_ssim")
OURS, PIXEL = "ours", "pixel_baseline"
REFERENCE = "original"
RAW_BPP = 24.0   # the uncompressed reference, for plots


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers, ffmpeg): honest cost
    on a shared machine, where wall time depends on the neighbours."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def stage_dir() -> Path:
    return outputs_dir("eval_codec")


def models_dir() -> Path:
    """Where the codec stage saves its learned codecs, one folder per name."""
    return outputs_dir("codec", "models")


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
    """All checks of the sections this stage reads, before any work."""
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


def vision_tokens(lvlm, images: Mapping[str, np.ndarray], batch_size: int) -> dict[str, torch.Tensor]:
    """The LVLM's vision features ``[1, N, Dv]`` per image (what token-fusing pre-editing reads)."""
    from vlmcompress.eval.quality import to_tensor

    keys = list(images)
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(0, len(keys), batch_size):
            chunk = keys[i:i + batch_size]
            same = len({images[k].shape for k in chunk}) == 1
            groups = [chunk] if same else [[k] for k in chunk]   # folders mix sizes
            for g in groups:
                hidden = lvlm.visual_features(to_tensor([images[k] for k in g])).hidden.float().cpu()
                out.update({k: hidden[j:j + 1].clone() for j, k in enumerate(g)})
    return out


# --- scoring decoded images -----------------------------------------------------------------------

@torch.inference_mode()
def token_distortion(lvlm, records: Sequence[ImageRecord], images: ImageSource, batch_size: int
                     ) -> dict[str, float]:
    """Mean MSE and cosine similarity of the projected visual tokens, decoded vs original."""
    mse, cos = [], []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        ref = lvlm.visual_features([file_images(r) for r in batch]).tokens.float()
        got = lvlm.visual_features([images(r) for r in batch]).tokens.float()
        mse.append((ref - got).pow(2).mean(dim=(1, 2)))                  # [B]
        cos.append(F.cosine_similarity(ref, got, dim=-1).mean(dim=1))    # [B]
    return {"token_mse": float(torch.cat(mse).mean()), "token_cos": float(torch.cat(cos).mean())}


def task_scores(lvlm, records: Sequence[ImageRecord], images: ImageSource,
                items: Sequence, batch_size: int, max_captions: int, max_refs: int) -> dict[str, float]:
    """Every task metric of one set of (decoded) images, percentages except the token terms."""
    vqa = run_vqa(lvlm, items, batch_size=batch_size, images=images)
    caps = records[:max_captions] if max_captions > 0 else records
    cider, _ = run_captions(lvlm, caps, batch_size=batch_size, images=images)
    g50, miou = run_grounding(lvlm, records, batch_size=batch_size, max_refs=max_refs, images=images)
    return {"vqa_acc": vqa.acc, **{f"vqa_acc_{t}": a for t, a in vqa.by_type.items()},
            "caption_cider": cider, **run_retrieval(lvlm, records, images=images),
            "grounding_acc50": g50, "grounding_miou": miou,
            **token_distortion(lvlm, records, images, batch_size)}


def decoded_source(cache: Path, spec: CodecSpec, point) -> ImageSource:
    return lambda r: load_image(decoded_path(cache, spec, point, str(r.image_id)))


# --- tables -----------------------------------------------------------------------------------------

def curves_table(rd: pd.DataFrame, scores: Mapping[tuple[str, Any], Mapping[str, float]],
                 kinds: Mapping[str, str]) -> pd.DataFrame:
    """One row per (codec, point): mean bpp / PSNR / MS-SSIM over images, plus task scores."""
    g = rd.groupby(["codec", "point"], sort=False)
    mean = g[["bpp", "psnr", "ms_ssim"]].mean().reset_index()
    mean["n_images"] = g.size().values
    rows = []
    for rec in mean.to_dict("records"):
        rows.append({"codec": rec["codec"], "kind": kinds[rec["codec"]], **rec,
                     **scores.get((rec["codec"], rec["point"]), {})})
    return pd.DataFrame(rows)


def _curves_by_codec(curves: pd.DataFrame, metrics: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    out = {}
    for name, d in curves[curves["kind"] != "reference"].groupby("codec", sort=False):
        out[name] = {"bpp": d["bpp"].tolist(), **{m: d[m].tolist() for m in metrics}}
    return out


def bd_tables(curves: pd.DataFrame, params: Params, metrics: Sequence[str]) -> pd.DataFrame:
    """Every codec against the anchor, every learned codec against the pixel baseline.

    Columns: codec, anchor, metric, bd_rate (percent), overlap, n_anchor, n_test, reason, then
    bd_quality (mean score difference at equal bpp, in the metric's units), quality_overlap and
    quality_reason. BD-rate needs the curves to share a range of *scores*; a codec better than
    the anchor at every rate can share none, and BD-quality (shared *rates*) still measures it.
    """
    B = params.bdrate
    by_codec = _curves_by_codec(curves, metrics)
    learned = list(curves.loc[curves["kind"] == "learned", "codec"].unique())
    rows = []
    pairs = [(B.anchor, [c for c in by_codec if c != B.anchor])]
    if PIXEL in by_codec:
        pairs.append((PIXEL, [c for c in learned if c != PIXEL]))
    for anchor, tests in pairs:
        if anchor not in by_codec or not tests:
            continue
        group = {c: by_codec[c] for c in [anchor, *tests]}
        kw = dict(method=B.method, min_overlap=B.min_overlap, monotone=B.monotone)
        rate = bd_table_results(group, anchor, metrics, **kw)
        quality = bd_table_results(group, anchor, metrics, kind="quality", **kw)
        for codec in tests:
            for m, r in rate[codec].items():
                q = quality[codec][m]
                rows.append({"codec": codec, "anchor": anchor, "metric": m, "bd_rate": r.value,
                             "overlap": r.overlap, "n_anchor": r.n_anchor, "n_test": r.n_test,
                             "reason": r.reason, "bd_quality": q.value, "quality_overlap": q.overlap,
                             "quality_reason": q.reason})
    return pd.DataFrame(rows, columns=["codec", "anchor", "metric", "bd_rate", "overlap", "n_anchor",
                                       "n_test", "reason", "bd_quality", "quality_overlap", "quality_reason"])


def _num(v: float, nd: int = 2) -> float | None:
    """JSON-safe rounded number (NaN -> null)."""
    return round(float(v), nd) if v is not None and math.isfinite(float(v)) else None


def bd_metrics(bd: pd.DataFrame, anchor: str) -> dict[str, Any]:
    """The metrics-file view of a BD table: ``bd_rate``, ``bd_rate_vs_pixel_baseline``,
    ``ablation_bd_rate`` and the same three for ``bd_quality``."""
    out: dict[str, Any] = {"bd_rate": {}, "ablation_bd_rate": {}, "bd_quality": {}, "ablation_bd_quality": {}}
    for r in bd.itertuples():
        vs_anchor = r.anchor == anchor
        out["bd_rate" if vs_anchor else "ablation_bd_rate"].setdefault(r.codec, {})[r.metric] = _num(r.bd_rate)
        out["bd_quality" if vs_anchor else "ablation_bd_quality"].setdefault(r.codec, {})[r.metric] = \
            _num(r.bd_quality, 3)
    if OURS in out["ablation_bd_rate"]:
        out["bd_rate_vs_pixel_baseline"] = dict(out["ablation_bd_rate"][OURS])
        out["bd_quality_vs_pixel_baseline"] = dict(out["ablation_bd_quality"][OURS])
    return out


def example_target_bpp(curves: pd.DataFrame, wanted: float) -> float:
    """The bpp examples are shown at: ``wanted``, else the median point of ours (or any codec)."""
    if wanted > 0:
        return wanted
    for sel in (curves["codec"] == OURS, curves["kind"] == "learned", curves["kind"] != "reference"):
        bpp = curves.loc[sel, "bpp"]
        if len(bpp):
            return float(np.exp(np.median(np.log(bpp))))
    raise ValueError("no coded points to pick examples from")


def pick_examples(rd: pd.DataFrame, target_bpp: float, images: Sequence[str]) -> pd.DataFrame:
    """For each image and codec, the point whose bpp *on that image* is closest to the target (log)."""
    d = rd[rd["image"].isin(list(images))].copy()
    d["gap"] = (np.log(d["bpp"]) - math.log(target_bpp)).abs()
    best = d.loc[d.groupby(["image", "codec"], sort=False)["gap"].idxmin()]
    return best.drop(columns="gap").reset_index(drop=True)


def write_examples(rd: pd.DataFrame, curves: pd.DataFrame, images: Mapping[str, np.ndarray],
                   specs: Mapping[str, CodecSpec], cache: Path, out: Path, n: int, wanted_bpp: float
                   ) -> pd.DataFrame:
    """Copy decoded images of the first ``n`` images at about equal bpp (and the originals)
    to ``out/examples/<image>/<codec>.png``; list them in ``out/examples.csv``."""
    from PIL import Image

    if n == 0 or rd.empty:
        return pd.DataFrame()
    target = example_target_bpp(curves, wanted_bpp)
    chosen = list(images)[:n]
    ex = pick_examples(rd, target, chosen)
    with atomic_path(out / "examples") as tmp:
        rows = []
        for key in chosen:
            (tmp / key).mkdir(parents=True)
            Image.fromarray(images[key]).save(tmp / key / f"{REFERENCE}.png")
            rows.append({"image": key, "codec": REFERENCE, "kind": "reference", "point": np.nan,
                         "bpp": RAW_BPP, "psnr": np.nan, "ms_ssim": 1.0, "target_bpp": target,
                         "file": f"examples/{key}/{REFERENCE}.png"})
        for e in ex.itertuples():
            spec = specs[e.codec]
            shutil.copyfile(decoded_path(cache, spec, e.point, e.image), tmp / e.image / f"{e.codec}.png")
            rows.append({"image": e.image, "codec": e.codec, "kind": spec.kind, "point": e.point,
                         "bpp": e.bpp, "psnr": e.psnr, "ms_ssim": e.ms_ssim, "target_bpp": target,
                         "file": f"examples/{e.image}/{e.codec}.png"})
    table = pd.DataFrame(rows)
    with atomic_path(out / "examples.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


# --- extra image folders (rate-distortion only) ------------------------------------------------------

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
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(fname).stem)
        while key in out:
            key += "_"
        out[key] = img
    return out


# --- photographs (rate-distortion per image) ---------------------------------------------------------

PHOTO_COLUMNS = ("codec", "kind", "point", "image", "width", "height", "nbytes", "bpp", "psnr", "ms_ssim")
PHOTO_MEAN = "mean"     # the image name of a (codec, point)'s mean row


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
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f.stem)
        while key in out:
            key += "_"
        out[key] = img
    return out


def photos_table(rd: pd.DataFrame, images: Mapping[str, np.ndarray], kinds: Mapping[str, str]) -> pd.DataFrame:
    """Per-image rows of ``rd`` with each image's size, then one mean row per (codec, point)
    (``image`` = :data:`PHOTO_MEAN`; the mean of the per-image bpp, PSNR and MS-SSIM)."""
    if rd.empty:
        return pd.DataFrame(columns=list(PHOTO_COLUMNS))
    d = rd.copy()
    d["kind"] = d["codec"].map(kinds)
    d["width"] = d["image"].map(lambda k: images[k].shape[1])
    d["height"] = d["image"].map(lambda k: images[k].shape[0])
    mean = d.groupby(["codec", "point"], sort=False)[["nbytes", "bpp", "psnr", "ms_ssim"]].mean().reset_index()
    mean["kind"] = mean["codec"].map(kinds)
    mean["image"] = PHOTO_MEAN
    table = pd.concat([d, mean], ignore_index=True)[list(PHOTO_COLUMNS)]
    order = {name: i for i, name in enumerate(dict.fromkeys(rd["codec"]))}
    table["_mean"] = table["image"] == PHOTO_MEAN
    table = table.sort_values(["codec", "point", "_mean", "image"], kind="stable",
                              key=lambda s: s.map(order) if s.name == "codec" else s)
    return table.drop(columns="_mean").reset_index(drop=True)


# --- the stage --------------------------------------------------------------------------------------

def _code_all(params: Params, records: Sequence[ImageRecord], learned: Sequence[CodecSpec],
              anchors: Sequence[CodecSpec], folders: Mapping[str, Path], photos: Path | None, lvlm, cache: Path,
              progress: bool, log: Callable[[str], None]) -> tuple:
    """Code the test images, the extra folders and the photographs with every codec (cached):
    ``(images, points, rd, bpp_range, folder_rd, photo_images, photo_rd)``."""
    E = params.eval_codec
    from vlmcompress.codec.coder import read_png
    images = {str(r.image_id): read_png(r.path) for r in records}
    need_tokens = any(s.needs_tokens for s in learned)
    tokens = vision_tokens(lvlm, images, E.batch_size) if need_tokens else None
    folder_rd: dict[str, pd.DataFrame] = {}
    with make_pool(E.workers) as pool:
        rd, points, bpp_range = sweep_set(images, learned, anchors, params, pool, cache / "test",
                                          tokens=tokens, progress=progress, log=log)
        for name, path in folders.items():
            imgs = folder_images(path)
            toks = vision_tokens(lvlm, imgs, 1) if need_tokens else None
            folder_rd[name], _, _ = sweep_set(imgs, learned, anchors, params, pool, cache / f"folder-{name}",
                                              tokens=toks, progress=progress, log=log)
        photo_imgs: dict[str, np.ndarray] = {}
        photo_rd = pd.DataFrame(columns=list(PHOTO_COLUMNS))
        if photos is not None:
            photo_imgs = photo_images(photos, E.max_photos, E.photo_max_side)
            toks = vision_tokens(lvlm, photo_imgs, 1) if need_tokens else None
            photo_rd, _, _ = sweep_set(photo_imgs, learned, anchors, params, pool, cache / "photos",
                                       tokens=toks, progress=progress, log=log)
    return images, points, rd, bpp_range, folder_rd, photo_imgs, photo_rd


def _quiet(*args: Any) -> None:
    """The log of a process other than the main one: the main process speaks for all."""


def run_eval_codec_stage(params: Params, splits: Mapping[str, Sequence[ImageRecord]],
                         log: Callable[[str], None] = print, progress: bool = True,
                         lvlm=None, procs: Processes | None = None) -> dict[str, Any]:
    """Code, score and compare; write ``outputs/eval_codec/*`` (see the module docstring).

    ``lvlm``: an already loaded adapter (default: the pipeline's, ``lvlm_from_params``).
    ``procs``: the processes sharing the work (default: this one, or those ``accelerate
    launch`` started). The main process codes the images (a pool of ``eval_codec.workers``
    CPU processes) and writes; the decoded image sets are scored on every process's own
    device, each taking every ``world``-th set. Returns the metrics written to ``metrics.json``.
    """
    check_stage_params(params)
    procs = procs or current_processes()
    if not procs.is_main:
        log, progress = _quiet, False
    E = params.eval_codec
    t_start = time.perf_counter()
    out, cache = stage_dir(), stage_dir() / "cache"
    if "test" not in splits or not splits["test"]:
        raise ValueError("eval_codec: the data set has no test split")
    test = list(splits["test"])
    records = test[: E.n_images] if E.n_images > 0 else test
    folders = folder_sets(params)
    photos = photos_folder(params)
    learned, anchors = learned_codecs(), anchor_codecs(params)
    clash = {s.name for s in learned} & {s.name for s in anchors}
    if clash:
        raise ValueError(f"{models_dir()}: learned codec named like an anchor ({', '.join(sorted(clash))})")
    if not learned:
        log(f"no learned codec under {models_dir()}: anchors only")
    specs = {s.name: s for s in [*learned, *anchors]}
    kinds = {s.name: s.kind for s in specs.values()}

    if lvlm is None:
        from vlmcompress.lvlm.load import lvlm_from_params
        device = procs.device(params.lvlm.device)
        lvlm = lvlm_from_params(dataclasses.replace(params, lvlm=dataclasses.replace(params.lvlm, device=device)))
    t0, c0 = time.perf_counter(), cpu_seconds()
    coded = _code_all(params, records, learned, anchors, folders, photos, lvlm, cache, progress, log) \
        if procs.is_main else None
    points = procs.from_main(coded[1] if coded else None)     # the others wait while the main process codes
    seconds_encode, cpu_encode = time.perf_counter() - t0, cpu_seconds() - c0
    log(f"coded {len(records)} images at {sum(map(len, points.values()))} points in {seconds_encode:.0f} s "
        f"({cpu_encode:.0f} CPU s)")

    t0, c0 = time.perf_counter(), cpu_seconds()
    items = vqa_items(records, E.max_questions, seed=params.seed)

    def score(src: ImageSource) -> dict[str, float]:
        return task_scores(lvlm, records, src, items, E.batch_size, E.max_captions, E.max_refs)

    from tqdm.auto import tqdm
    jobs: list[tuple[CodecSpec, Any] | None] = [(s, p) for s in specs.values() for p in points[s.name]]
    jobs.append(None)                                        # the uncoded images
    mine = [(i, score(file_images if jobs[i] is None else decoded_source(cache / "test", *jobs[i])))
            for i in tqdm(procs.shard(len(jobs)), desc="tasks", disable=not progress)]
    every = merge_shards(procs.gather(mine))
    sets_per_process = procs.gather(len(mine))
    seconds_tasks, cpu_tasks = time.perf_counter() - t0, cpu_seconds() - c0
    if not procs.is_main:
        return procs.from_main(None)     # the main process's metrics, once it has written them
    reference = every[-1]
    scores = {(job[0].name, job[1]): sc for job, sc in zip(jobs[:-1], every[:-1])}
    images, rd, bpp_range, folder_rd, photo_imgs, photo_rd = coded[0], coded[2], coded[3], coded[4], coded[5], coded[6]

    curves = curves_table(rd, scores, kinds)
    ref_row = {"codec": REFERENCE, "kind": "reference", "point": np.nan, "bpp": RAW_BPP, "psnr": np.nan,
               "ms_ssim": 1.0, "n_images": len(records), **reference}
    curves = pd.concat([curves, pd.DataFrame([ref_row])], ignore_index=True)
    # A task with no data (e.g. no referring expressions) has no BD-rate, rather than a wrong one.
    metric_cols = [c for c in list(BD_METRICS) + sorted(c for c in curves if c.startswith("vqa_acc_"))
                   if c in curves and curves[c].notna().any()]
    bd = bd_tables(curves, params, metric_cols)
    _write_csv(curves, out / "curves.csv")
    _write_csv(rd, out / "rd_images.csv")
    _write_csv(bd, out / "bd_table.csv")
    write_examples(rd, curves, images, specs, cache / "test", out, E.n_examples, E.example_bpp)

    folder_metrics, folder_curves = {}, []
    for name, frd in folder_rd.items():
        fc = curves_table(frd, {}, kinds)
        folder_curves.append(fc.assign(folder=name))
        fbd = bd_tables(fc, params, list(RD_METRICS))
        folder_metrics[name] = {"n_images": int(frd["image"].nunique()), **bd_metrics(fbd, params.bdrate.anchor)}
    cols = ["folder", "codec", "kind", "point", "bpp", "psnr", "ms_ssim", "n_images"]
    _write_csv(pd.concat(folder_curves, ignore_index=True)[cols] if folder_curves else pd.DataFrame(columns=cols),
               out / "folders.csv")
    photo_table = photos_table(photo_rd, photo_imgs, kinds)
    _write_csv(photo_table, out / "photos_rd.csv")     # header only without photos: a DVC output always

    metrics: dict[str, Any] = {
        **bd_metrics(bd, params.bdrate.anchor),
        "reference": {k: _num(v) for k, v in reference.items()},
        "n_images": len(records), "vqa_questions": len(items),
        "points": {name: len(p) for name, p in points.items()},
        "anchor_bpp_min": _num(bpp_range[0], 4), "anchor_bpp_max": _num(bpp_range[1], 4),
        "seconds_encode": round(seconds_encode, 1), "seconds_tasks": round(seconds_tasks, 1),
        "cpu_seconds_encode": round(cpu_encode, 1), "cpu_seconds_tasks": round(cpu_tasks, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "processes": procs.world, "image_sets_per_process": sets_per_process,
    }
    if folder_metrics:
        metrics["folders"] = folder_metrics
    if not photo_rd.empty:
        pbd = bd_tables(curves_table(photo_rd, {}, kinds), params, list(RD_METRICS))
        metrics["photos"] = {"n_images": len(photo_imgs), **bd_metrics(pbd, params.bdrate.anchor)}
    write_json(out / "metrics.json", metrics)
    log(f"tasks on {len(jobs)} image sets in {seconds_tasks:.0f} s ({cpu_tasks:.0f} CPU s) "
        f"on {procs.world} process(es)")
    return procs.from_main(metrics)


# --- notebook helpers ------------------------------------------------------------------------------

def bd_pivot(bd: pd.DataFrame, anchor: str, metrics: Sequence[str] = BD_METRICS,
             value: str = "bd_rate") -> pd.DataFrame:
    """codec x metric table of BD-rates (percent) against ``anchor`` (``value="bd_quality"``:
    BD-quality, the mean score difference at equal bpp)."""
    d = bd[(bd["anchor"] == anchor) & bd["metric"].isin(list(metrics))]
    table = d.pivot(index="codec", columns="metric", values=value)
    return table.reindex(columns=[m for m in metrics if m in table.columns],
                         index=list(dict.fromkeys(d["codec"]))).round(2)


TARGETS = {("vvc", "vqa_acc"): -50.0, (PIXEL, "vqa_acc"): -25.0}


def target_report(bd: pd.DataFrame, curves: pd.DataFrame, targets: Mapping[tuple[str, str], float] = TARGETS
                  ) -> pd.DataFrame:
    """Our codec's BD-rate against each target (anchor, metric), the shortfall, and why it may miss.

    ``shortfall`` is in percentage points of BD-rate (> 0: short of the target); the diagnostic
    columns are the facts that explain most misses: the curves' shared quality range
    (``overlap``), where each curve's accuracy lies, and the accuracy of the uncoded images.
    """
    rows = []
    ref = curves.loc[curves["kind"] == "reference"]
    for (anchor, metric), goal in targets.items():
        hit = bd[(bd["codec"] == OURS) & (bd["anchor"] == anchor) & (bd["metric"] == metric)]
        value = float(hit["bd_rate"].iloc[0]) if len(hit) else float("nan")

        def span(codec: str) -> str:
            d = curves[curves["codec"] == codec]
            if d.empty:
                return "absent"
            return (f"{d[metric].min():.1f}..{d[metric].max():.1f} at "
                    f"{d['bpp'].min():.3f}..{d['bpp'].max():.3f} bpp")

        rows.append({"anchor": anchor, "metric": metric, "target": goal, "bd_rate": value,
                     "shortfall": value - goal if math.isfinite(value) else float("nan"),
                     "met": bool(math.isfinite(value) and value <= goal),
                     "reason_if_undefined": hit["reason"].iloc[0] if len(hit) else "codec or anchor absent",
                     "overlap": float(hit["overlap"].iloc[0]) if len(hit) else float("nan"),
                     "ours": span(OURS), "anchor_curve": span(anchor),
                     "uncoded": float(ref[metric].iloc[0]) if len(ref) and metric in ref else float("nan")})
    return pd.DataFrame(rows)
