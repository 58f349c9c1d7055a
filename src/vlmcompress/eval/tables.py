"""The codec evaluation's tables: curves, BD tables, photographs, and the flat headline.

A curve is one row per (codec, point) with the mean bpp, PSNR and MS-SSIM over the images and
the task scores; the ``original`` row (``kind`` = ``reference``) holds the uncoded images'
scores at :data:`RAW_BPP`. The BD table compares every codec with the anchor and every
learned codec with the pixel baseline, on every metric; :func:`headline` picks the few
numbers ``metrics.json`` carries. :func:`bd_pivot` and :func:`target_report` are the
notebook's views of the BD table.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmcompress.config import Params
from vlmcompress.eval.bdrate import bd_table_results
from vlmcompress.eval.codecs import OURS, PIXEL
from vlmcompress.io import atomic_path

# Metrics the BD tables are computed on (higher is better for each); per-type VQA columns
# (vqa_acc_<type>) are added when present.
BD_METRICS = ("vqa_acc", "caption_cider", "retrieval_i2t_r1", "retrieval_t2i_r1", "grounding_acc50",
              "psnr", "ms_ssim", "token_cos")
RD_METRICS = ("psnr", "ms_ssim")
# Scores of the uncoded images the headline carries (the ceiling any codec can reach).
UNCODED_METRICS = ("vqa_acc", "caption_cider", "retrieval_i2t_r1", "retrieval_t2i_r1", "grounding_acc50")
REFERENCE = "original"
RAW_BPP = 24.0   # the uncompressed reference, for plots
BD_COLUMNS = ("codec", "anchor", "metric", "bd_rate", "overlap", "n_anchor", "n_test", "reason",
              "bd_quality", "quality_overlap", "quality_reason")
FOLDER_COLUMNS = ("folder", "codec", "kind", "point", "bpp", "psnr", "ms_ssim", "n_images")
PHOTO_COLUMNS = ("codec", "kind", "point", "image", "width", "height", "nbytes", "bpp", "psnr", "ms_ssim")
PHOTO_MEAN = "mean"     # the image name of a (codec, point)'s mean row


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """``df`` to ``path`` without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


# --- curves -------------------------------------------------------------------------------------

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


def with_reference(curves: pd.DataFrame, reference: Mapping[str, float], n_images: int) -> pd.DataFrame:
    """``curves`` and the uncoded images' row (:data:`REFERENCE`, at :data:`RAW_BPP`)."""
    row = {"codec": REFERENCE, "kind": "reference", "point": np.nan, "bpp": RAW_BPP, "psnr": np.nan,
           "ms_ssim": 1.0, "n_images": n_images, **reference}
    return pd.concat([curves, pd.DataFrame([row])], ignore_index=True)


def metric_columns(curves: pd.DataFrame) -> list[str]:
    """:data:`BD_METRICS` and the per-type VQA columns that hold a value: a task with no data
    (e.g. no referring expressions) has no BD-rate, rather than a wrong one."""
    cols = list(BD_METRICS) + sorted(c for c in curves if c.startswith("vqa_acc_"))
    return [c for c in cols if c in curves and curves[c].notna().any()]


# --- BD tables ----------------------------------------------------------------------------------

