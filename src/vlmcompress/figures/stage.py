"""The figures stage (``06_figures``): every figure from the pipeline's outputs, with its CSV.

Reads ``outputs/eval_codec/{curves,bd_table,examples}.csv`` and ``outputs/tokens/{accuracy.csv,
cost.csv,grounding.csv,examples.json}``; writes ``outputs/figures/<name>.{png,svg}`` and ``<name>.csv`` (the table the
figure is drawn from) for

* ``rate_accuracy``   task metrics, PSNR, MS-SSIM, token similarity vs bpp, every codec;
* ``bd_rate``         BD-rate of every codec against the anchor (VVC), per metric;
* ``ablation``        learned codecs (loss terms, pre-editing) against the pixel baseline;
* ``token_accuracy``  VQA accuracy vs visual tokens kept, per token-compression method;
* ``token_gflops``    VQA accuracy vs prefill GFLOPs per question, per method (equal cost: read across);
* ``token_latency``   VQA accuracy vs measured prefill latency, per method;
* ``token_grounding`` grounding acc@0.5 vs the fraction of visual tokens kept, per method;
* ``codec_examples``  reconstructions at about equal bpp;
* ``token_examples``  kept, recovered and merged tokens on example questions;
* ``photos_rd``       PSNR and MS-SSIM vs bpp on the photographs of ``eval_codec.photos``.

A missing input is a one-line error naming the file (under DVC every input is a dependency).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from vlmcompress.config import Params
from vlmcompress.figures import codec, photos, tokens
from vlmcompress.figures.config import check_figures_params
from vlmcompress.figures.plots import save_figure
from vlmcompress.io import atomic_path, read_json, write_json
from vlmcompress.paths import outputs_dir, project_root

FIGURES = ("rate_accuracy", "bd_rate", "ablation", "token_accuracy", "token_gflops", "token_latency",
           "token_grounding", "codec_examples", "token_examples", "photos_rd")


def stage_dir() -> Path:
    return outputs_dir("figures")


def save(fig: plt.Figure, data: pd.DataFrame, name: str, out: Path, formats: list[str], dpi: int) -> list[Path]:
    """``out/<name>.<fmt>`` for each format plus ``out/<name>.csv``, atomically; closes ``fig``."""
    with atomic_path(out / f"{name}.csv") as tmp:
        data.to_csv(tmp, index=False)
    paths = [out / f"{name}.csv", *save_figure(fig, out / name, formats, dpi)]
    plt.close(fig)
    return paths


def _csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path}: unreadable CSV ({type(exc).__name__})") from None


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing input of the figures stage (run its stage first)")
    return path


def build_figures(params: Params) -> dict[str, tuple[plt.Figure, pd.DataFrame]]:
    """Every figure: ``name -> (figure, the table it is drawn from)``."""
    F = params.figures
    check_figures_params(F)
    ev, tok = outputs_dir("eval_codec"), outputs_dir("tokens")
    inputs = {k: _need(p) for k, p in {
        "curves": ev / "curves.csv", "bd": ev / "bd_table.csv", "examples": ev / "examples.csv",
        "acc": tok / "accuracy.csv", "tok_examples": tok / "examples.json", "cost": tok / "cost.csv",
        "grounding": tok / "grounding.csv"}.items()}
    curves, bd = _csv(inputs["curves"]), _csv(inputs["bd"])
    data = {
        "rate_accuracy": codec.rate_accuracy_data(curves, F.rate_metrics),
        "bd_rate": codec.bd_rate_data(bd, params.bdrate.anchor, F.rate_metrics),
        "ablation": codec.ablation_data(curves, bd, F.rate_metrics[0], F.rate_metrics),
        "token_accuracy": tokens.token_accuracy_data(_csv(inputs["acc"])),
        "codec_examples": codec.codec_examples_data(_csv(inputs["examples"])),
        "token_examples": tokens.token_examples_data(read_json(inputs["tok_examples"]), F.token_examples),
        "token_gflops": tokens.token_cost_data(_csv(inputs["cost"]), "gflops"),
        "token_latency": tokens.token_cost_data(_csv(inputs["cost"]), "latency_ms"),
        "token_grounding": tokens.token_grounding_data(_csv(inputs["grounding"])),
    }
    draw = {
        "rate_accuracy": codec.rate_accuracy, "bd_rate": codec.bd_rate_heatmap, "ablation": codec.ablation,
        "token_accuracy": tokens.token_accuracy, "token_gflops": tokens.token_cost, "token_latency": tokens.token_cost,
        "token_grounding": tokens.token_grounding,
        "codec_examples": lambda d: codec.codec_examples(d, ev),
        "token_examples": lambda d: tokens.token_examples(d, project_root()),
    }
    # PSNR / MS-SSIM vs bpp on eval_codec.photos (the CSV is only a header without photos)
    data["photos_rd"] = photos.photos_rd_data(_csv(_need(ev / "photos_rd.csv")))
    draw["photos_rd"] = photos.photos_rd
    return {name: (draw[name](d), d) for name, d in data.items()}


def run_figures_stage(params: Params) -> dict[str, Any]:
    """Draw and write every figure; ``outputs/figures/metrics.json`` counts what each shows."""
    out = stage_dir()
    figs = build_figures(params)
    for name, (fig, data) in figs.items():
        save(fig, data, name, out, list(params.figures.formats), params.figures.dpi)
    metrics = {"n_figures": len(figs), "rows": {name: len(data) for name, (_, data) in figs.items()}}
    write_json(out / "metrics.json", metrics)
    return metrics
