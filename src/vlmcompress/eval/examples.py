"""Decoded images of every codec at about equal bpp, for the eye and for the figures.

For each of the first ``n`` test images, each codec's point whose bpp *on that image* is
closest to one target bpp (log scale) is copied beside the original:
``examples/<image>/<codec>.png``, listed in ``examples.csv``.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlmcompress.eval.codecs import OURS
from vlmcompress.eval.sweep import CodecSpec, decoded_path
from vlmcompress.eval.tables import RAW_BPP, REFERENCE
from vlmcompress.io import atomic_path


def example_target_bpp(curves: pd.DataFrame, wanted: float) -> float:
    """The bpp examples are shown at: ``wanted``, else the median point of ours (or any codec)."""
    if wanted > 0:
        return wanted
    for sel in (curves["codec"] == OURS, curves["kind"] == "learned", curves["kind"] != "reference"):
        bpp = curves.loc[sel, "bpp"]
        if len(bpp):
            return float(np.exp(np.median(np.log(bpp))))
    raise ValueError("no coded points to pick examples from")


def pick_examples(rd: pd.DataFrame, target_bpp: float, images: Sequence[str]) -> pd.DataFrame:
    """For each image and codec, the point whose bpp *on that image* is closest to the target (log)."""
    d = rd[rd["image"].isin(list(images))].copy()
    d["gap"] = (np.log(d["bpp"]) - math.log(target_bpp)).abs()
    best = d.loc[d.groupby(["image", "codec"], sort=False)["gap"].idxmin()]
    return best.drop(columns="gap").reset_index(drop=True)


def write_examples(rd: pd.DataFrame, curves: pd.DataFrame, images: Mapping[str, np.ndarray],
                   specs: Mapping[str, CodecSpec], cache: Path, out: Path, n: int, wanted_bpp: float
                   ) -> pd.DataFrame:
    """Copy decoded images of the first ``n`` images at about equal bpp (and the originals)
    to ``out/examples/<image>/<codec>.png``; list them in ``out/examples.csv``."""
    from PIL import Image

    if n == 0 or rd.empty:
        return pd.DataFrame()
    target = example_target_bpp(curves, wanted_bpp)
    chosen = list(images)[:n]
    ex = pick_examples(rd, target, chosen)
    with atomic_path(out / "examples") as tmp:
        rows = []
        for key in chosen:
            (tmp / key).mkdir(parents=True)
            Image.fromarray(images[key]).save(tmp / key / f"{REFERENCE}.png")
            rows.append({"image": key, "codec": REFERENCE, "kind": "reference", "point": np.nan,
                         "bpp": RAW_BPP, "psnr": np.nan, "ms_ssim": 1.0, "target_bpp": target,
                         "file": f"examples/{key}/{REFERENCE}.png"})
        for e in ex.itertuples():
            spec = specs[e.codec]
            shutil.copyfile(decoded_path(cache, spec, e.point, e.image), tmp / e.image / f"{e.codec}.png")
            rows.append({"image": e.image, "codec": e.codec, "kind": spec.kind, "point": e.point,
                         "bpp": e.bpp, "psnr": e.psnr, "ms_ssim": e.ms_ssim, "target_bpp": target,
                         "file": f"examples/{e.image}/{e.codec}.png"})
    table = pd.DataFrame(rows)
    with atomic_path(out / "examples.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table
