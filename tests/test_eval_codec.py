"""The codec-evaluation stage on a tiny world: 3 scenes, a tiny LVLM, two tiny learned codecs,
JPEG + VVC; plus the BD tables, the cache and the process pool on their own."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from vlmcompress.codec.config import (CodecModelParams, CodecParams, CodecTrainParams, LossParams,
                                      PreEditParams)
from vlmcompress.codec.model import build_codec
from vlmcompress.codec.train import save_codec, train_codec
from vlmcompress.config import ConfigError, from_dict, Params
from vlmcompress.eval import sweep
from vlmcompress.eval.codec_stage import run_eval_codec_stage
from vlmcompress.eval.codecs import anchor_codecs, check_stage_params, learned_codecs
from vlmcompress.eval.examples import pick_examples
from vlmcompress.eval.tables import PHOTO_COLUMNS, bd_tables, headline, target_report
from vlmcompress.eval.sweep import CodecSpec, code_images, make_pool
from vlmcompress.lvlm import load_lvlm

from codec_helpers import lively, make_image
from lvlm_helpers import TINY, save_tiny_lvlm

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ("vqa_acc", "caption_cider", "retrieval_i2t_r1", "retrieval_t2i_r1", "grounding_acc50", "psnr")


def _codec_params(tokens: bool) -> CodecParams:
    return CodecParams(
        model=CodecModelParams(name="gained-mean-scale-hyperprior", N=8, M=12, levels=3, gain_init=(0.5, 2.0),
                               hyper_gain=True,
                               preedit=PreEditParams(enabled=tokens, channels=4, depth=2, use_tokens=tokens,
                                                     token_dim=TINY.vision_hidden, token_channels=4)),
        loss=LossParams(lambdas=[0.5, 1.0, 2.0], w_token_mse=1.0 if tokens else 0.0, w_token_cos=0.0,
                        w_rank=0.0, rank_mode="spectrum", w_pixel=0.001 if tokens else 1.0),
        train=CodecTrainParams(seed=0, steps=1, batch_size=2, patch_size=64, lr=1e-3, aux_lr=1e-2,
                               lr_decay_at=1.0, grad_clip=0.0, rate_sampling="continuous", checkpoint_every=1,
                               log_every=1, quantile_update=False))


def _tiny_lvlm(where: Path):
    folder = save_tiny_lvlm(where)
    return load_lvlm(str(folder / "llava"), str(folder / "clip"))


def _stage_params(root: Path, folder: Path) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["scenes"].update(n_train=2, n_val=1, n_test=3)
    p["data"]["image_folders"] = [str(folder)]
    p["anchors"].update(codecs=[{"name": "jpeg"}, {"name": "vvc", "options": {"preset": "faster"}}],
                        n_points=2, n_calibration=1, qualities={"vvc": [45, 33]})
    p["eval_codec"].update(n_images=3, max_questions=6, max_captions=1, max_refs=3, batch_size=4,
                           learned_rates=[], anchor_span=1.5, workers=0, n_examples=2, example_bpp=0.0,
                           photos="photos", max_photos=2, photo_max_side=64)   # relative to the root
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A throw-away project root with data, two learned codecs and an image folder; the LVLM."""
    from vlmcompress.config import load_params
    from vlmcompress.data.generate import generate_scenes
    from vlmcompress.data.dataset import load_all

    root = tmp_path_factory.mktemp("evalroot")
    folder = root / "extra"
    folder.mkdir()
    for i, (h, w) in enumerate([(30, 41), (48, 36)]):
        Image.fromarray(make_image(h, w)).save(folder / f"img {i}.png")
    (root / "photos").mkdir()
    for name, (h, w) in {"p1.png": (40, 56), "p2.jpg": (96, 72), "p3.png": (20, 20)}.items():
        Image.fromarray(make_image(h, w)).save(root / "photos" / name)   # p3: past max_photos
    _stage_params(root, folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMCOMPRESS_ROOT", str(root))
        P = load_params(root / "params.yaml")
        generate_scenes(P.data.scenes, root / "outputs/data/dataset", workers=1)
        splits = load_all(root / "outputs/data/dataset")
        lvlm = _tiny_lvlm(root / "outputs/lvlm/model")     # where lvlm_from_params looks
        models = root / "outputs/codec/models"
        train = torch.stack([torch.from_numpy(np.array(Image.open(r.path).convert("RGB"))).permute(2, 0, 1)
                             for r in splits["train"]])
        # `ours`: the trainer's own layout (model/ inside); the baseline: a bare saved model.
        res = train_codec(_codec_params(True), train, lambda x: lvlm.visual_features(x).hidden,
                          models / "ours", resume=False)
        save_codec(lively(res.model, seed_edit=1), models / "ours" / "model", params=_codec_params(True))
        torch.manual_seed(1)
        save_codec(lively(build_codec(_codec_params(False).model)), models / "pixel_baseline")
        yield {"root": root, "params": P, "splits": splits, "lvlm": lvlm, "mp": mp}


@pytest.fixture(scope="module")
def first_run(world):
    metrics = run_eval_codec_stage(world["params"], world["splits"], lvlm=world["lvlm"], progress=False,
                                   log=lambda s: None)
    return metrics


def test_stage_writes_the_metrics_contract(world, first_run):
    m = first_run
    out = world["root"] / "outputs/eval_codec"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    # A flat headline: every value a number, a string or null; the tables are the CSVs.
    assert all(v is None or isinstance(v, (int, float, str)) for v in m.values()) and len(m) <= 32
    assert m["anchor"] == "vvc"
    for metric in CONTRACT:
        v = m[f"ours_bd_rate_{metric}"]
        assert v is None or math.isfinite(v)
    v = m["ours_bd_rate_vs_pixel_baseline_vqa_acc"]
    assert v is None or math.isfinite(v)
    assert m["n_images"] == 3 and m["vqa_questions"] == 6 and m["n_photos"] == 2
    assert 0 < m["ours_bpp_min"] <= m["ours_bpp_max"] and 0 < m["anchor_bpp_min"] < m["anchor_bpp_max"]
    assert m["processes"] == 1 and m["image_sets_per_process"] == "9"           # 4 codecs x 2 points + uncoded
    bd = pd.read_csv(out / "bd_table.csv")
    vs_anchor = bd[bd["anchor"] == "vvc"]
    assert set(vs_anchor["codec"]) == {"ours", "pixel_baseline", "jpeg"}        # every codec but the anchor
    for codec, d in vs_anchor.groupby("codec"):
        assert set(CONTRACT) <= set(d["metric"]), codec
    assert set(CONTRACT) <= set(bd.loc[bd["anchor"] == "pixel_baseline", "metric"])
    ours = vs_anchor[vs_anchor["codec"] == "ours"].set_index("metric")["bd_rate"].round(2)
    assert all((m[f"ours_bd_rate_{k}"] is None) == math.isnan(ours[k]) for k in CONTRACT)
    curves = pd.read_csv(out / "curves.csv")
    coded = curves[curves["kind"] != "reference"]
    assert coded.groupby("codec").size().to_dict() == {"ours": 2, "pixel_baseline": 2, "jpeg": 2, "vvc": 2}
    uncoded = curves[curves["kind"] == "reference"].iloc[0]
    assert uncoded["token_cos"] == pytest.approx(1.0, abs=1e-5)
    assert m["uncoded_vqa_acc"] == pytest.approx(uncoded["vqa_acc"], abs=0.005)


def test_curves_are_real_file_sizes_and_scores(world, first_run):
    out = world["root"] / "outputs/eval_codec"
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 8 + 1 and (curves["kind"] == "reference").sum() == 1
    for col in ("bpp", "psnr", "ms_ssim", "token_mse", "token_cos", "vqa_acc", "caption_cider",
                "retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1", "retrieval_t2i_r5", "grounding_acc50"):
        assert curves[col].notna().all() or col in ("psnr",), col
    assert any(c.startswith("vqa_acc_") for c in curves)
    # bpp of a VVC point = mean over images of 8 * (size of the .266 file) / pixels
    row = curves[(curves["codec"] == "vvc") & (curves["point"] == 33)].iloc[0]
    files = sorted((out / "cache/test/vvc/q033").glob("*.266"))
    assert len(files) == 3
    want = np.mean([8 * f.stat().st_size / (128 * 128) for f in files])
    assert row["bpp"] == pytest.approx(want)
    vvc = curves[curves["codec"] == "vvc"].sort_values("point")
    assert vvc["bpp"].is_monotonic_decreasing                     # higher QP, fewer bits
    learned = curves[curves["codec"] == "ours"]
    assert learned["point"].tolist() == [0.0, 2.0]                  # an even spread over [0, levels-1]


def test_examples_and_folders(world, first_run):
    out = world["root"] / "outputs/eval_codec"
    ex = pd.read_csv(out / "examples.csv")
    assert set(ex["codec"]) == {"original", "ours", "pixel_baseline", "jpeg", "vvc"}
    assert ex["image"].nunique() == 2 and all((out / f).is_file() for f in ex["file"])
    folders = pd.read_csv(out / "folders.csv")
    assert set(folders["codec"]) == {"ours", "pixel_baseline", "jpeg", "vvc"}
    assert (folders["n_images"] == 2).all() and folders["folder"].unique().tolist() == ["extra"]
    bd = pd.read_csv(out / "bd_folders.csv")
    assert bd["folder"].unique().tolist() == ["extra"]
    assert set(bd.loc[bd["anchor"] == "vvc", "codec"]) == {"ours", "pixel_baseline", "jpeg"}
    assert set(bd.loc[bd["codec"] == "ours", "metric"]) == {"psnr", "ms_ssim"}


def test_photos_rd_per_image_and_means(world, first_run):
    out = world["root"] / "outputs/eval_codec"
    photos = pd.read_csv(out / "photos_rd.csv")
    assert list(photos.columns) == list(PHOTO_COLUMNS)
    assert list(photos["codec"].unique()) == ["ours", "pixel_baseline", "jpeg", "vvc"]
    assert len(photos) == 4 * 2 * (2 + 1)               # codecs x points x (2 photos + their mean)
    each = photos[photos["image"] != "mean"]
    assert set(each["image"]) == {"p1", "p2"}
    # p2 (96x72) is fitted to photo_max_side 64: 64x48
    assert set(map(tuple, each[["image", "width", "height"]].drop_duplicates().to_numpy().tolist())) == \
        {("p1", 56, 40), ("p2", 48, 64)}
    f = out / "cache/photos/vvc/q033/p1.266"
    row = each[(each["codec"] == "vvc") & (each["point"] == 33) & (each["image"] == "p1")].iloc[0]
    assert row["bpp"] == pytest.approx(8 * f.stat().st_size / (40 * 56))
    means = photos[photos["image"] == "mean"]
    for (codec, point), d in each.groupby(["codec", "point"]):
        m = means[(means["codec"] == codec) & (means["point"] == point)].iloc[0]
        assert m["psnr"] == pytest.approx(d["psnr"].mean()) and m["bpp"] == pytest.approx(d["bpp"].mean())
    assert first_run["n_photos"] == 2
    bd = pd.read_csv(out / "bd_photos.csv")
    assert set(bd.loc[bd["anchor"] == "vvc", "codec"]) == {"ours", "pixel_baseline", "jpeg"}
    assert set(bd["metric"]) == {"psnr", "ms_ssim"}


def test_anchor_labels_name_the_rows(params):
    p = dataclasses.replace(params, anchors=from_dict(type(params.anchors), {
        **dataclasses.asdict(params.anchors),
        "codecs": [{"name": "vvc", "options": {"preset": "medium"}},
                   {"name": "vvc", "label": "vvc_faster", "options": {"preset": "faster"}}],
        "qualities": {"vvc_faster": [40, 30]}}, "anchors"))
    check_stage_params(p)
    medium, faster = anchor_codecs(p)
    assert (medium.name, medium.anchor_name, faster.name, faster.anchor_name) == ("vvc", "vvc", "vvc_faster", "vvc")
    assert faster.ext == ".266" and faster.make().preset == "faster"
    assert medium.identity()["options"] == {"preset": "medium", "qpa": False}
    # The default preset is part of the identity: an entry without options is the medium one.
    assert CodecSpec.anchor("vvc").identity() == medium.identity()
    from vlmcompress.eval.config import check_anchors_params
    A = p.anchors
    for codecs, msg in (
            ([{"name": "vvc"}, {"name": "vvc"}], r"^anchors\.codecs: 'vvc' is listed twice$"),
            ([{"name": "vvc", "label": "jpeg"}], r"^anchors\.codecs\[0\]\.label: 'jpeg' is the name of another anchor"),
            ([{"name": "vvc", "label": "vvc/fast"}], r"^anchors\.codecs\[0\]\.label: must be a letter then"),
            ([{"name": "vvc", "options": {"preset": "veryslow"}}],
             r"^anchors\.codecs\[0\]: anchor vvc\.preset: unknown VVenC preset 'veryslow' \(known: faster, fast, "
             r"medium, slow, slower\)$")):
        bad = from_dict(type(A), {**dataclasses.asdict(A), "codecs": codecs, "qualities": {}}, "anchors")
        with pytest.raises(ConfigError, match=msg):
            check_anchors_params(bad)


def test_rerun_reuses_every_coded_image(world, first_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("re-encoded an image that was cached")

    monkeypatch.setattr(sweep, "code_image", refuse)
    before = pd.read_csv(world["root"] / "outputs/eval_codec/curves.csv")
    again = run_eval_codec_stage(world["params"], world["splits"], lvlm=world["lvlm"], progress=False,
                                 log=lambda s: None)
    after = pd.read_csv(world["root"] / "outputs/eval_codec/curves.csv")
    pd.testing.assert_frame_equal(before, after)
    untimed = lambda m: {k: v for k, v in m.items() if "seconds" not in k}   # noqa: E731
    assert untimed(again) == untimed(first_run)


def test_stale_cache_entry_is_recoded(world, first_run, tmp_path):
    """A changed image (same key) is coded again; the other images come from the cache."""
    imgs = {"a": make_image(32, 40), "b": make_image(40, 32)}
    spec = CodecSpec.anchor("jpeg")
    with make_pool(0) as pool:
        first = code_images([(spec, [50])], imgs, tmp_path, pool, progress=False)
        imgs["b"] = 255 - imgs["b"]
        calls = []
        real = sweep.code_image
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sweep, "code_image", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
            second = code_images([(spec, [50])], imgs, tmp_path, pool, progress=False)
    assert calls == ["b"]
    assert first.loc[first["image"] == "a", "nbytes"].item() == second.loc[second["image"] == "a", "nbytes"].item()


@pytest.mark.slow
def test_process_pool_matches_inline(tmp_path):
    imgs = {str(i): make_image(40 + i, 48) for i in range(3)}
    jobs = [(CodecSpec.anchor("jpeg"), [20, 60]), (CodecSpec.anchor("webp"), [30])]
    with make_pool(0) as pool:
        inline = code_images(jobs, imgs, tmp_path / "a", pool, progress=False)
    with make_pool(2) as pool:
        pooled = code_images(jobs, imgs, tmp_path / "b", pool, progress=False)
    pd.testing.assert_frame_equal(inline, pooled)


# --- BD tables and the notebook's helpers (no coding) -----------------------------------------------

def _synthetic_curves() -> pd.DataFrame:
    bpp = np.geomspace(0.05, 0.8, 6)
    quality = 20 + 10 * np.log10(bpp / 0.05)          # the same metric curve for every codec
    rows = []
    for codec, kind, scale in (("vvc", "anchor", 1.0), ("jpeg", "anchor", 2.0), ("pixel_baseline", "learned", 1.0),
                               ("ours", "learned", 0.5), ("no_rank", "learned", 0.8)):
        for b, q in zip(bpp * scale, quality):
            rows.append({"codec": codec, "kind": kind, "point": b, "bpp": b,
                         **{m: q for m in ("vqa_acc", "psnr", "token_cos")}})
    rows.append({"codec": "original", "kind": "reference", "point": np.nan, "bpp": 24.0,
                 "vqa_acc": 50.0, "psnr": np.nan, "token_cos": 1.0})
    return pd.DataFrame(rows)


def _bd(bd: pd.DataFrame, codec: str, anchor: str, metric: str, value: str = "bd_rate") -> float:
    return bd.loc[(bd["codec"] == codec) & (bd["anchor"] == anchor) & (bd["metric"] == metric), value].item()


def test_bd_tables_keys_and_values(params):
    curves = _synthetic_curves()
    bd = bd_tables(curves, params, ["vqa_acc", "psnr", "token_cos"])
    assert set(bd.loc[bd["anchor"] == "vvc", "codec"]) == {"jpeg", "pixel_baseline", "ours", "no_rank"}
    assert set(bd.loc[bd["anchor"] == "pixel_baseline", "codec"]) == {"ours", "no_rank"}
    assert _bd(bd, "ours", "vvc", "vqa_acc") == pytest.approx(-50.0, abs=0.01)
    assert _bd(bd, "jpeg", "vvc", "psnr") == pytest.approx(100.0, abs=0.01)
    assert _bd(bd, "ours", "pixel_baseline", "token_cos") == pytest.approx(-50.0, abs=0.01)
    assert _bd(bd, "no_rank", "pixel_baseline", "vqa_acc") == pytest.approx(-20.0, abs=0.01)
    half = 10 * math.log10(2.0)                         # BD-quality of half the rate
    assert _bd(bd, "ours", "vvc", "vqa_acc", "bd_quality") == pytest.approx(half, abs=0.05)
    assert _bd(bd, "ours", "pixel_baseline", "psnr", "bd_quality") == pytest.approx(half, abs=0.05)


def test_headline_is_flat_and_json_safe(params):
    curves = _synthetic_curves()
    bd = bd_tables(curves, params, ["vqa_acc", "psnr", "token_cos"])
    h = headline(bd, curves, "vvc")
    assert h["ours_bd_rate_vqa_acc"] == pytest.approx(-50.0, abs=0.01)
    assert h["ours_bd_rate_token_cos"] == pytest.approx(-50.0, abs=0.01)
    assert h["ours_bd_rate_vs_pixel_baseline_vqa_acc"] == pytest.approx(-50.0, abs=0.01)
    assert h["ours_bd_quality_vqa_acc"] == pytest.approx(10 * math.log10(2.0), abs=0.05)
    assert h["ours_bd_rate_caption_cider"] is None                 # not in the table: null, not absent
    assert h["uncoded_vqa_acc"] == 50.0 and h["uncoded_caption_cider"] is None
    assert (h["ours_bpp_min"], h["ours_bpp_max"]) == (0.025, 0.4)
    assert all(v is None or isinstance(v, float) for v in h.values())
    json.dumps(h, allow_nan=False)                      # JSON-safe: NaN would be null


def test_undefined_bd_rate_is_null_with_a_reason(params):
    curves = _synthetic_curves()
    curves.loc[curves["codec"].isin(["jpeg", "ours"]), "vqa_acc"] += 100      # no shared quality range
    bd = bd_tables(curves, params, ["vqa_acc"])
    row = bd[(bd["codec"] == "jpeg") & (bd["anchor"] == "vvc") & (bd["metric"] == "vqa_acc")].iloc[0]
    assert math.isnan(row["bd_rate"]) and row["reason"]
    # BD-quality shares rates, not scores: defined, +100 minus what the 2x rate would give (10 log10 2)
    expect = 100.0 - 10 * math.log10(2.0)
    assert row["bd_quality"] == pytest.approx(expect, abs=0.05) and not row["quality_reason"]
    h = headline(bd, curves, "vvc")
    assert h["ours_bd_rate_vqa_acc"] is None                           # NaN in the table: null in the JSON
    assert h["ours_bd_quality_vqa_acc"] == pytest.approx(100.0 + 10 * math.log10(2.0), abs=0.05)


def test_target_report_says_by_how_much(params):
    curves = _synthetic_curves()
    bd = bd_tables(curves, params, ["vqa_acc"])
    rep = target_report(bd, curves, {("vvc", "vqa_acc"): -60.0, ("pixel_baseline", "vqa_acc"): -25.0})
    vvc, pix = rep.iloc[0], rep.iloc[1]
    assert not vvc["met"] and vvc["shortfall"] == pytest.approx(10.0, abs=0.01)
    assert pix["met"] and pix["uncoded"] == 50.0


def test_pick_examples_takes_the_closest_point_per_image():
    rd = pd.DataFrame({"codec": ["a", "a", "a", "b"], "point": [1, 2, 1, 5], "image": ["x", "x", "y", "x"],
                       "bpp": [0.1, 0.5, 0.3, 0.25], "psnr": 0.0, "ms_ssim": 0.0, "nbytes": 1})
    ex = pick_examples(rd, 0.2, ["x", "y"])
    got = {(r.codec, r.image): r.point for r in ex.itertuples()}
    assert got == {("a", "x"): 1, ("a", "y"): 1, ("b", "x"): 5}


def test_stage_params_are_checked_before_work(params):
    bad = dataclasses.replace(params, bdrate=dataclasses.replace(params.bdrate, anchor="h266"))
    with pytest.raises(ConfigError, match=r"^bdrate\.anchor: 'h266' is not among anchors\.codecs"):
        check_stage_params(bad)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["eval_codec"]["workers"] = "two"
    with pytest.raises(ConfigError, match=r"^eval_codec\.workers: expected int"):
        from_dict(Params, raw)
    neg = dataclasses.replace(params, eval_codec=dataclasses.replace(params.eval_codec, anchor_span=0.5))
    with pytest.raises(ConfigError, match=r"^eval_codec\.anchor_span"):
        check_stage_params(neg)


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_shipped_profiles_pass_the_stage_checks(profile, tmp_path):
    from conftest import paper_params_path
    from vlmcompress.config import load_params
    check_stage_params(load_params(REPO / "params.yaml" if profile == "embedded" else paper_params_path(tmp_path)))


def test_learned_rates_outside_a_model_are_refused():
    spec = CodecSpec(name="ours", kind="learned", levels=3, model_dir="m")
    assert sweep.learned_points(spec, [], 4) == [0.0, 0.6667, 1.3333, 2.0]
    with pytest.raises(ValueError, match=r"^eval_codec\.learned_rates: \[2\.5\] outside \[0, 2\]"):
        sweep.learned_points(spec, [0.0, 2.5], 4)


def test_missing_model_folder_is_one_line_error(tmp_path):
    (tmp_path / "ours").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved codec"):
        learned_codecs(tmp_path)
    shutil.rmtree(tmp_path / "ours")
    assert learned_codecs(tmp_path) == []


@pytest.mark.slow
def test_eval_and_figures_notebooks_run_end_to_end(world, first_run):
    """04_eval_codec then 06_figures through papermill in the tiny world (token outputs synthetic)."""
    import nbformat
    import papermill

    from test_figures import _write_token_inputs

    root = world["root"]
    _write_token_inputs(root)
    # Encode in a spawned pool from inside the kernel: drop one codec's cache, two workers.
    shutil.rmtree(root / "outputs/eval_codec/cache/test/jpeg")
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["eval_codec"]["workers"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    for name in ("04_eval_codec", "06_figures"):
        out = root / "outputs/notebooks" / f"{name}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(out),
                                   parameters={"params_path": str(root / "params.yaml")}, kernel_name="python3",
                                   cwd=str(root), progress_bar=False)
        nb = nbformat.read(out, as_version=4)
        assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
    from vlmcompress.figures.stage import FIGURES
    assert json.loads((root / "outputs/figures/metrics.json").read_text())["n_figures"] == len(FIGURES)
    assert (root / "outputs/figures/photos_rd.png").is_file()
    assert len(pd.read_csv(root / "outputs/figures/photos_rd.csv")) == 2 * len(pd.read_csv(
        root / "outputs/eval_codec/photos_rd.csv"))                  # PSNR and MS-SSIM of every row
    assert len(list((root / "outputs/eval_codec/cache/test/jpeg").rglob("*.jpg"))) == 2 * 3
