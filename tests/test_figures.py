"""The figures stage from small synthetic inputs: every figure in every format, its CSV beside it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import matplotlib.pyplot as plt
from PIL import Image

from vlmcompress.figures import codec as codec_figures
from vlmcompress.figures import tokens as token_figures
from vlmcompress.figures.stage import FIGURES, run_figures_stage, save
from vlmcompress.io import write_json

from test_eval_codec import _synthetic_curves


def _write_inputs(root: Path) -> None:
    ev = root / "outputs/eval_codec"
    ev.mkdir(parents=True)
    curves = _synthetic_curves()
    for m in ("caption_cider", "retrieval_i2t_r1", "retrieval_t2i_r1", "grounding_acc50", "ms_ssim"):
        curves[m] = curves["vqa_acc"]
    curves.to_csv(ev / "curves.csv", index=False)
    bd = pd.DataFrame([{"codec": c, "anchor": a, "metric": m, "bd_rate": v, "overlap": 1.0, "n_anchor": 6,
                        "n_test": 6, "reason": ""}
                       for c, a, v in (("ours", "vvc", -50.0), ("jpeg", "vvc", 100.0), ("pixel_baseline", "vvc", 0.0),
                                       ("ours", "pixel_baseline", -50.0), ("no_rank", "pixel_baseline", -20.0))
                       for m in ("vqa_acc", "psnr", "token_cos")])
    bd.to_csv(ev / "bd_table.csv", index=False)
    rows = []
    rng = np.random.default_rng(0)
    for image in ("1", "2"):
        (ev / "examples" / image).mkdir(parents=True)
        for codec in ("original", "ours", "vvc"):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ev / "examples" / image / f"{codec}.png")
            rows.append({"image": image, "codec": codec, "kind": "reference" if codec == "original" else "x",
                         "point": 1.0, "bpp": 0.2, "psnr": 30.0, "ms_ssim": 0.9, "target_bpp": 0.2,
                         "file": f"examples/{image}/{codec}.png"})
    pd.DataFrame(rows).to_csv(ev / "examples.csv", index=False)
    from test_photos import synthetic_photos_rd
    synthetic_photos_rd().to_csv(ev / "photos_rd.csv", index=False)
    _write_token_inputs(root)


def _cost_csv() -> pd.DataFrame:
    """A small outputs/tokens/cost.csv: FastV dearer than a pre-LM method at the same count,
    ours with a run added at a peer's cost, one run without a measured latency."""
    rows = [("full", "1.00", 256, 2.0, 30.0, 55.0, False)]
    rows += [("prumerge", f"{b:.2f}", 256 * b, 1.0 + b, 10 + 20 * b, 40 + 10 * b, False) for b in (0.1, 0.5)]
    rows += [("fastv", f"{b:.2f}", 256 * b, 1.3 + b, 12 + 20 * b, 42 + 10 * b, False) for b in (0.1, 0.5)]
    rows += [("recoverable", f"{b:.2f}", 256 * b, 1.1 + b, 11 + 20 * b, 45 + 10 * b, True) for b in (0.1, 0.5)]
    rows += [("recoverable", "49", 49, 1.4, float("nan"), 47.0, True)]
    return pd.DataFrame(rows, columns=["method", "budget", "tokens", "gflops", "latency_ms", "accuracy", "ours"])


