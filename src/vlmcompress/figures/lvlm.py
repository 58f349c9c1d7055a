"""LVLM stage figures: the training curves of each phase and the accuracy table.

Drawn by the lvlm stage's notebook from ``outputs/lvlm/curves.csv`` and its metrics. Separate
from the codec and token figures so that stage's DVC dependencies name only what it draws.
"""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from vlmcompress.figures.plots import require, style

# Training order of the phases; a phase resumed later may log rows after later phases.
PHASES = ("clip", "text", "align", "lm")


def training_curves_data(curves: pd.DataFrame) -> pd.DataFrame:
    """``outputs/lvlm/curves.csv`` rows with the phases in training order (unknown phases after,
    as first logged); rows keep their logged order within a phase."""
    require(curves, ["phase", "step", "loss"], "training_curves")
    seen = list(dict.fromkeys(curves["phase"]))
    order = [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]
    rank = curves["phase"].map({p: i for i, p in enumerate(order)})
    return curves.assign(_o=rank).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def training_curves(data: pd.DataFrame) -> plt.Figure:
    """Loss against the step, one panel per phase, and, where logged, the LM phase's quick
    validation accuracy against its seconds."""
    phases = list(dict.fromkeys(data["phase"]))
    with style():
        fig, axes = plt.subplots(1, len(phases) + 1, figsize=(4 * (len(phases) + 1), 3.2), squeeze=False)
        for ax, ph in zip(axes.flat, phases):
            d = data[data["phase"] == ph]
            ax.plot(d["step"], d["loss"], marker=".")
            ax.set_title(f"phase {ph}: loss")
            ax.set_xlabel("step")
        ax = axes[0, -1]
        if "val_acc" in data and "seconds" in data:
            d = data.dropna(subset=["val_acc"])
            ax.plot(d["seconds"], d["val_acc"], marker="o")
        ax.set_title("LM phase: val VQA accuracy (%)")
        ax.set_xlabel("seconds into the phase")
        fig.tight_layout()
    return fig


def accuracy_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """VQA accuracy per question type beside the most-common-answer baseline (percent), from the
    lvlm stage's metrics; the last row is over all questions."""
    majority = metrics["vqa_majority_acc_by_type"]
    rows = {t: {"accuracy": a, "majority baseline": majority.get(t), "margin": round(a - majority.get(t, 0.0), 2)}
            for t, a in metrics["vqa_acc_by_type"].items()}
    rows["overall"] = {"accuracy": metrics["vqa_acc"], "majority baseline": metrics["vqa_majority_acc"],
                       "margin": round(metrics["vqa_acc"] - metrics["vqa_majority_acc"], 2)}
    return pd.DataFrame(rows).T
