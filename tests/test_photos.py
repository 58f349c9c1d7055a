"""Photographs in the codec evaluation: params, reading mixed sizes, the per-image table, the figure."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmcompress.config import ConfigError
from vlmcompress.eval import codecs
from vlmcompress.eval.codecs import fit_side, photo_images, photos_folder
from vlmcompress.eval.tables import PHOTO_COLUMNS, photos_table
from vlmcompress.eval.config import check_eval_codec_params
from vlmcompress.eval.sweep import CodecSpec, code_images, make_pool
from vlmcompress.figures.photos import photos_rd, photos_rd_data


def natural(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients, waves and mild noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    img = np.stack([128 + 70 * np.sin(xx / (7 + c) + yy / 19) + 25 * np.cos(yy / 11) for c in range(3)], -1)
    return (img + rng.normal(0, 5, (h, w, 3))).clip(0, 255).astype(np.uint8)


def synthetic_photos_rd() -> pd.DataFrame:
    """A small photos_rd.csv as the eval stage writes it: 2 codecs x 2 points x 2 photos + means."""
    rows = []
    for codec, kind, pts in (("ours", "learned", (0.0, 3.0)), ("vvc", "anchor", (42, 32))):
        for i, p in enumerate(pts):
            for img, (w, h) in (("a", (96, 64)), ("b", (80, 120))):
                bpp = 0.1 * (i + 1) * (1.2 if img == "b" else 1.0)
                rows.append({"codec": codec, "kind": kind, "point": p, "image": img, "width": w, "height": h,
                             "nbytes": int(bpp * w * h / 8), "bpp": bpp, "psnr": 28 + 4 * i, "ms_ssim": 0.9 + 0.03 * i})
    per = pd.DataFrame(rows)
    return photos_table(per.drop(columns=["kind", "width", "height"]),
                        {"a": np.zeros((64, 96, 3), np.uint8), "b": np.zeros((120, 80, 3), np.uint8)},
                        {"ours": "learned", "vvc": "anchor"})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(natural(90, 130, 0)).save(d / "b wide.png")
    Image.fromarray(natural(150, 70, 1)).save(d / "a-tall.jpg", quality=95)
    Image.fromarray(natural(40, 40, 2)).save(d / "c.webp", lossless=True)
    return d


def test_params_photos_field(params) -> None:
    E = params.eval_codec
    assert E.photos is None                           # the embedded profile ships no photographs
    assert photos_folder(params) is None
    check_eval_codec_params(dataclasses.replace(E, photos="some/folder"))
    with pytest.raises(ConfigError, match=r'eval_codec\.photos: must be a folder of images or null'):
        check_eval_codec_params(dataclasses.replace(E, photos=" "))
    with pytest.raises(ConfigError, match=r"eval_codec\.photo_max_side: need 0 .* got 10"):
        check_eval_codec_params(dataclasses.replace(E, photo_max_side=10))
    with pytest.raises(ConfigError, match=r"eval_codec\.max_photos"):
        check_eval_codec_params(dataclasses.replace(E, max_photos=-1))


def test_photos_folder_is_checked_before_any_work(params, tmp_path, folder) -> None:
    p = dataclasses.replace(params, eval_codec=dataclasses.replace(params.eval_codec, photos=str(folder)))
    assert photos_folder(p) == folder
    (tmp_path / "empty").mkdir()
    bad = dataclasses.replace(params, eval_codec=dataclasses.replace(params.eval_codec, photos=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"^eval_codec\.photos: .*empty: no images in folder$"):
        codecs.check_stage_params(bad)


def test_photo_images_mixed_sizes_capped_and_fitted(folder) -> None:
    imgs = photo_images(folder, max_photos=2, max_side=100)
    assert list(imgs) == ["a-tall", "b_wide"]         # sorted by file name, the first two
    assert imgs["a-tall"].shape == (100, 47, 3) and imgs["b_wide"].shape == (69, 100, 3)
    every = photo_images(folder, max_photos=0, max_side=0)
    assert [v.shape for v in every.values()] == [(150, 70, 3), (90, 130, 3), (40, 40, 3)]
    img = natural(20, 200, 3)
    assert fit_side(img, 64).shape == (16, 64, 3)     # the short side stays >= 16 px
    assert fit_side(img, 0) is img


def test_photos_table_per_image_and_means(folder, tmp_path) -> None:
    imgs = photo_images(folder, max_photos=0, max_side=0)
    jobs = [(CodecSpec.anchor("jpeg"), [20, 80]), (CodecSpec.anchor("webp_fast", {"method": 0}, codec="webp"), [50])]
    with make_pool(0) as pool:
        rd = code_images(jobs, imgs, tmp_path / "cache", pool, progress=False)
    table = photos_table(rd, imgs, {"jpeg": "anchor", "webp_fast": "anchor"})
    assert list(table.columns) == list(PHOTO_COLUMNS)
    assert len(table) == 3 * 3 + 3                    # 3 (codec, point) x 3 photos, + 3 means
    assert list(table["codec"].unique()) == ["jpeg", "webp_fast"]
    for (codec, point), d in table.groupby(["codec", "point"]):
        each, mean = d[d["image"] != "mean"], d[d["image"] == "mean"].iloc[0]
        assert d["image"].iloc[-1] == "mean"
        for col in ("bpp", "psnr", "ms_ssim"):
            assert mean[col] == pytest.approx(each[col].mean())
    row = table[(table["codec"] == "jpeg") & (table["point"] == 80) & (table["image"] == "b_wide")].iloc[0]
    f = tmp_path / "cache" / "jpeg" / "q080" / "b_wide.jpg"
    assert row["nbytes"] == f.stat().st_size and row["bpp"] == pytest.approx(8 * f.stat().st_size / (90 * 130))
    assert (row["width"], row["height"]) == (130, 90)
    hi = table[(table["codec"] == "jpeg") & (table["image"] == "mean")].set_index("point")
    assert hi.loc[80, "bpp"] > hi.loc[20, "bpp"] and hi.loc[80, "psnr"] > hi.loc[20, "psnr"]
    # Without photos: the header only (the stage always writes it).
    empty = photos_table(pd.DataFrame(columns=list(rd.columns)), {}, {})
    assert empty.empty and list(empty.columns) == list(PHOTO_COLUMNS)


def test_photos_figure(tmp_path) -> None:
    table = synthetic_photos_rd()
    table.to_csv(tmp_path / "p.csv", index=False)
    data = photos_rd_data(pd.read_csv(tmp_path / "p.csv"))
    assert set(data["metric"]) == {"psnr", "ms_ssim"} and len(data) == 2 * len(table)
    fig = photos_rd(data)
    assert len(fig.axes) == 2 and "2 photographs" in fig._suptitle.get_text()
    assert "trained on the data set's scenes" in fig._suptitle.get_text()
    header_only = pd.read_csv(pd.io.common.StringIO(",".join(PHOTO_COLUMNS) + "\n"))
    empty = photos_rd(photos_rd_data(header_only))
    assert "eval_codec.photos" in empty.texts[0].get_text()
    with pytest.raises(ValueError, match="photos_rd: input has no column 'ms_ssim'"):
        photos_rd_data(table.drop(columns="ms_ssim"))
