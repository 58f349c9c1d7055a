"""Rate-distortion of every codec on the user's photographs (``outputs/eval_codec/photos_rd.csv``).

Two panels, PSNR and MS-SSIM against bpp (log), one curve per codec through the mean of each
rate point over the photos, per-image points faint behind it. The learned codecs are trained
on the data set's scenes, and the figure says so: on photographs it shows how far that
training carries. Without photographs (``eval_codec.photos: null``) the CSV has only its
header and the figure says how to get one, so the stage's outputs always exist.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from vlmcompress.figures.plots import codec_order, codec_palette, label, log_x, require, style

MEAN = "mean"           # image name of the mean rows (vlmcompress.eval.tables.PHOTO_MEAN)
METRICS = ("psnr", "ms_ssim")
NOTE = "learned codecs trained on the data set's scenes, not on photographs"


def photos_rd_data(photos: pd.DataFrame) -> pd.DataFrame:
    """Long table ``codec, kind, point, image, bpp, metric, value`` (mean rows included)."""
    require(photos, ["codec", "kind", "point", "image", "bpp", *METRICS], "photos_rd")
    long = photos.melt(id_vars=["codec", "kind", "point", "image", "bpp"], value_vars=list(METRICS),
                       var_name="metric", value_name="value")
    return long.dropna(subset=["bpp", "value"]).reset_index(drop=True)


def photos_rd(data: pd.DataFrame) -> plt.Figure:
    """PSNR and MS-SSIM vs bpp per codec: the means as lines, every photo as faint dots."""
    with style():
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4), squeeze=False)
        if data.empty:
            fig.text(0.5, 0.5, "no photographs: set eval_codec.photos to a folder of images",
                     ha="center", va="center")
            for ax in axes.flat:
                ax.axis("off")
            return fig
        order = codec_order(data)
        pal = codec_palette(order)
        n_photos = data.loc[data["image"] != MEAN, "image"].nunique()
        for ax, m in zip(axes.flat, METRICS):
            d = data[data["metric"] == m]
            each, mean = d[d["image"] != MEAN], d[d["image"] == MEAN].sort_values("bpp")
            sns.scatterplot(each, x="bpp", y="value", hue="codec", hue_order=order, palette=pal, s=8,
                            alpha=0.25, linewidth=0, ax=ax, legend=False)
            sns.lineplot(mean, x="bpp", y="value", hue="codec", hue_order=order, palette=pal, marker="o",
                         markersize=4, ax=ax, legend=False, sort=True, estimator=None)
            log_x(ax)
            ax.set_xlabel("bits per pixel")
            ax.set_ylabel(label(m))
        handles = [plt.Line2D([], [], color=pal[c], marker="o", label=c) for c in order]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False,
                   bbox_to_anchor=(0.5, -0.04))
        fig.suptitle(f"{n_photos} photographs: mean per rate point, each photo faint ({NOTE})", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
