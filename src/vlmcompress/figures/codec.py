"""Codec figures: rate against accuracy and distortion, BD-rate, the ablation, reconstructions,
and the codec stage's training curves.

The evaluation stage's tables (``outputs/eval_codec``) feed :func:`rate_accuracy`,
:func:`bd_rate_heatmap`, :func:`ablation` and :func:`codec_examples`; the codec stage's
(``outputs/codec``) feed :func:`codec_curves`, :func:`reconstruction_grid`, and
:func:`rate_accuracy` again through :func:`codec_rd_data`. Separate from the token figures
(:mod:`vlmcompress.figures.tokens`) so a stage's DVC dependencies name only the figures it draws.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from vlmcompress.figures.plots import (CODEC_COLOURS, LOG_METRICS, codec_order, codec_palette, label, log_x,
                                      require, style)
from vlmcompress.images import read_image_rgb


# --- rate vs accuracy -------------------------------------------------------------------------

def rate_accuracy_data(curves: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Long table ``codec, kind, point, bpp, metric, value`` (the uncoded reference included)."""
    require(curves, ["codec", "kind", "point", "bpp", *metrics], "rate_accuracy")
    long = curves.melt(id_vars=["codec", "kind", "point", "bpp"], value_vars=list(metrics),
                       var_name="metric", value_name="value")
    return long.dropna(subset=["value"]).reset_index(drop=True)


def rate_accuracy(data: pd.DataFrame, title: str = "") -> plt.Figure:
    """One panel per metric: value vs bpp (log) per codec; the uncoded images as a dashed line.
    Metrics of :data:`~vlmcompress.figures.plots.LOG_METRICS` get a log y axis."""
    metrics = list(dict.fromkeys(data["metric"]))
    coded = data[data["kind"] != "reference"]
    order = codec_order(coded)
    pal = codec_palette(order)
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    with style():
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        for ax, m in zip(axes.flat, metrics):
            d = coded[coded["metric"] == m].sort_values("bpp")
            sns.lineplot(d, x="bpp", y="value", hue="codec", hue_order=order, palette=pal, marker="o",
                         markersize=4, ax=ax, legend=False, sort=True, estimator=None)
            ref = data[(data["kind"] == "reference") & (data["metric"] == m)]
            if len(ref):
                ax.axhline(float(ref["value"].iloc[0]), ls="--", lw=1, color=CODEC_COLOURS["original"])
            log_x(ax)
            if m in LOG_METRICS:
                ax.set_yscale("log")
            ax.set_xlabel("bits per pixel")
            ax.set_ylabel(label(m))
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=pal[c], marker="o", label=c) for c in order]
        if (data["kind"] == "reference").any():
            handles.append(plt.Line2D([], [], color=CODEC_COLOURS["original"], ls="--", label="uncoded"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
        if title:
            fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


# --- BD-rate table as a heat map -----------------------------------------------------------------

def bd_rate_data(bd: pd.DataFrame, anchor: str, metrics: Sequence[str]) -> pd.DataFrame:
    """Rows of ``bd_table.csv`` against ``anchor`` for ``metrics``: codec, metric, bd_rate."""
    require(bd, ["codec", "anchor", "metric", "bd_rate"], "bd_rate")
    d = bd[(bd["anchor"] == anchor) & bd["metric"].isin(list(metrics))]
    return d[["codec", "anchor", "metric", "bd_rate"]].reset_index(drop=True)


def bd_rate_heatmap(data: pd.DataFrame) -> plt.Figure:
    """codec x metric BD-rate (%) against the anchor; blue saves bits, red costs them; blank = undefined."""
    table = data.pivot(index="codec", columns="metric", values="bd_rate")
    table = table.reindex(index=codec_order(data.assign(kind="anchor")),
                          columns=list(dict.fromkeys(data["metric"])))
    anchor = data["anchor"].iloc[0] if len(data) else "?"
    finite = table.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(finite))) if np.isfinite(finite).any() else 100.0
    with sns.axes_style("white"), sns.plotting_context("paper", font_scale=1.1):
        fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 2.5, 0.5 * table.shape[0] + 1.8))
        sns.heatmap(table, annot=True, fmt=".1f", cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, ax=ax,
                    cbar_kws={"label": f"BD-rate vs {anchor} (%)"}, linewidths=0.5, linecolor="white")
        ax.set_xticklabels([label(t.get_text()) for t in ax.get_xticklabels()], rotation=35, ha="right")
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_title(f"BD-rate against {anchor} (negative: fewer bits for equal quality; blank: undefined)")
        fig.tight_layout()
    return fig