def test_token_cost_figures_from_a_small_csv(tmp_path):
    cost = _cost_csv()
    cost.to_csv(tmp_path / "cost.csv", index=False)
    read = pd.read_csv(tmp_path / "cost.csv")
    g = token_figures.token_cost_data(read, "gflops")
    assert list(g.columns) == ["method", "budget", "tokens", "ours", "measure", "cost", "acc"]
    assert len(g) == len(cost) and set(g.loc[g["ours"], "method"]) == {"recoverable"}
    mine = g[g["method"] == "recoverable"]
    assert mine["cost"].tolist() == sorted(mine["cost"]) and 49 in set(mine["tokens"])
    lat = token_figures.token_cost_data(read, "latency_ms")
    assert len(lat) == len(cost) - 1                          # the run without a latency is left out
    for d in (g, lat):
        fig = token_figures.token_cost(d)
        ax = fig.axes[0]
        assert "VQA accuracy" in ax.get_ylabel()
        assert ax.get_xlabel() == token_figures.COST_MEASURES[d["measure"][0]]
        assert {t.get_text() for t in ax.get_legend().get_texts()} == {"full", "prumerge", "fastv", "recoverable (ours)"}
        plt.close(fig)
    with pytest.raises(ValueError, match="token_cost: unknown measure 'tokens'"):
        token_figures.token_cost_data(read, "tokens")
    with pytest.raises(ValueError, match="token_cost: input has no column 'ours'"):
        token_figures.token_cost_data(read.drop(columns="ours"), "gflops")


def _grounding_csv() -> pd.DataFrame:
    """A small outputs/tokens/grounding.csv: the full model, two methods at two budgets (the
    token stage's column order)."""
    rows = [("full", "1.00", 256.0, 1.0, 60.0, 0.55, 8)]
    rows += [(m, f"{b:.2f}", 256 * b, b, base + 20 * b, 0.3 + b / 2, 8)
             for m, base in (("recoverable", 40.0), ("prumerge", 30.0)) for b in (0.5, 0.1)]
    return pd.DataFrame(rows, columns=["method", "budget", "tokens", "kept_fraction", "grounding_acc50",
                                       "grounding_miou", "n"])


def test_token_grounding_is_accuracy_against_the_share_of_tokens_kept(tmp_path):
    _grounding_csv().to_csv(tmp_path / "grounding.csv", index=False)
    read = pd.read_csv(tmp_path / "grounding.csv", dtype={"budget": str})
    d = token_figures.token_grounding_data(read)
    assert d["budget"].tolist() == ["1.00", "0.10", "0.50", "0.10", "0.50"]     # by method, then fraction kept
    assert d["method"].tolist() == ["full", "prumerge", "prumerge", "recoverable", "recoverable"]
    assert d["grounding_acc50"].tolist() == [60.0, 32.0, 40.0, 42.0, 50.0]
    fig = token_figures.token_grounding(d)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "grounding acc@0.5 (%)"
    curves = {tuple(ln.get_xdata()) for ln in ax.get_lines() if ln.get_linestyle() == "-"}
    assert curves == {(0.1, 0.5)} and len([ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]) == 2
    full = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(full) == 1 and list(full[0].get_ydata()) == [60.0, 60.0]          # the full model: a reference line
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"full (every token)", "prumerge", "recoverable"}
    plt.close(fig)
    # No referring expressions (the paper profile with data.local.refs ""): NaN scores, a note.
    absent = read.assign(grounding_acc50=float("nan"), grounding_miou=float("nan"), n=0)
    empty = token_figures.token_grounding_data(absent)
    assert len(empty) == 0 and list(empty.columns) == list(read.columns)
    fig = token_figures.token_grounding(empty)
    assert "no referring expressions" in fig.axes[0].texts[0].get_text()
    plt.close(fig)
    with pytest.raises(ValueError, match="token_grounding: input has no column 'kept_fraction'"):
        token_figures.token_grounding_data(read.drop(columns="kept_fraction"))


def _write_token_inputs(root: Path) -> None:
    """Synthetic outputs/tokens/{accuracy.csv, cost.csv, grounding.csv, examples.json} (the token
    stage's contract)."""
    tok = root / "outputs/tokens"
    tok.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    acc = pd.DataFrame([{"method": m, "budget": f"{b:.2f}", "mean_tokens": 256 * b, "question_type": t,
                         "acc": 40 + 10 * b, "n": 10}
                        for m in ("recoverable", "prumerge") for b in (0.1, 0.25, 0.5)
                        for t in ("all", "color", "count")]
                       + [{"method": "full", "budget": "1.00", "mean_tokens": 256, "question_type": t, "acc": 55.0,
                           "n": 10} for t in ("all", "color", "count")])
    acc.to_csv(tok / "accuracy.csv", index=False)
    _cost_csv().to_csv(tok / "cost.csv", index=False)
    _grounding_csv().to_csv(tok / "grounding.csv", index=False)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "scene.png")
    # The tokens stage's layout: one entry per question, every method's cells inside.
    examples = [{"image_id": q, "image": str(root / "scene.png"), "question": f"what color is it {q}?",
                 "question_type": "color", "answer": "red", "grid": [4, 4], "budget": "0.10", "objects": [],
                 "methods": {m: {"prediction": "red", "correct": True,
                                 "cells": [int(k) for k in rng.integers(0, 6, 16)]}
                             for m in ("full", "recoverable", "prumerge")}}
                for q in range(3)]
    write_json(tok / "examples.json", examples)


