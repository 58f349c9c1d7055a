"""Schema of the ``figures`` section of params.yaml (the ``06_figures`` stage)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmcompress.schema import check_min, check_range, check_unique, require

# A figure beyond this many dots per inch is hundreds of megapixels: a typo, not a choice.
MAX_DPI = 1200


@dataclass(frozen=True)
class FiguresParams:
    formats: list[Literal["png", "svg", "pdf"]]  # every figure in each of these (png first: README)
    dpi: int
    rate_metrics: list[str]        # columns of outputs/eval_codec/curves.csv drawn against bpp
    token_examples: int            # (image, question) examples of outputs/tokens/examples.json drawn (>= 1)


def check_figures_params(p: FiguresParams, path: str = "figures") -> None:
    """Non-empty lists without repeats, a sane resolution, at least one token example."""
    # Late import: vlmcompress.config imports this module to assemble Params.

    require(len(p.formats) > 0, f"{path}.formats", "needs at least one format")
    check_unique(f"{path}.formats", p.formats)
    require({"png", "svg"} <= set(p.formats), f"{path}.formats",
            f"must include png and svg (the pipeline's figure outputs; pdf may be added), got {list(p.formats)}")
    check_range(f"{path}.dpi", p.dpi, 30, MAX_DPI)
    require(len(p.rate_metrics) > 0, f"{path}.rate_metrics", "needs at least one metric")
    for i, name in enumerate(p.rate_metrics):
        require(name.strip() != "", f"{path}.rate_metrics[{i}]", "must name a column of curves.csv, got ''")
    check_unique(f"{path}.rate_metrics", p.rate_metrics)
    check_min(f"{path}.token_examples", p.token_examples, 1)