def _curves_by_codec(curves: pd.DataFrame, metrics: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    out = {}
    for name, d in curves[curves["kind"] != "reference"].groupby("codec", sort=False):
        out[name] = {"bpp": d["bpp"].tolist(), **{m: d[m].tolist() for m in metrics}}
    return out


def bd_tables(curves: pd.DataFrame, params: Params, metrics: Sequence[str]) -> pd.DataFrame:
    """Every codec against the anchor, every learned codec against the pixel baseline.

    Columns (:data:`BD_COLUMNS`): codec, anchor, metric, bd_rate (percent), overlap, n_anchor,
    n_test, reason, then bd_quality (mean score difference at equal bpp, in the metric's units),
    quality_overlap and quality_reason. BD-rate needs the curves to share a range of *scores*; a
    codec better than the anchor at every rate can share none, and BD-quality (shared *rates*)
    still measures it.
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
        kw = {"method": B.method, "min_overlap": B.min_overlap, "monotone": B.monotone}
        rate = bd_table_results(group, anchor, metrics, **kw)
        quality = bd_table_results(group, anchor, metrics, kind="quality", **kw)
        for codec in tests:
            for m, r in rate[codec].items():
                q = quality[codec][m]
                rows.append({"codec": codec, "anchor": anchor, "metric": m, "bd_rate": r.value,
                             "overlap": r.overlap, "n_anchor": r.n_anchor, "n_test": r.n_test,
                             "reason": r.reason, "bd_quality": q.value, "quality_overlap": q.overlap,
                             "quality_reason": q.reason})
    return pd.DataFrame(rows, columns=list(BD_COLUMNS))


def folder_tables(folder_rd: Mapping[str, pd.DataFrame], params: Params, kinds: Mapping[str, str]
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rate-distortion curves and BD tables (PSNR, MS-SSIM) of each extra image folder, each
    with the ``folder`` column first: ``(folders.csv, bd_folders.csv)``; without folders, two
    tables of columns only."""
    curves, bds = [], []
    for name, frd in folder_rd.items():
        fc = curves_table(frd, {}, kinds)
        curves.append(fc.assign(folder=name)[list(FOLDER_COLUMNS)])
        fbd = bd_tables(fc, params, list(RD_METRICS))
        fbd.insert(0, "folder", name)
        bds.append(fbd)
    if not curves:
        return pd.DataFrame(columns=list(FOLDER_COLUMNS)), pd.DataFrame(columns=["folder", *BD_COLUMNS])
    return pd.concat(curves, ignore_index=True), pd.concat(bds, ignore_index=True)


# --- photographs (rate-distortion per image) -----------------------------------------------------

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


def photos_bd(rd: pd.DataFrame, params: Params, kinds: Mapping[str, str]) -> pd.DataFrame:
    """The BD table (PSNR, MS-SSIM) of the photographs' mean curves; columns only without photos."""
    if rd.empty:
        return pd.DataFrame(columns=list(BD_COLUMNS))
    return bd_tables(curves_table(rd, {}, kinds), params, list(RD_METRICS))


# --- the headline (metrics.json) -------------------------------------------------------------------

def _num(v: float | None, nd: int = 2) -> float | None:
    """JSON-safe rounded number (NaN -> null)."""
    return round(float(v), nd) if v is not None and math.isfinite(float(v)) else None


def _bd_value(bd: pd.DataFrame, anchor: str, metric: str, value: str, nd: int) -> float | None:
    """Our codec's ``value`` (``bd_rate`` or ``bd_quality``) against ``anchor`` on ``metric``."""
    hit = bd.loc[(bd["codec"] == OURS) & (bd["anchor"] == anchor) & (bd["metric"] == metric), value]
    return _num(hit.iloc[0], nd) if len(hit) else None


def headline(bd: pd.DataFrame, curves: pd.DataFrame, anchor: str) -> dict[str, float | None]:
    """The flat headline of the BD table and the curves, null where undefined or absent:

    ``ours_bd_rate_<metric>`` against ``anchor`` for each of :data:`BD_METRICS`;
    ``ours_bd_quality_vqa_acc`` against it; ``ours_bd_rate_vs_pixel_baseline_vqa_acc``;
    ``uncoded_<metric>`` for each of :data:`UNCODED_METRICS`; ``ours_bpp_min`` / ``ours_bpp_max``
    (the range of our codec's mean bpp). BD-rates in percent (2 decimals), BD-quality in the
    metric's units (3 decimals).
    """
    out = {f"ours_bd_rate_{m}": _bd_value(bd, anchor, m, "bd_rate", 2) for m in BD_METRICS}
    out["ours_bd_quality_vqa_acc"] = _bd_value(bd, anchor, "vqa_acc", "bd_quality", 3)
    out["ours_bd_rate_vs_pixel_baseline_vqa_acc"] = _bd_value(bd, PIXEL, "vqa_acc", "bd_rate", 2)
    ref = curves[curves["kind"] == "reference"]
    out |= {f"uncoded_{m}": _num(ref[m].iloc[0]) if len(ref) and m in ref else None for m in UNCODED_METRICS}
    ours = curves.loc[curves["codec"] == OURS, "bpp"]
    out["ours_bpp_min"] = _num(ours.min(), 4) if len(ours) else None
    out["ours_bpp_max"] = _num(ours.max(), 4) if len(ours) else None
    return out


# --- the notebook's views -------------------------------------------------------------------------

def bd_pivot(bd: pd.DataFrame, anchor: str, metrics: Sequence[str] = BD_METRICS,
             value: str = "bd_rate") -> pd.DataFrame:
    """codec x metric table of BD-rates (percent) against ``anchor`` (``value="bd_quality"``:
    BD-quality, the mean score difference at equal bpp)."""
    d = bd[(bd["anchor"] == anchor) & bd["metric"].isin(list(metrics))]
    table = d.pivot(index="codec", columns="metric", values=value)
    return table.reindex(columns=[m for m in metrics if m in table.columns],
                         index=list(dict.fromkeys(d["codec"]))).round(2)


def target_report(bd: pd.DataFrame, curves: pd.DataFrame, targets: Mapping[tuple[str, str], float]
                  ) -> pd.DataFrame:
    """Our codec's BD-rate against each target ``(anchor, metric) -> percent``, the shortfall,
    and why it may miss.

    ``shortfall`` is in percentage points of BD-rate (> 0: short of the target); the diagnostic
    columns are the facts that explain most misses: the curves' shared quality range
    (``overlap``), where each curve's accuracy lies, and the accuracy of the uncoded images.
    """
    rows = []
    ref = curves.loc[curves["kind"] == "reference"]
    for (anchor, metric), goal in targets.items():
        hit = bd[(bd["codec"] == OURS) & (bd["anchor"] == anchor) & (bd["metric"] == metric)]
        value = float(hit["bd_rate"].iloc[0]) if len(hit) else float("nan")

        def span(codec: str, metric: str = metric) -> str:
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