# --- ablation of the learned codec ------------------------------------------------------------------

def ablation_data(curves: pd.DataFrame, bd: pd.DataFrame, metric: str, bars: Sequence[str]) -> pd.DataFrame:
    """Learned codecs only. ``panel='curve'`` rows: bpp/value of ``metric``; ``panel='bd'`` rows:
    BD-rate (%) against the pixel baseline for each metric in ``bars``."""
    require(curves, ["codec", "kind", "bpp", metric], "ablation")
    learned = curves[curves["kind"] == "learned"]
    curve = learned[["codec", "point", "bpp", metric]].rename(columns={metric: "value"}).assign(
        panel="curve", metric=metric)
    b = bd[(bd["anchor"] == "pixel_baseline") & bd["metric"].isin(list(bars))]
    bars_df = b[["codec", "metric", "bd_rate"]].rename(columns={"bd_rate": "value"}).assign(panel="bd")
    return pd.concat([curve, bars_df], ignore_index=True)[["panel", "codec", "point", "bpp", "metric", "value"]]


def ablation(data: pd.DataFrame) -> plt.Figure:
    """Left: the learned codecs' rate-accuracy curves. Right: BD-rate against the pixel baseline
    of each variant (loss terms, pre-editing), per metric."""
    curve, bars = data[data["panel"] == "curve"], data[data["panel"] == "bd"]
    order = codec_order(curve.assign(kind="learned"))
    pal = codec_palette(order)
    with style():
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
        if len(curve):
            m = curve["metric"].iloc[0]
            sns.lineplot(curve.sort_values("bpp"), x="bpp", y="value", hue="codec", hue_order=order, palette=pal,
                         marker="o", ax=a, estimator=None, sort=True)
            log_x(a)
            a.set_xlabel("bits per pixel")
            a.set_ylabel(label(m))
            a.set_title("learned codecs")
        if len(bars):
            border = [c for c in order if c in set(bars["codec"])]
            sns.barplot(bars.assign(metric=bars["metric"].map(label)), x="metric", y="value", hue="codec",
                        hue_order=border, palette=pal, ax=b)
            b.axhline(0, color="black", lw=0.8)
            b.set_ylabel("BD-rate vs pixel baseline (%)")
            b.set_xlabel("")
            b.tick_params(axis="x", rotation=25)
            b.set_title("loss terms and pre-editing (negative: fewer bits)")
        else:
            b.text(0.5, 0.5, "no learned codec besides the pixel baseline", ha="center", va="center")
            b.axis("off")
        fig.tight_layout()
    return fig


# --- example images -------------------------------------------------------------------------------

def codec_examples_data(examples: pd.DataFrame) -> pd.DataFrame:
    require(examples, ["image", "codec", "bpp", "psnr", "file"], "codec_examples")
    return examples.reset_index(drop=True)


def codec_examples(data: pd.DataFrame, root: Path) -> plt.Figure:
    """Rows: images; columns: the original, then each codec at about the same bpp."""
    images = list(dict.fromkeys(data["image"].astype(str)))
    codecs = ["original"] + [c for c in codec_order(data[data["codec"] != "original"])]
    target = float(data["target_bpp"].iloc[0]) if "target_bpp" in data and len(data) else float("nan")
    with style():
        fig, axes = plt.subplots(len(images), len(codecs), figsize=(1.6 * len(codecs), 1.85 * len(images)),
                                 squeeze=False)
        for i, img in enumerate(images):
            for j, c in enumerate(codecs):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                row = data[(data["image"].astype(str) == img) & (data["codec"] == c)]
                if row.empty:
                    ax.axis("off")
                    continue
                r = row.iloc[0]
                # nearest: show the codec's pixels as they are (and keep the PNG small)
                ax.imshow(read_image_rgb(root / r["file"]), interpolation="nearest")
                sub = "uncoded" if c == "original" else f"{r['bpp']:.3f} bpp, {r['psnr']:.1f} dB"
                ax.set_title(f"{c}\n{sub}" if i == 0 else sub, fontsize=7)
        if math.isfinite(target):
            fig.suptitle(f"reconstructions at about {target:.3f} bpp", fontsize=9)
        fig.tight_layout()
    return fig


# --- the codec stage: training curves, rate-distortion, reconstructions -------------------------

# Columns of outputs/codec/curves.csv drawn as training curves, in panel order.
CODEC_TERMS = ("loss", "bpp_loss", "token_mse", "token_cos", "rank_loss", "pixel_mse", "lowpass_mse")


def codec_curves_data(curves: pd.DataFrame, window: int = 5) -> pd.DataFrame:
    """``outputs/codec/curves.csv`` as ``model, step, term, value`` rows: each logged term's
    rolling mean over ``window`` rows of its codec (each step draws its own rate, so raw rows jump)."""
    require(curves, ["model", "step", "loss"], "codec_curves")
    parts = [pd.DataFrame({"model": name, "step": d["step"].to_numpy(), "term": t,
                           "value": d[t].rolling(window, min_periods=1).mean().to_numpy()})
             for name, d in curves.groupby("model", sort=False)
             for t in CODEC_TERMS if t in d and d[t].notna().any()]
    cols = ["model", "step", "term", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def codec_curves(data: pd.DataFrame) -> plt.Figure:
    """One panel per loss term against the training step, one line per codec; log y except the rate."""
    terms = [t for t in CODEC_TERMS if t in set(data["term"])] or ["loss"]
    models = list(dict.fromkeys(data["model"]))
    pal = codec_palette(models)
    with style():
        fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.2), squeeze=False)
        for ax, t in zip(axes.flat, terms):
            for m in models:
                d = data[(data["model"] == m) & (data["term"] == t)]
                ax.plot(d["step"], d["value"], color=pal[m], label=m)
            ax.set_title(t)
            ax.set_xlabel("step")
            if t != "bpp_loss":
                ax.set_yscale("log")
        if models:
            axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
    return fig


def codec_rd_data(rd: pd.DataFrame, metrics: Sequence[str] = ("token_mse", "psnr")) -> pd.DataFrame:
    """The codec stage's ``rd.csv`` (``model, rate, bpp, psnr, token_mse``: real files, test images)
    as the :func:`rate_accuracy_data` table, for :func:`rate_accuracy`: codec = model, point = rate."""
    require(rd, ["model", "rate", "bpp", *metrics], "codec_rd")
    return rate_accuracy_data(rd.rename(columns={"model": "codec", "rate": "point"}).assign(kind="learned"), metrics)


def reconstruction_data(examples: pd.DataFrame) -> pd.DataFrame:
    """``outputs/codec/examples/examples.csv``: one decoded file per (codec, rate) of one image."""
    cols = ["model", "rate", "bpp", "psnr", "token_mse", "png"]
    require(examples, cols, "reconstruction")
    return examples[cols].reset_index(drop=True)


def reconstruction_grid(data: pd.DataFrame, folder: str | Path) -> plt.Figure:
    """The original beside each codec's decoded file at each rate (one row per codec);
    ``folder`` holds ``original.png`` and the files named in ``png``."""
    folder = Path(folder)
    models = list(dict.fromkeys(data["model"]))
    rates = sorted(set(data["rate"]))
    original = read_image_rgb(folder / "original.png")
    with style():
        fig, axes = plt.subplots(len(models), len(rates) + 1, figsize=(2.6 * (len(rates) + 1), 2.9 * len(models)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        for r, name in enumerate(models):
            axes[r, 0].imshow(original)
            axes[r, 0].set_title("original", fontsize=8)
            axes[r, 0].set_ylabel(name, fontsize=9)
            for c, rate in enumerate(rates, start=1):
                row = data[(data["model"] == name) & (data["rate"] == rate)]
                if row.empty:
                    axes[r, c].axis("off")
                    continue
                x = row.iloc[0]
                axes[r, c].imshow(read_image_rgb(folder / x["png"]))
                axes[r, c].set_title(f"rate {rate:.2f}: {x['bpp']:.3f} bpp\n"
                                     f"{x['psnr']:.1f} dB, token MSE {x['token_mse']:.3g}", fontsize=7)
        fig.tight_layout()
    return fig
