"""Token-compression figures: accuracy against visual tokens kept and against prefill cost,
grounding against the share of tokens kept, and what each method did with each patch on
example questions.

Drawn from the tokens stage's tables (``outputs/tokens/{accuracy.csv, cost.csv, grounding.csv,
examples.json}``) by its notebook and by the figures stage. Separate from the codec figures
(:mod:`vlmcompress.figures.codec`) so a stage's DVC dependencies name only the figures it draws.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Patch

from vlmcompress.figures.plots import label, log_x, require, style
from vlmcompress.images import read_image_rgb

# Cell codes of outputs/tokens/examples.json (vlmcompress.tokens.types.KIND_*; 0 = the patch's
# token was dropped): name and the colour (RGBA) drawn over the patch.
TOKEN_KINDS = {0: ("dropped", (0.0, 0.0, 0.0, 0.55)), 1: ("salient", (0.84, 0.15, 0.16, 0.45)),
               2: ("recovered", (0.12, 0.47, 0.71, 0.55)), 3: ("merged centre", (1.0, 0.84, 0.0, 0.6)),
               4: ("global", (0.58, 0.40, 0.74, 0.5)), 5: ("pooled", (0.17, 0.63, 0.17, 0.45))}


# --- token compression: accuracy vs tokens kept ------------------------------------------------------

def token_accuracy_data(acc: pd.DataFrame) -> pd.DataFrame:
    """``outputs/tokens/accuracy.csv`` rows, overall ('all') first, sorted by method and tokens."""
    require(acc, ["method", "budget", "mean_tokens", "question_type", "acc"], "token_accuracy")
    d = acc.copy()
    d["question_type"] = d["question_type"].astype(str)
    first = (d["question_type"] != "all").astype(int)
    return d.assign(_o=first).sort_values(["_o", "question_type", "method", "mean_tokens"]).drop(columns="_o") \
        .reset_index(drop=True)


def token_accuracy(data: pd.DataFrame) -> plt.Figure:
    """Accuracy vs mean visual tokens kept, one line per method over its fixed budgets, its
    adaptive mode (``budget == 'adaptive'``) as a star; one panel per question type."""
    types = list(dict.fromkeys(data["question_type"]))
    methods = list(dict.fromkeys(data["method"]))
    pal = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    adaptive = data["budget"].astype(str) == "adaptive"
    fixed = data[~adaptive]
    cols = min(3, len(types))
    rows = math.ceil(len(types) / cols)
    with style():
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, t in zip(axes.flat, types):
            d = fixed[fixed["question_type"] == t]
            # A method with one operating point (all tokens) is a reference line, not a curve.
            single = [m for m in methods if d.loc[d["method"] == m, "mean_tokens"].nunique() == 1]
            curves = d[~d["method"].isin(single)]
            sns.lineplot(curves, x="mean_tokens", y="acc", hue="method", hue_order=methods, palette=pal,
                         marker="o", ax=ax, legend=False, estimator=None, sort=True)
            for m in single:
                ax.axhline(float(d.loc[d["method"] == m, "acc"].iloc[0]), ls="--", lw=1, color=pal[m])
            # Adaptive modes pick their own token count: points, not part of the budget curve.
            for r in data[adaptive & (data["question_type"] == t)].itertuples():
                ax.scatter(r.mean_tokens, r.acc, marker="*", s=120, color=pal[r.method], edgecolor="k", zorder=5)
            log_x(ax)
            ax.set_xlabel("visual tokens kept (mean)")
            ax.set_ylabel("VQA accuracy (%)")
            ax.set_title("all questions" if t == "all" else t)
        for ax in list(axes.flat)[len(types):]:
            ax.axis("off")
        one = {m for m in methods if fixed.loc[fixed["method"] == m, "mean_tokens"].nunique() == 1}
        handles = [plt.Line2D([], [], color=pal[m], marker=None if m in one else "o", ls="--" if m in one else "-",
                              label=m) for m in methods]
        if adaptive.any():
            handles.append(plt.Line2D([], [], color="grey", marker="*", ms=10, mec="k", ls="none",
                                      label="adaptive budget"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
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
    require(cost, ["method", "budget", "tokens", "accuracy", "ours", measure], "token_cost")
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


# --- token compression: grounding vs tokens kept ---------------------------------------------------

def token_grounding_data(grounding: pd.DataFrame) -> pd.DataFrame:
    """``outputs/tokens/grounding.csv`` rows that were scored (runs without referring expressions
    have no accuracy and are left out), sorted by method and kept-token fraction."""
    require(grounding, ["method", "budget", "kept_fraction", "grounding_acc50"], "token_grounding")
    d = grounding.assign(budget=grounding["budget"].astype(str),
                         kept_fraction=pd.to_numeric(grounding["kept_fraction"], errors="coerce"),
                         grounding_acc50=pd.to_numeric(grounding["grounding_acc50"], errors="coerce"))
    d = d[np.isfinite(d["kept_fraction"]) & np.isfinite(d["grounding_acc50"])]
    return d.sort_values(["method", "kept_fraction"]).reset_index(drop=True)


def token_grounding(data: pd.DataFrame) -> plt.Figure:
    """Grounding accuracy at IoU >= 0.5 vs the fraction of visual tokens kept, one line per
    method; the full model (every token) as a dashed reference line. Without scored runs (no
    referring expressions), a note instead of curves."""
    methods = list(dict.fromkeys(data["method"]))
    pal = dict(zip(methods, sns.color_palette("tab10", max(len(methods), 1))))
    with style():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if not len(data):
            ax.axis("off")
            ax.text(0.5, 0.5, "no grounding scores (no referring expressions)", ha="center", va="center")
            return fig
        for m in methods:
            d = data[data["method"] == m]
            if m == "full":
                ax.axhline(float(d["grounding_acc50"].iloc[0]), ls="--", lw=1.2, color=pal[m])
                continue
            ax.plot(d["kept_fraction"], d["grounding_acc50"], marker="o", ms=4, lw=1.4, color=pal[m])
        log_x(ax)
        ax.set_xlabel("fraction of visual tokens kept (mean)")
        ax.set_ylabel(label("grounding_acc50"))
        handles = [plt.Line2D([], [], color=pal[m], ls="--" if m == "full" else "-",
                              marker=None if m == "full" else "o", label="full (every token)" if m == "full" else m)
                   for m in methods]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
    return fig


# --- token compression: example questions ---------------------------------------------------------

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
