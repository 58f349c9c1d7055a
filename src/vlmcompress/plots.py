"""Figures shared by the notebooks and the figures stage (matplotlib/seaborn, no logic)."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from vlmcompress.data.records import ImageRecord
from vlmcompress.images import read_image_rgb
from vlmcompress.io import atomic_path

if TYPE_CHECKING:
    import pandas as pd


def sample_grid(records: Sequence[ImageRecord], n_questions: int = 3, cols: int = 4) -> plt.Figure:
    """Images with their boxes (category labels) and a few questions with answers below."""
    rows = int(np.ceil(len(records) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.2 * rows), squeeze=False)
    for ax, rec in zip(axes.flat, records):
        ax.imshow(read_image_rgb(rec.path))
        for o in rec.objects:
            x, y, w, h = o.bbox
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1, ec="white"))
            ax.text(x, y - 1, o.category, color="white", fontsize=6, va="bottom")
        qa = "\n".join(textwrap.shorten(f"Q: {q.question} A: {q.answer}", 48)
                       for q in rec.questions[:n_questions])
        ax.set_title(f"#{rec.image_id}", fontsize=8)
        ax.set_xlabel(qa, fontsize=6, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats``, atomically."""
    out = []
    for fmt in formats:
        target = Path(path).with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        out.append(target)
    return out


def training_curves(curves: "pd.DataFrame") -> plt.Figure:
    """Loss per phase (in training order) and, where logged, the quick validation accuracy of
    the LM phase."""
    order = ("clip", "text", "align", "lm")      # a reused phase's rows may come after later ones
    seen = list(dict.fromkeys(curves["phase"]))
    phases = [p for p in order if p in seen] + [p for p in seen if p not in order]
    fig, axes = plt.subplots(1, len(phases) + 1, figsize=(4 * (len(phases) + 1), 3.2))
    for ax, ph in zip(axes, phases):
        d = curves[curves["phase"] == ph]
        ax.plot(d["step"], d["loss"], marker=".")
        ax.set_title(f"phase {ph}: loss")
        ax.set_xlabel("step")
    ax = axes[-1]
    if "val_acc" in curves:
        d = curves.dropna(subset=["val_acc"])
        ax.plot(d["seconds"], d["val_acc"], marker="o")
    ax.set_title("LM phase: val VQA accuracy (%)")
    ax.set_xlabel("seconds into the phase")
    fig.tight_layout()
    return fig


def accuracy_table(metrics: dict) -> "pd.DataFrame":
    """VQA accuracy per question type beside the most-common-answer baseline (percent)."""
    import pandas as pd
    rows = {t: {"accuracy": a, "majority baseline": metrics["vqa_majority_acc_by_type"].get(t),
                "margin": round(a - metrics["vqa_majority_acc_by_type"].get(t, 0.0), 2)}
            for t, a in metrics["vqa_acc_by_type"].items()}
    rows["overall"] = {"accuracy": metrics["vqa_acc"], "majority baseline": metrics["vqa_majority_acc"],
                       "margin": round(metrics["vqa_acc"] - metrics["vqa_majority_acc"], 2)}
    return pd.DataFrame(rows).T


def codec_curves(curves: "pd.DataFrame", window: int = 5) -> plt.Figure:
    """Training curves of every codec (rolling mean over ``window`` logged rows: each step
    draws its own rate, so raw rows jump): loss, estimated bpp, and each distortion term."""
    terms = [t for t in ("bpp_loss", "token_mse", "token_cos", "rank_loss", "pixel_mse", "lowpass_mse") if t in curves]
    fig, axes = plt.subplots(1, len(terms) + 1, figsize=(3.6 * (len(terms) + 1), 3.2))
    for name, d in curves.groupby("model", sort=False):
        for ax, col in zip(axes, ["loss", *terms]):
            if col in d and d[col].notna().any():
                ax.plot(d["step"], d[col].rolling(window, min_periods=1).mean(), label=name)
    for ax, col in zip(axes, ["loss", *terms]):
        ax.set_title(col)
        ax.set_xlabel("step")
        if col != "bpp_loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
# --- token compression (05_eval_tokens, 06_figures) ---------------------------------------

# Colours of the grid-cell roles in outputs/tokens/examples.json (KIND_* codes of vlmcompress.tokens).
TOKEN_CELL_STYLE = {1: ("salient (attention)", "#1f77b4"), 2: ("recovered (text)", "#d62728"),
                    3: ("merge centre", "#ff7f0e"), 5: ("pooled", "#7f7f7f")}


