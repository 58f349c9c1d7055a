"""Data stage figure: sample images with their boxes, category labels and a few questions.

Drawn by the data stage's notebook from image records. Separate from the other figures so
that stage's DVC dependencies name only what it draws (the data stage feeds every other).
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from vlmcompress.data.records import ImageRecord
from vlmcompress.figures.plots import style
from vlmcompress.images import read_image_rgb


def sample_grid(records: Sequence[ImageRecord], n_questions: int = 3, cols: int = 4) -> plt.Figure:
    """Each record's image with its boxes (category labels), its first ``n_questions``
    questions and answers below."""
    rows = max(math.ceil(len(records) / cols), 1)
    with style():
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        for ax, rec in zip(axes.flat, records):
            ax.imshow(read_image_rgb(rec.path))
            for o in rec.objects:
                x, y, w, h = o.bbox
                ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1, ec="white"))
                ax.text(x, y - 1, o.category, color="white", fontsize=6, va="bottom")
            qa = "\n".join(textwrap.shorten(f"Q: {q.question} A: {q.answer}", 48) for q in rec.questions[:n_questions])
            ax.set_title(f"#{rec.image_id}", fontsize=8)
            ax.set_xlabel(qa, fontsize=6, loc="left")
        for ax in list(axes.flat)[len(records):]:
            ax.axis("off")
        fig.tight_layout()
    return fig