def test_every_figure_with_its_csv(project_root, params):
    _write_inputs(project_root)
    p = dataclasses.replace(params, figures=dataclasses.replace(params.figures, token_examples=2, dpi=60))
    metrics = run_figures_stage(p)
    out = project_root / "outputs/figures"
    assert metrics["n_figures"] == len(FIGURES) == 10
    for name in FIGURES:
        for ext in ("png", "svg", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
        assert len(pd.read_csv(out / f"{name}.csv")) == metrics["rows"][name] > 0
    assert Image.open(out / "rate_accuracy.png").size[0] > 400
    tok = pd.read_csv(out / "token_examples.csv")
    assert tok["example"].nunique() == 2 and set(tok["method"]) == {"full", "recoverable", "prumerge"}
    assert (tok[["dropped", "salient", "recovered", "merged_centre", "global", "pooled"]].sum(axis=1) == 16).all()
    ra = pd.read_csv(out / "rate_accuracy.csv")
    assert set(ra["metric"]) == set(params.figures.rate_metrics)
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_svg_is_byte_stable(tmp_path):
    data = pd.DataFrame({"codec": ["ours", "jpeg"], "anchor": "vvc", "metric": "vqa_acc", "bd_rate": [-50.0, 20.0]})
    for run in ("a", "b"):
        save(codec_figures.bd_rate_heatmap(data), data, "bd", tmp_path / run, ["svg"], 60)
    assert (tmp_path / "a/bd.svg").read_bytes() == (tmp_path / "b/bd.svg").read_bytes()


def test_missing_input_is_a_one_line_error(project_root, params):
    _write_inputs(project_root)
    (project_root / "outputs/tokens/accuracy.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"outputs/tokens/accuracy\.csv: missing input of the figures stage"):
        run_figures_stage(params)


def test_token_examples_formats_and_errors():
    flat = [{"image_path": "x.png", "question": "q", "method": "m", "grid": 2, "kinds": [0, 1, 2, 3],
             "budget": "0.25", "prediction": "p"}]
    d = token_figures.token_examples_data(flat, 1)
    assert d[["grid_h", "grid_w", "dropped", "salient", "recovered"]].iloc[0].tolist() == [2, 2, 1, 1, 1]
    with pytest.raises(ValueError, match=r"entry 0 \(m\): kinds must be 2x2 values in 0\.\.5"):
        token_figures.token_examples_data([{**flat[0], "kinds": [0, 1, 2]}], 1)
    nested = [{"image": "x.png", "question": "q", "grid": [1, 2], "methods": {"a": {"cells": [1, 7]}}}]
    with pytest.raises(ValueError, match=r"entry 0 \(a\): cells must be 1x2 values"):
        token_figures.token_examples_data(nested, 1)
    with pytest.raises(ValueError, match=r"entry 0: no 'grid'"):
        token_figures.token_examples_data([{"image": "x.png", "question": "q", "methods": {}}], 1)
    with pytest.raises(ValueError, match=r"rate_accuracy: input has no column 'vqa_acc'"):
        codec_figures.rate_accuracy_data(pd.DataFrame({"codec": [], "kind": [], "point": [], "bpp": []}), ["vqa_acc"])


def test_stage_notebook_figures_from_small_tables(tmp_path):
    """The figures the data, lvlm, codec and tokens notebooks draw, on tiny inputs."""
    from vlmcompress.data.records import ImageRecord, ObjectAnn, Question
    from vlmcompress.figures import dataset, lvlm

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "original.png")
    rec = ImageRecord(7, tmp_path / "original.png", 32, 32, objects=(ObjectAnn(1, "circle", (2.0, 2.0, 9.0, 9.0)),),
                      questions=(Question(1, "what color?", "red", ("red",), "color", "other"),))
    fig = dataset.sample_grid([rec], cols=2)
    assert fig.axes[0].get_title() == "#7" and "A: red" in fig.axes[0].get_xlabel()
    plt.close(fig)

    curves = pd.DataFrame({"phase": ["lm", "lm", "clip"], "step": [1, 2, 1], "seconds": [1.0, 2.0, 1.0],
                           "loss": [2.0, 1.0, 3.0], "val_acc": [np.nan, 40.0, np.nan]})
    d = lvlm.training_curves_data(curves)
    assert d["phase"].tolist() == ["clip", "lm", "lm"]                  # training order
    fig = lvlm.training_curves(d)
    assert [a.get_title() for a in fig.axes[:2]] == ["phase clip: loss", "phase lm: loss"]
    plt.close(fig)
    table = lvlm.accuracy_table({"vqa_acc": 50.0, "vqa_majority_acc": 30.0, "vqa_acc_by_type": {"color": 60.0},
                                 "vqa_majority_acc_by_type": {"color": 25.0}})
    assert table.loc["color", "margin"] == 35.0 and table.index[-1] == "overall"

    train = pd.DataFrame({"model": ["ours"] * 3 + ["pixel_baseline"] * 3, "step": [1, 2, 3] * 2,
                          "loss": [3.0, 2.0, 1.0] * 2, "bpp_loss": [0.5, 0.4, 0.3] * 2,
                          "token_mse": [1.0, 0.5, np.nan, np.nan, np.nan, np.nan]})
    d = codec_figures.codec_curves_data(train, window=2)
    assert set(d["term"]) == {"loss", "bpp_loss", "token_mse"}
    assert d[(d["model"] == "ours") & (d["term"] == "loss")]["value"].tolist() == [3.0, 2.5, 1.5]
    assert not ((d["model"] == "pixel_baseline") & (d["term"] == "token_mse")).any()     # never logged
    fig = codec_figures.codec_curves(d)
    assert [a.get_title() for a in fig.axes] == ["loss", "bpp_loss", "token_mse"]
    plt.close(fig)

    rd = pd.DataFrame({"model": ["ours", "ours"], "rate": [0.5, 1.0], "bpp": [0.1, 0.3], "psnr": [28.0, 31.0],
                       "token_mse": [0.02, 0.01], "png": ["ours_0.png", "ours_1.png"]})
    fig = codec_figures.rate_accuracy(codec_figures.codec_rd_data(rd))
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_ylabel() == "PSNR (dB)"
    plt.close(fig)
    for f in rd["png"]:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f)
    fig = codec_figures.reconstruction_grid(codec_figures.reconstruction_data(rd), tmp_path)
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "original"
    plt.close(fig)


def test_token_accuracy_draws_adaptive_modes_as_stars():
    acc = pd.DataFrame([{"method": "recoverable", "budget": b, "mean_tokens": t, "question_type": "all", "acc": a}
                        for b, t, a in (("0.10", 26, 40.0), ("0.50", 128, 50.0), ("adaptive", 60, 48.0))]
                       + [{"method": "full", "budget": "1.00", "mean_tokens": 256, "question_type": "all",
                           "acc": 55.0}])
    fig = token_figures.token_accuracy(token_figures.token_accuracy_data(acc))
    ax = fig.axes[0]
    line = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() == "-"]
    assert [list(ln.get_xdata()) for ln in line] == [[26, 128]]          # the adaptive run is not on the curve
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [(60.0, 48.0)]
    assert "adaptive budget" in {t.get_text() for t in fig.legends[0].get_texts()}
    plt.close(fig)