def token_accuracy_curves(acc: "pd.DataFrame", question_type: str = "all") -> plt.Figure:
    """VQA accuracy against the mean number of visual tokens, one line per method (fixed
    budgets), adaptive modes as stars, full tokens as a dashed line. ``acc``: the stage's
    ``accuracy.csv``."""
    import seaborn as sns

    d = acc[acc.question_type == question_type]
    full = d[d.method == "full"]
    fixed = d[(d.method != "full") & (d.budget != "adaptive")]
    adaptive = d[d.budget == "adaptive"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(data=fixed, x="mean_tokens", y="acc", hue="method", marker="o", ax=ax)
    palette = {t.get_text(): line.get_color() for t, line in zip(ax.get_legend().get_texts(), ax.get_lines())}
    for row in adaptive.itertuples():
        ax.scatter(row.mean_tokens, row.acc, marker="*", s=160, color=palette.get(row.method, "k"),
                   edgecolor="k", zorder=5)
    if len(full):
        ax.axhline(float(full.acc.iloc[0]), ls="--", c="k", lw=1, label=f"full ({int(full.mean_tokens.iloc[0])} tokens)")
    ax.set_xscale("log")
    ticks = sorted({int(round(v)) for v in d.mean_tokens})
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("visual tokens given to the LM (mean; log scale; ★ adaptive)")
    ax.set_ylabel(f"VQA accuracy, {question_type} (%)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def reconstruction_grid(examples: "pd.DataFrame", folder: str | Path) -> plt.Figure:
    """The original beside each codec's decoded file at each rate (one row per codec)."""
    folder = Path(folder)
    models = list(dict.fromkeys(examples["model"]))
    rates = sorted(set(examples["rate"]))
    fig, axes = plt.subplots(len(models), len(rates) + 1, figsize=(2.6 * (len(rates) + 1), 2.9 * len(models)),
                             squeeze=False)
    original = read_image_rgb(folder / "original.png")
    for r, name in enumerate(models):
        axes[r, 0].imshow(original)
        axes[r, 0].set_title("original", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=9)
        for c, rate in enumerate(rates, start=1):
            row = examples[(examples["model"] == name) & (examples["rate"] == rate)].iloc[0]
            axes[r, c].imshow(read_image_rgb(folder / row["png"]))
            axes[r, c].set_title(f"rate {rate:.2f}: {row['bpp']:.3f} bpp\n"
                                 f"{row['psnr']:.1f} dB, token MSE {row['token_mse']:.3g}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def rd_curves(rd: "pd.DataFrame") -> plt.Figure:
    """Token distortion and PSNR against real-file bpp, one line per codec (points: rates)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, d in rd.groupby("model", sort=False):
        d = d.sort_values("bpp")
        axes[0].plot(d["bpp"], d["token_mse"], marker="o", label=name)
        axes[1].plot(d["bpp"], d["psnr"], marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("token MSE (LVLM vision features)")
    axes[1].set_ylabel("PSNR (dB)")
    for ax in axes:
        ax.set_xlabel("bpp (file bytes x 8 / pixels)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
def token_maps(examples: Sequence[dict], methods: Sequence[str] | None = None) -> plt.Figure:
    """For each example question (rows), the image with each method's token roles drawn over
    the patch grid (columns): kept by attention, recovered by the question, merge centres."""
    methods = list(methods or examples[0]["methods"])
    fig, axes = plt.subplots(len(examples), len(methods), figsize=(2.4 * len(methods), 2.7 * len(examples)),
                             squeeze=False)
    for row, ex in zip(axes, examples):
        img = read_image_rgb(ex["image"])
        gh, gw = ex["grid"]
        ch, cw = img.shape[0] / gh, img.shape[1] / gw
        for ax, m in zip(row, methods):
            ax.imshow(img)
            res = ex["methods"][m]
            every = all(k == 1 for k in res["cells"])      # all tokens kept: nothing to mark
            for i, kind in enumerate(res["cells"]):
                if kind in TOKEN_CELL_STYLE and not every:
                    r, c = divmod(i, gw)
                    ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=True, alpha=0.35, lw=0.6,
                                           fc=TOKEN_CELL_STYLE[kind][1], ec=TOKEN_CELL_STYLE[kind][1]))
            ok = "✓" if res["correct"] else "✗"
            ax.set_title(f"{m}: {textwrap.shorten(res['prediction'] or '∅', 14)} {ok}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(textwrap.fill(f"{ex['question']} → {ex['answer']}", 28), fontsize=7)
    handles = [Rectangle((0, 0), 1, 1, fc=c, alpha=0.5) for _, c in TOKEN_CELL_STYLE.values()]
    fig.legend(handles, [n for n, _ in TOKEN_CELL_STYLE.values()], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig
