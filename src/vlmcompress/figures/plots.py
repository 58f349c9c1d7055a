"""What every figure shares: the headless backend, seaborn styling, fixed colours, axis labels,
input checks and saving.

The figures themselves live by family (``codec``, ``tokens``, ``lvlm``, ``dataset``): one
``*_data`` function that builds the exact table a figure is drawn from (the figures stage
writes it as the figure's CSV, so a figure can be redrawn, or checked, from its CSV alone) and
one drawing function, a tidy DataFrame in, a matplotlib Figure out. Styles are applied with
seaborn's context managers, never as a process-wide theme.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless under DVC and the CLI. A Jupyter kernel (papermill included) names its inline
# backend in MPLBACKEND; selecting Agg there would stop its figures from showing.
if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from vlmcompress.io import atomic_path  # noqa: E402

# Fixed colours so a codec looks the same in every figure.
CODEC_COLOURS = {"ours": "#d62728", "pixel_baseline": "#ff7f0e", "vvc": "#1f77b4", "hevc": "#17becf",
                 "avif": "#2ca02c", "webp": "#9467bd", "jpeg": "#8c564b", "original": "#444444"}
METRIC_LABELS = {"vqa_acc": "VQA accuracy (%)", "caption_cider": "CIDEr", "retrieval_i2t_r1": "image→text R@1 (%)",
                 "retrieval_t2i_r1": "text→image R@1 (%)", "retrieval_i2t_r5": "image→text R@5 (%)",
                 "retrieval_t2i_r5": "text→image R@5 (%)", "grounding_acc50": "grounding acc@0.5 (%)",
                 "psnr": "PSNR (dB)", "ms_ssim": "MS-SSIM", "token_cos": "visual-token cosine",
                 "token_mse": "visual-token MSE"}
# Metrics that span decades, drawn on a log y axis.
LOG_METRICS = frozenset({"token_mse"})


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


def require(df: pd.DataFrame, cols: Sequence[str], who: str) -> None:
    """A one-line error naming the first of ``cols`` that ``df`` lacks."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{who}: input has no column {missing[0]!r} (has {', '.join(map(str, df.columns))})")


def codec_order(df: pd.DataFrame) -> list[str]:
    """Learned codecs first (ours, pixel baseline, ablations), then the anchors as listed."""
    names = list(dict.fromkeys(df["codec"]))
    rank = {"ours": 0, "pixel_baseline": 1}
    kind = dict(zip(df["codec"], df.get("kind", pd.Series(["anchor"] * len(df)))))
    return sorted(names, key=lambda n: (rank.get(n, 2 if kind.get(n) == "learned" else 3), names.index(n)))


def save_figure(fig: plt.Figure, path: str | Path, formats: Sequence[str] = ("png",), dpi: int = 150) -> list[Path]:
    """``path`` with each suffix in ``formats``, atomically; the figure stays open.

    No date and fixed element ids keep SVG/PDF bytes identical between runs (DVC sees no change)."""
    out = []
    for fmt in formats:
        target = Path(path).with_suffix(f".{fmt}")
        with atomic_path(target) as tmp, plt.rc_context({"svg.hashsalt": "vlmcompress"}):
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight",
                        metadata={"Date": None} if fmt in ("svg", "pdf") else None)
        out.append(target)
    return out
