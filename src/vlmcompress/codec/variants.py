"""The codecs the stage trains, derived from one ``codec`` params section.

* ``ours``: the section's ``model`` / ``loss`` / ``train`` as written.
* ``pixel_baseline``: the same architecture, trained for pixels only
  (``bpp + lambda * 255**2 * MSE``, its own ``lambdas``, and its own ``steps`` and crop
  ``patch_size``: a step on 64 px crops costs ~0.37 of a whole-scene step on 2 cores, and
  2,000 of them made a far better codec than 500 whole scenes), so the gain of the token
  losses is measured rather than assumed. ``baseline.preedit`` says what happens to the
  pre-editing net: kept as is, kept without its LVLM token branch (default: a pixel codec
  should not need the LVLM to encode), or dropped.
* one ``ours-<ablation>`` per name in ``ablations``: ``ours`` with one switch flipped.
  Ablations are registered by name (CompressAI's registry habit), so params.yaml names them.

``train.init_from`` may name another codec of the stage (ours and its ablations fine-tune
the pixel baseline by default); :func:`training_order` trains such a source first.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vlmcompress.codec.config import CodecParams, CodecStageParams, LossParams

Ablation = Callable[[CodecParams], CodecParams]
ABLATIONS: dict[str, Ablation] = {}

OURS = "ours"
BASELINE = "pixel_baseline"


def register_ablation(name: str) -> Callable[[Ablation], Ablation]:
    """Decorator: make ``fn(ours_params) -> variant_params`` selectable in ``codec.ablations``."""

    def deco(fn: Ablation) -> Ablation:
        if name in ABLATIONS:
            raise ValueError(f"ablation {name!r} is already registered")
        ABLATIONS[name] = fn
        return fn

    return deco


def _loss(p: CodecParams, **changes: float) -> CodecParams:
    return dataclasses.replace(p, loss=dataclasses.replace(p.loss, **changes))


def _preedit(p: CodecParams, **changes: bool) -> CodecParams:
    pre = dataclasses.replace(p.model.preedit, **changes)
    return dataclasses.replace(p, model=dataclasses.replace(p.model, preedit=pre))


@register_ablation("no_rank")
def _no_rank(p: CodecParams) -> CodecParams:
    """Without the token rank loss."""
    return _loss(p, w_rank=0.0)


@register_ablation("no_token")
def _no_token(p: CodecParams) -> CodecParams:
    """Without the token-level distortion (MSE and cosine); rank and pixel terms stay."""
    return _loss(p, w_token_mse=0.0, w_token_cos=0.0)


@register_ablation("no_pixel")
def _no_pixel(p: CodecParams) -> CodecParams:
    """Without the small pixel term: token losses only."""
    return _loss(p, w_pixel=0.0)


@register_ablation("no_lowpass")
def _no_lowpass(p: CodecParams) -> CodecParams:
    """Without the low-pass colour term."""
    return _loss(p, w_lowpass=0.0)


@register_ablation("no_preedit")
def _no_preedit(p: CodecParams) -> CodecParams:
    """Without the pre-editing net."""
    return _preedit(p, enabled=False)


@register_ablation("no_preedit_tokens")
def _no_preedit_tokens(p: CodecParams) -> CodecParams:
    """Pre-editing net without its LVLM token branch."""
    return _preedit(p, use_tokens=False)


def baseline_params(p: CodecStageParams) -> CodecParams:
    """The pixel-MSE baseline of the same architecture (its own lambdas, steps and crops)."""
    ours = p.ours
    loss = LossParams(lambdas=list(p.baseline.lambdas), w_token_mse=0.0, w_token_cos=0.0, w_rank=0.0,
                      rank_mode=ours.loss.rank_mode, w_pixel=1.0)
    train = dataclasses.replace(ours.train, init_from="", steps=p.baseline.steps or ours.train.steps,
                                patch_size=p.baseline.patch_size or ours.train.patch_size)
    base = dataclasses.replace(ours, loss=loss, train=train)
    if p.baseline.preedit == "no_tokens":
        base = _preedit(base, use_tokens=False)
    elif p.baseline.preedit == "off":
        base = _preedit(base, enabled=False)
    return base


def model_variants(p: CodecStageParams) -> dict[str, CodecParams]:
    """``name -> CodecParams`` of every codec the stage trains, ``ours`` first."""
    out = {OURS: p.ours}
    if p.baseline.enabled:
        out[BASELINE] = baseline_params(p)
    for name in p.ablations:
        out[f"{OURS}-{name}"] = ABLATIONS[name](p.ours)
    return out


def codec_names() -> set[str]:
    """Every name a codec of the stage can have, whatever the params."""
    return {OURS, BASELINE} | {f"{OURS}-{name}" for name in ABLATIONS}


def init_source(cp: CodecParams, variants: dict[str, CodecParams]) -> str | None:
    """The codec of the stage ``cp`` starts from (``None``: random weights or a folder)."""
    return cp.train.init_from if cp.train.init_from in variants else None


def training_order(variants: dict[str, CodecParams]) -> list[str]:
    """Names in the order they can be trained: every codec after the one it starts from.

    Raises ``ValueError`` on a cycle (a codec that starts, directly or not, from itself).
    """
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in seen:
            raise ValueError(f"codec {name!r} starts from itself: {' -> '.join(seen + (name,))}")
        src = init_source(variants[name], variants)
        if src is not None:
            visit(src, seen + (name,))
        order.append(name)

    for name in variants:
        visit(name, ())
    return order
