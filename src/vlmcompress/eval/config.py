"""Schema of the anchor-codec sweep and BD-rate settings (sections for params.yaml).

Example::

    anchors:
      codecs:
        - {name: jpeg}
        - {name: vvc, options: {preset: faster, qpa: false}}
      bpp_range: [0.05, 1.0]
      n_points: 6
      n_calibration: 4
      qualities: {}          # e.g. {vvc: [47, 42, 37, 32, 27, 22]} skips the picker for vvc
    bdrate:
      method: pchip
      monotone: envelope
      min_overlap: 0.25
      anchor: vvc
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlmcompress.config import ConfigError


@dataclass(frozen=True)
class AnchorCodecParams:
    """One anchor codec: a key of ``vlmcompress.codec.anchors.ANCHORS`` and its options."""

    name: str
    options: dict[str, bool | int | float | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class AnchorsParams:
    """Which anchors to sweep and at which quality points."""

    codecs: list[AnchorCodecParams]
    bpp_range: tuple[float, float]     # target [low, high] mean bpp of the quality points
    n_points: int                      # quality points per codec (>= 6 for stable BD numbers)
    n_calibration: int                 # sample images the quality picker encodes
    qualities: dict[str, list[int]] = field(default_factory=dict)  # explicit, per codec


@dataclass(frozen=True)
class BDRateParams:
    """How BD-rate / BD-quality numbers are computed (see vlmcompress.eval.bdrate)."""

    method: Literal["pchip", "akima"]
    monotone: Literal["envelope", "isotonic"]
    min_overlap: float                 # NaN below this shared fraction of the quality range
    anchor: str                        # codec every other curve is compared with


def check_anchors_params(p: AnchorsParams, path: str = "anchors") -> None:
    """Cross-field checks a type check cannot express; messages name the key path."""
    from vlmcompress.codec.anchors import ANCHORS, AnchorError, make_anchor

    lo, hi = p.bpp_range
    if not 0 < lo < hi:
        raise ConfigError(f"{path}.bpp_range: need 0 < low < high, got {list(p.bpp_range)}")
    if p.n_points < 2:
        raise ConfigError(f"{path}.n_points: need >= 2, got {p.n_points}")
    if p.n_calibration < 1:
        raise ConfigError(f"{path}.n_calibration: need >= 1, got {p.n_calibration}")
    names = [c.name for c in p.codecs]
    for i, codec in enumerate(p.codecs):
        try:
            make_anchor(codec.name, **codec.options)
        except (AnchorError, TypeError) as exc:
            raise ConfigError(f"{path}.codecs[{i}]: {exc}") from None
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}.codecs: a codec is listed twice ({', '.join(names)})")
    for name, qs in p.qualities.items():
        if name not in names:
            raise ConfigError(f"{path}.qualities.{name}: not among {path}.codecs")
        scale = ANCHORS[name].scale
        bad = [q for q in qs if not scale.lo <= q <= scale.hi]
        if bad or len(qs) < 2:
            raise ConfigError(f"{path}.qualities.{name}: need >= 2 values in "
                              f"{scale.lo}..{scale.hi}, got {qs}")


def check_bdrate_params(p: BDRateParams, path: str = "bdrate") -> None:
    if not 0.0 <= p.min_overlap <= 1.0:
        raise ConfigError(f"{path}.min_overlap: need a fraction in [0, 1], got {p.min_overlap}")


@dataclass(frozen=True)
class EvalCodecParams:
    """The codec-evaluation stage (``04_eval_codec``): which test images, which rates, how fast.

    Every learned codec under ``outputs/codec/models`` is coded at ``learned_rates``; the
    anchors' quality points are then picked to span the learned codecs' mean bpp (widened by
    ``anchor_span`` on each side), so the curves overlap where BD-rate needs them to.
    """

    n_images: int                 # first this many test images are coded and scored (0: all)
    max_questions: int            # VQA questions drawn from them, seeded (0: all)
    max_captions: int             # images captioned, the first of the subset (0: all)
    max_refs: int                 # referring expressions grounded, seeded (0: all)
    batch_size: int               # LVLM batch
    learned_rates: list[float]    # rates of every learned codec ([]: anchors.n_points evenly
                                  # spaced over each model's [0, levels-1])
    anchor_span: float            # >= 1: anchors span the learned codecs' bpp range widened by
                                  # this factor each side; 0: use anchors.bpp_range as given
    workers: int                  # encoding processes (0: encode in the stage's own process)
    n_examples: int               # images kept per codec at about equal bpp, for the figures
    example_bpp: float            # bpp of those examples (0: the median bpp of `ours`)


def check_eval_codec_params(p: EvalCodecParams, path: str = "eval_codec") -> None:
    """Value checks a type check cannot express (messages name the key path)."""
    for name in ("n_images", "max_questions", "max_captions", "max_refs", "workers", "n_examples"):
        if getattr(p, name) < 0:
            raise ConfigError(f"{path}.{name}: must be >= 0, got {getattr(p, name)}")
    if p.batch_size < 1:
        raise ConfigError(f"{path}.batch_size: must be >= 1, got {p.batch_size}")
    if p.learned_rates and (len(p.learned_rates) < 2 or min(p.learned_rates) < 0):
        raise ConfigError(f"{path}.learned_rates: need >= 2 rates >= 0 (or [] for an even "
                          f"spread), got {p.learned_rates}")
    if p.anchor_span != 0 and p.anchor_span < 1:
        raise ConfigError(f"{path}.anchor_span: need 0 (use anchors.bpp_range) or a factor "
                          f">= 1, got {p.anchor_span}")
    if p.example_bpp < 0:
        raise ConfigError(f"{path}.example_bpp: must be >= 0, got {p.example_bpp}")
