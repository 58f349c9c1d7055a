"""Schema of the anchor-codec sweep and BD-rate settings (sections for params.yaml).

Example::

    anchors:
      codecs:
        - {name: jpeg}
        - {name: vvc, options: {preset: medium, qpa: false}}                    # BD-rate reference
        - {name: vvc, label: vvc_faster, options: {preset: faster, qpa: false}}  # speed reference
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

import re
from dataclasses import dataclass, field
from typing import Literal

from vlmcompress.schema import (SHOW_CHARS, ConfigError, check_choice, check_min, check_range, check_unique, clip,
                                key_path, require, show)


@dataclass(frozen=True)
class AnchorCodecParams:
    """One anchor codec: a key of ``vlmcompress.codec.anchors.ANCHORS``, its options and the
    name its rows carry (``label``, default ``name``: one codec at two settings needs two)."""

    name: str
    options: dict[str, bool | int | float | str | None] = field(default_factory=dict)
    label: str = ""

    @property
    def key(self) -> str:
        """The codec's name in tables, caches, ``qualities`` and ``bdrate.anchor``."""
        return self.label or self.name


@dataclass(frozen=True)
class AnchorsParams:
    """Which anchors to sweep and at which quality points."""

    codecs: list[AnchorCodecParams]
    bpp_range: tuple[float, float]     # target [low, high] mean bpp of the quality points
    n_points: int                      # quality points per codec (>= 6 for stable BD numbers)
    n_calibration: int                 # sample images the quality picker encodes
    qualities: dict[str, list[int]] = field(default_factory=dict)  # explicit, per codec (label)


@dataclass(frozen=True)
class BDRateParams:
    """How BD-rate / BD-quality numbers are computed (see vlmcompress.eval.bdrate)."""

    method: Literal["pchip", "akima"]
    monotone: Literal["envelope", "isotonic"]
    min_overlap: float                 # NaN below this shared fraction of the quality range
    anchor: str                        # codec (label) every other curve is compared with


def check_anchors_params(p: AnchorsParams, path: str = "anchors") -> None:
    """Known codecs with valid options, listed once; a sane bpp range and quality points."""
    # Late imports: numpy, and vlmcompress.config (which imports this module to assemble Params).
    from vlmcompress.codec.anchors import ANCHORS, AnchorError, make_anchor

    require(len(p.codecs) > 0, f"{path}.codecs", "needs at least one codec")
    for i, codec in enumerate(p.codecs):
        check_choice(f"{path}.codecs[{i}].name", codec.name, list(ANCHORS), "anchor codec")
        try:
            make_anchor(codec.name, **codec.options)
        except (AnchorError, TypeError) as exc:
            raise ConfigError(f"{path}.codecs[{i}]: {clip(str(exc), 4 * SHOW_CHARS)}") from None
        if codec.label:
            # a file and folder name in the cache; another codec's name would mislead
            require(re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,63}", codec.label) is not None,
                    f"{path}.codecs[{i}].label",
                    f"must be a letter then letters, digits, '_', '.' or '-' (<= 64), got {show(codec.label)}")
            require(codec.label == codec.name or codec.label not in ANCHORS, f"{path}.codecs[{i}].label",
                    f"{show(codec.label)} is the name of another anchor codec")
    names = [c.key for c in p.codecs]
    check_unique(f"{path}.codecs", names)
    lo, hi = p.bpp_range
    require(0 < lo < hi, f"{path}.bpp_range", f"need 0 < low < high, got {show(list(p.bpp_range))}")
    check_min(f"{path}.n_points", p.n_points, 2)
    check_min(f"{path}.n_calibration", p.n_calibration, 1)
    for name, qs in p.qualities.items():
        where = key_path(f"{path}.qualities", name)
        require(name in names, where, f"not among {path}.codecs ({', '.join(names)})")
        scale = ANCHORS[next(c.name for c in p.codecs if c.key == name)].scale
        require(len(qs) >= 2 and all(scale.lo <= q <= scale.hi for q in qs), where,
                f"need >= 2 values in {scale.lo}..{scale.hi}, got {show(qs)}")
        check_unique(where, qs)


def check_bdrate_params(p: BDRateParams, anchors: AnchorsParams | None = None, path: str = "bdrate") -> None:
    """``min_overlap`` is a fraction; with ``anchors``, the reference codec is one of them."""

    check_range(f"{path}.min_overlap", p.min_overlap, 0.0, 1.0)
    if anchors is not None:
        names = [c.key for c in anchors.codecs]
        require(p.anchor in names, f"{path}.anchor",
                f"{show(p.anchor)} is not among anchors.codecs ({', '.join(names)})")


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
    photos: str | None = None     # folder of photographs: per-image rate-distortion of every codec
                                  # (photos_rd.csv); relative to the project root; null: none
    max_photos: int = 24          # its first this many images by file name (0: all)
    photo_max_side: int = 1024    # larger photos are downscaled to this longer side first (0: never)


def check_eval_codec_params(p: EvalCodecParams, levels: int | None = None, path: str = "eval_codec") -> None:
    """Value checks a type check cannot express; with ``levels`` (``codec.model.levels``), the
    learned rates must be rates of that codec."""

    for name in ("n_images", "max_questions", "max_captions", "max_refs", "workers", "n_examples"):
        check_min(f"{path}.{name}", getattr(p, name), 0)
    check_min(f"{path}.batch_size", p.batch_size, 1)
    if p.learned_rates:
        require(len(p.learned_rates) >= 2 and min(p.learned_rates) >= 0, f"{path}.learned_rates",
                f"need >= 2 rates >= 0 (or [] for an even spread), got {show(p.learned_rates)}")
        check_unique(f"{path}.learned_rates", p.learned_rates)
        if levels is not None:
            require(max(p.learned_rates) <= levels - 1, f"{path}.learned_rates",
                    f"rates must be <= codec.model.levels - 1 ({show(levels - 1)}), got {show(p.learned_rates)}")
    require(p.anchor_span == 0 or p.anchor_span >= 1, f"{path}.anchor_span",
            f"need 0 (use anchors.bpp_range) or a factor >= 1, got {show(p.anchor_span)}")
    check_min(f"{path}.example_bpp", p.example_bpp, 0.0, " (0: the median bpp of ours)")
    require(p.photos is None or p.photos.strip() != "", f"{path}.photos",
            'must be a folder of images or null (none), got ""')
    check_min(f"{path}.max_photos", p.max_photos, 0)
    require(p.photo_max_side == 0 or p.photo_max_side >= 64, f"{path}.photo_max_side",
            f"need 0 (keep sizes) or >= 64 px, got {show(p.photo_max_side)}")
