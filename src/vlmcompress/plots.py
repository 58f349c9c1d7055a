"""Figures shared by the notebooks and the figures stage (matplotlib/seaborn, no logic)."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image

from vlmcompress.data.records import ImageRecord
from vlmcompress.io import atomic_path

if TYPE_CHECKING:
    import pandas as pd


def sample_grid(records: Sequence[ImageRecord], n_questions: int = 3, cols: int = 4) -> plt.Figure:
    """Images with their boxes (category labels) and a few questions with answers below."""
    rows = int(np.ceil(len(records) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.2 * rows), squeeze=False)
    for ax, rec in zip(axes.flat, records):
        ax.imshow(np.asarray(Image.open(rec.path).convert("RGB")))
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
    """Loss per phase and, where logged, the quick validation accuracy of the LM phase."""
    phases = list(dict.fromkeys(curves["phase"]))
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
