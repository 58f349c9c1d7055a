"""One function per figure: a tidy DataFrame in, a matplotlib Figure out (seaborn styling).

Each ``*_data`` function builds the exact table its figure is drawn from (the stage writes
it as the figure's CSV), so a figure can be redrawn, or checked, from its CSV alone.
Styles are applied with seaborn's context managers, never as a process-wide theme.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)  # headless under papermill / DVC; a notebook keeps its backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from vlmcompress.images import read_image_rgb  # noqa: E402

# Fixed colours so a codec looks the same in every figure.
CODEC_COLOURS = {"ours": "#d62728", "pixel_baseline": "#ff7f0e", "vvc": "#1f77b4", "hevc": "#17becf",
                 "avif": "#2ca02c", "webp": "#9467bd", "jpeg": "#8c564b", "original": "#444444"}
METRIC_LABELS = {"vqa_acc": "VQA accuracy (%)", "caption_cider": "CIDEr", "retrieval_i2t_r1": "image→text R@1 (%)",
                 "retrieval_t2i_r1": "text→image R@1 (%)", "retrieval_i2t_r5": "image→text R@5 (%)",
                 "retrieval_t2i_r5": "text→image R@5 (%)", "grounding_acc50": "grounding acc@0.5 (%)",
                 "psnr": "PSNR (dB)", "ms_ssim": "MS-SSIM", "token_cos": "visual-token cosine",
                 "token_mse": "visual-token MSE"}
# Cell codes of outputs/tokens/examples.json (vlmcompress.tokens.types.KIND_*; 0 = the patch's
# token was dropped): name and the colour (RGBA) drawn over the patch.
TOKEN_KINDS = {0: ("dropped", (0.0, 0.0, 0.0, 0.55)), 1: ("salient", (0.84, 0.15, 0.16, 0.45)),
               2: ("recovered", (0.12, 0.47, 0.71, 0.55)), 3: ("merged centre", (1.0, 0.84, 0.0, 0.6)),
               4: ("global", (0.58, 0.40, 0.74, 0.5)), 5: ("pooled", (0.17, 0.63, 0.17, 0.45))}


@contextlib.contextmanager
def style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        yield


def log_x(ax: plt.Axes) -> None:
    """Log x axis labelled with plain numbers (0.1, 0.2, 0.5 ...), minor ticks unlabelled."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def codec_palette(names: Sequence[str]) -> dict[str, Any]:
    """Fixed colours for known codecs, then seaborn's for the rest (ablations)."""
    extra = iter(sns.color_palette("Set2", max(len(names), 1)))
    return {n: CODEC_COLOURS.get(n) or next(extra) for n in names}


def label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if metric.startswith("vqa_acc_"):
        return f"VQA {metric[8:]} (%)"
    return metric


def _require(df: pd.DataFrame, cols: Sequence[str], who: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{who}: input has no column {missing[0]!r} (has {', '.join(map(str, df.columns))})")


def _codec_order(df: pd.DataFrame) -> list[str]:
    """Learned codecs first (ours, pixel baseline, ablations), then the anchors as listed."""
    names = list(dict.fromkeys(df["codec"]))
    rank = {"ours": 0, "pixel_baseline": 1}
    kind = dict(zip(df["codec"], df.get("kind", pd.Series(["anchor"] * len(df)))))
    return sorted(names, key=lambda n: (rank.get(n, 2 if kind.get(n) == "learned" else 3), names.index(n)))


# --- rate vs accuracy -------------------------------------------------------------------------

def rate_accuracy_data(curves: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Long table ``codec, kind, point, bpp, metric, value`` (the uncoded reference included)."""
    _require(curves, ["codec", "kind", "point", "bpp", *metrics], "rate_accuracy")
    long = curves.melt(id_vars=["codec", "kind", "point", "bpp"], value_vars=list(metrics),
                       var_name="metric", value_name="value")
    return long.dropna(subset=["value"]).reset_index(drop=True)


def rate_accuracy(data: pd.DataFrame, title: str = "") -> plt.Figure:
    """One panel per metric: value vs bpp (log) per codec; the uncoded images as a dashed line."""
    metrics = list(dict.fromkeys(data["metric"]))
    coded = data[data["kind"] != "reference"]
    order = _codec_order(coded)
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
            ax.set_xlabel("bits per pixel")
            ax.set_ylabel(label(m))
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=pal[c], marker="o", label=c) for c in order]
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
    _require(bd, ["codec", "anchor", "metric", "bd_rate"], "bd_rate")
    d = bd[(bd["anchor"] == anchor) & bd["metric"].isin(list(metrics))]
    return d[["codec", "anchor", "metric", "bd_rate"]].reset_index(drop=True)


def bd_rate_heatmap(data: pd.DataFrame) -> plt.Figure:
    """codec x metric BD-rate (%) against the anchor; blue saves bits, red costs them; blank = undefined."""
    table = data.pivot(index="codec", columns="metric", values="bd_rate")
    table = table.reindex(index=_codec_order(data.assign(kind="anchor")),
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
    _require(curves, ["codec", "kind", "bpp", metric], "ablation")
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
    order = _codec_order(curve.assign(kind="learned"))
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


# --- token compression: accuracy vs tokens kept ------------------------------------------------------

def token_accuracy_data(acc: pd.DataFrame) -> pd.DataFrame:
    """``outputs/tokens/accuracy.csv`` rows, overall ('all') first, sorted by method and tokens."""
    _require(acc, ["method", "budget", "mean_tokens", "question_type", "acc"], "token_accuracy")
    d = acc.copy()
    d["question_type"] = d["question_type"].astype(str)
    first = (d["question_type"] != "all").astype(int)
    return d.assign(_o=first).sort_values(["_o", "question_type", "method", "mean_tokens"]).drop(columns="_o") \
        .reset_index(drop=True)


def token_accuracy(data: pd.DataFrame) -> plt.Figure:
    """Accuracy vs mean visual tokens kept, one line per method; one panel per question type."""
    types = list(dict.fromkeys(data["question_type"]))
    methods = list(dict.fromkeys(data["method"]))
    pal = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    cols = min(3, len(types))
    rows = math.ceil(len(types) / cols)
    with style():
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, t in zip(axes.flat, types):
            d = data[data["question_type"] == t]
            # A method with one operating point (all tokens) is a reference line, not a curve.
            single = [m for m in methods if d.loc[d["method"] == m, "mean_tokens"].nunique() == 1]
            curves = d[~d["method"].isin(single)]
            sns.lineplot(curves, x="mean_tokens", y="acc", hue="method", hue_order=methods, palette=pal,
                         marker="o", ax=ax, legend=False, estimator=None, sort=True)
            for m in single:
                ax.axhline(float(d.loc[d["method"] == m, "acc"].iloc[0]), ls="--", lw=1, color=pal[m])
            log_x(ax)
            ax.set_xlabel("visual tokens kept (mean)")
            ax.set_ylabel("VQA accuracy (%)")
            ax.set_title("all questions" if t == "all" else t)
        for ax in list(axes.flat)[len(types):]:
            ax.axis("off")
        one = {m for m in methods if data.loc[data["method"] == m, "mean_tokens"].nunique() == 1}
        handles = [plt.Line2D([], [], color=pal[m], marker=None if m in one else "o", ls="--" if m in one else "-",
                              label=m) for m in methods]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 6), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# --- token compression: accuracy vs prefill cost ---------------------------------------------------

COST_MEASURES = {"gflops": "prefill GFLOPs per question (vision tower, selection, LM)",
                 "latency_ms": "measured prefill latency (ms, median)"}


def token_cost_data(cost: pd.DataFrame, measure: str) -> pd.DataFrame:
    """``outputs/tokens/cost.csv`` as ``method, budget, tokens, ours, measure, cost, acc`` rows with
    ``cost`` = the column ``measure`` (``gflops`` or ``latency_ms``), sorted by method and cost;
    runs without a finite cost are left out."""
    if measure not in COST_MEASURES:
        raise ValueError(f"token_cost: unknown measure {measure!r} (known: {', '.join(COST_MEASURES)})")
    _require(cost, ["method", "budget", "tokens", "accuracy", "ours", measure], "token_cost")
    d = cost.assign(measure=measure, cost=pd.to_numeric(cost[measure], errors="coerce"), acc=cost["accuracy"],
                    ours=cost["ours"].astype(str).str.lower() == "true", budget=cost["budget"].astype(str))
    d = d[np.isfinite(d["cost"])]
    return d[["method", "budget", "tokens", "ours", "measure", "cost", "acc"]].sort_values(
        ["method", "cost"]).reset_index(drop=True)


def token_cost(data: pd.DataFrame) -> plt.Figure:
    """VQA accuracy vs prefill cost, one line per method (ours drawn thicker); a method with one
    operating point (all tokens) is a marker with a dashed accuracy line. Methods are compared
    at equal cost by reading across at one x."""
    measure = str(data["measure"].iloc[0]) if len(data) else "gflops"
    methods = list(dict.fromkeys(data["method"]))
    pal = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    ours = set(data.loc[data["ours"], "method"])
    with style():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in methods:
            d = data[data["method"] == m].sort_values("cost")
            if len(d) == 1 and m not in ours:
                ax.plot(d["cost"], d["acc"], marker="*", ms=10, ls="none", color=pal[m])
                ax.axhline(float(d["acc"].iloc[0]), ls="--", lw=1, color=pal[m])
                continue
            ax.plot(d["cost"], d["acc"], marker="o", ms=4, lw=2.6 if m in ours else 1.4, color=pal[m],
                    zorder=3 if m in ours else 2)
        ax.set_xlabel(COST_MEASURES.get(measure, measure))
        ax.set_ylabel("VQA accuracy (%)")
        handles = [plt.Line2D([], [], color=pal[m], marker="o", lw=2.6 if m in ours else 1.4,
                              label=f"{m} (ours)" if m in ours else m) for m in methods]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
    return fig


# --- example images -------------------------------------------------------------------------------

def codec_examples_data(examples: pd.DataFrame) -> pd.DataFrame:
    _require(examples, ["image", "codec", "bpp", "psnr", "file"], "codec_examples")
    return examples.reset_index(drop=True)


def codec_examples(data: pd.DataFrame, root: Path) -> plt.Figure:
    """Rows: images; columns: the original, then each codec at about the same bpp."""
    images = list(dict.fromkeys(data["image"].astype(str)))
    codecs = ["original"] + [c for c in _codec_order(data[data["codec"] != "original"])]
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


def _example_runs(e: Mapping[str, Any], i: int) -> tuple[str, list[int], list[tuple[str, Mapping[str, Any]]]]:
    """(image path, [grid rows, cols], [(method, run)]) of one examples.json entry.

    The tokens stage writes ``{image, grid: [h, w], methods: {m: {prediction, cells}}}``; a
    flat ``{image_path, grid: g, method, kinds, prediction}`` entry (one method) is read too.
    """
    if "methods" in e:
        missing = [k for k in ("image", "question", "grid") if k not in e]
        runs = [(str(m), r) for m, r in e["methods"].items()]
        path, grid, key = e.get("image"), e.get("grid"), "cells"
    else:
        missing = [k for k in ("image_path", "question", "method", "grid", "kinds") if k not in e]
        runs = [(str(e.get("method")), e)]
        path, grid, key = e.get("image_path"), e.get("grid"), "kinds"
    if missing:
        raise ValueError(f"tokens examples.json entry {i}: no {missing[0]!r}")
    gh, gw = (int(grid), int(grid)) if isinstance(grid, (int, float)) else (int(grid[0]), int(grid[1]))
    out = []
    for m, r in runs:
        cells = [int(k) for k in r.get(key, [])]
        if len(cells) != gh * gw or any(k not in TOKEN_KINDS for k in cells):
            raise ValueError(f"tokens examples.json entry {i} ({m}): {key} must be {gh}x{gw} values in "
                             f"{min(TOKEN_KINDS)}..{max(TOKEN_KINDS)}")
        out.append((m, {**r, "cells": cells}))
    return str(path), [gh, gw], out


def token_examples_data(examples: Sequence[Mapping[str, Any]], limit: int) -> pd.DataFrame:
    """Flatten ``outputs/tokens/examples.json`` for the first ``limit`` (image, question) pairs:
    one row per (example, method), the patch kinds as a digit string and their counts."""
    rows, pairs = [], {}
    names = [name.replace(" ", "_") for name, _ in TOKEN_KINDS.values()]
    for i, e in enumerate(examples):
        path, (gh, gw), runs = _example_runs(e, i)
        pair = pairs.setdefault((path, str(e["question"])), len(pairs))
        if pair >= limit:
            continue
        for method, r in runs:
            cells = r["cells"]
            rows.append({"example": pair, "image_path": path, "question": e["question"],
                         "answer": e.get("answer", ""), "method": method, "budget": e.get("budget", r.get("budget")),
                         "prediction": r.get("prediction", ""), "grid_h": gh, "grid_w": gw,
                         **{n: cells.count(k) for n, k in zip(names, TOKEN_KINDS)},
                         "kinds": "".join(map(str, cells))})
    cols = ["example", "image_path", "question", "answer", "method", "budget", "prediction", "grid_h", "grid_w",
            *names, "kinds"]
    return pd.DataFrame(rows, columns=cols)


def token_examples(data: pd.DataFrame, root: Path) -> plt.Figure:
    """Rows: (image, question) examples; columns: methods / budgets. Each patch is coloured by
    what the method did with its token (dropped, salient, recovered by the text, merged centre)."""
    groups = [d for _, d in data.groupby("example", sort=True)] if len(data) else []
    cols = max([len(d) for d in groups] + [1])
    with style():
        fig, axes = plt.subplots(max(len(groups), 1), cols, figsize=(2.6 * cols, 3.2 * max(len(groups), 1)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        if not groups:
            axes[0, 0].text(0.5, 0.5, "no token examples", ha="center", va="center")
        for i, d in enumerate(groups):
            for j, r in enumerate(d.itertuples()):
                ax = axes[i, j]
                path = Path(r.image_path)
                img = read_image_rgb(path if path.is_absolute() else root / path)
                gh, gw = int(r.grid_h), int(r.grid_w)
                kinds = np.array([int(c) for c in r.kinds]).reshape(gh, gw)
                over = np.array([TOKEN_KINDS[k][1] for k in kinds.ravel()]).reshape(gh, gw, 4)
                h, w = img.shape[:2]
                ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest")
                ax.imshow(over, extent=(0, w, h, 0), interpolation="nearest")
                kept = int((kinds != 0).sum())
                budget = "" if pd.isna(r.budget) or r.method == "full" else f" @{r.budget}"
                question = f"Q: {r.question} (answer: {r.answer})\n" if j == 0 else "\n"
                # Method and outcome on two lines: one line overran the next panel's title.
                ax.set_title(f"{question}{r.method}{budget}\n{kept}/{gh * gw} patches -> {r.prediction}",
                             fontsize=7, loc="left")
        shown = {int(k) for k in "".join(data["kinds"])} if len(data) else set()
        fig.legend(handles=[Patch(color=c, label=name) for k, (name, c) in TOKEN_KINDS.items() if k in shown],
                   loc="lower center", ncol=6, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
