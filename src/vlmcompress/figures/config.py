"""Schema of the ``figures`` section of params.yaml (the ``06_figures`` stage)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmcompress.config import ConfigError


@dataclass(frozen=True)
class FiguresParams:
    formats: list[Literal["png", "svg", "pdf"]]  # every figure in each of these (png first: README)
    dpi: int
    rate_metrics: list[str]        # columns of outputs/eval_codec/curves.csv drawn against bpp
    token_examples: int            # (image, question) examples of outputs/tokens/examples.json drawn (>= 1)


def check_figures_params(p: FiguresParams, path: str = "figures") -> None:
    if not p.formats:
        raise ConfigError(f"{path}.formats: need at least one format")
    if p.dpi < 30:
        raise ConfigError(f"{path}.dpi: must be >= 30, got {p.dpi}")
    if not p.rate_metrics:
        raise ConfigError(f"{path}.rate_metrics: need at least one metric")
    if p.token_examples < 1:
        raise ConfigError(f"{path}.token_examples: must be >= 1, got {p.token_examples}")
