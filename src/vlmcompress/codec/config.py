"""Schema of a learned-codec section of params.yaml (model, loss, training).

One :class:`CodecParams` describes one trained codec; the LVLM-oriented codec and the
pixel-MSE baseline are two instances that differ only in values (the baseline turns the
token terms and, usually, the pre-editing net off). :func:`check_codec_params` adds the
cross-field checks a type check cannot express, with messages naming the key path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vlmcompress.registry import Registry
from vlmcompress.schema import SEED_MAX, ConfigError, check_choice, check_names, check_range, require, show

# Registries of what a codec section names: built-ins declared here by where they live, so the
# checks below know the names without importing torch; users add theirs with the decorators
# (vlmcompress.codec.model.register_model, vlmcompress.codec.losses.register_rank_loss).
MODELS: Registry = Registry("codec model", {
    "gained-mean-scale-hyperprior": "vlmcompress.codec.model:GainedMeanScaleHyperprior"})
RANK_LOSSES: Registry = Registry("rank loss", {
    "spectrum": "vlmcompress.codec.losses:spectrum_rank_loss",
    "effective_rank": "vlmcompress.codec.losses:effective_rank_loss"})

VVENC_PRESETS = ("faster", "fast", "medium", "slow", "slower")   # ffmpeg libvvenc -preset 0..4, the VVC anchor's
# Where the token terms compare original and reconstruction: the tower's features (what any
# LVLM on that tower reads) or the projector's output (the LM's input space, where a drifted
# hue moves the token as far as the LM's colour words are apart).
TOKEN_SPACES = ("tower", "projector")
LOWPASS_WEIGHTINGS = ("uniform", "attention")


@dataclass(frozen=True)
class PreEditParams:
    """U-Net-like pre-editing network run on the encoder side before coding."""

    enabled: bool
    channels: int            # width of the first level; doubles at each downsampling
    depth: int               # number of stride-2 downsamplings (the image is padded to 64 anyway)
    use_tokens: bool         # fuse the LVLM vision tower's patch tokens at the bottleneck
    token_dim: int           # Dv, the width of those tokens (ignored when use_tokens is false)
    token_channels: int      # width the tokens are projected to before fusion


@dataclass(frozen=True)
class CodecModelParams:
    """Variable-rate mean-scale hyperprior with gain units (one model, many rates)."""

    name: str                       # a name in MODELS
    N: int                          # channels of the transforms and of the hyper latent z
    M: int                          # channels of the latent y
    levels: int                     # R discrete rate levels; `rate` is a float in [0, R-1]
    gain_init: tuple[float, float]  # gain of level 0 and level R-1 at init (geometric in between)
    hyper_gain: bool                # gain units on the hyper latent z too
    preedit: PreEditParams
    hyper_channels: int = 0         # channels of the hyper latent z (0: N). At 0.1 bpp on 128 px z
                                    # is a third of the file: fewer channels, fewer side bits
    synthesis_tail: int = 0         # channels between the synthesis transform's last two upsamplings
                                    # (0: N); they run at 1/4 and full resolution, most of the decode
    synthesis_tail_kernel: int = 5  # kernel side of those two upsamplings (odd; 3: 9 taps, not 25)


@dataclass(frozen=True)
class LossParams:
    """Rate + weighted distortion terms; a term with weight 0 is not computed at all."""

    lambdas: list[float]        # one Lagrange multiplier per rate level (len == levels)
    w_token_mse: float          # MSE between LVLM visual tokens of original and reconstruction
    w_token_cos: float          # 1 - cosine similarity of the same tokens, averaged
    w_rank: float               # token rank loss (eigenvalue spectrum of the token matrix)
    rank_mode: str              # a name in RANK_LOSSES
    w_pixel: float              # pixel MSE, scaled by 255**2 as in CompressAI
    w_lowpass: float = 0.0      # MSE of lowpass x lowpass block means (colour of regions), also x 255**2
    lowpass: int = 8            # block side of that term (the LVLM's patch size keeps one colour per token)
    token_space: str = "tower"  # token terms on: tower (features fed to the projector) | projector (its output)
    lowpass_weighting: str = "uniform"  # low-pass blocks: uniform | attention (the LVLM's CLS attention of the original)


@dataclass(frozen=True)
class CodecTrainParams:
    seed: int
    steps: int
    batch_size: int
    patch_size: int               # random crops of this size (images smaller than it: error)
    lr: float
    aux_lr: float
    lr_decay_at: float            # fraction of `steps` after which lr is multiplied by 0.1
    grad_clip: float              # max grad norm of the main parameters (0: off)
    rate_sampling: Literal["discrete", "continuous"]  # level per batch: integer, or uniform float
    checkpoint_every: int         # steps between resumable checkpoints
    log_every: int                # steps between rows of curves.csv
    quantile_update: bool         # end of training: fit the entropy bottleneck's quantiles by
                                  # bisection (CompressAI update_quantiles) before saving; short
                                  # runs leave the aux-loss fit far from converged
    init_from: str = ""           # "": random weights | a codec of the stage (e.g. pixel_baseline,
                                  # trained first) | a saved codec folder: fine-tune from it
    gain_lr_scale: float = 1.0    # lr multiplier of the gain units: at 1 a 500-step run leaves the
                                  # per-level gains at their init, so every level codes alike


@dataclass(frozen=True)
class CodecParams:
    model: CodecModelParams
    loss: LossParams
    train: CodecTrainParams


@dataclass(frozen=True)
class BaselineParams:
    """The pixel baseline: the same architecture, loss ``bpp + lambda*255**2*MSE``; its own
    step count and crop size (a pixel codec needs no whole scene: it learns from crops)."""

    enabled: bool
    lambdas: list[float]     # one per rate level, in CompressAI's units (MSE on 0..255 pixels)
    preedit: Literal["same", "no_tokens", "off"]  # keep the pre-editing net as is, without its
                                                  # LVLM token branch (a pixel codec needs no LVLM), or drop it
    steps: int = 0           # training steps (0: train.steps)
    patch_size: int = 0      # random crops of this size (0: train.patch_size)


@dataclass(frozen=True)
class CodecEvalParams:
    """What the codec stage measures after training (real files, test split)."""

    n_test_images: int       # first this many test images for bpp / PSNR / token distortion (0: all)
    n_rates: int             # rates evenly spaced over [0, levels-1] in rd.csv (>= 2: both ends)
    example_rates: list[float]  # rates of the reconstructions shown in the notebook
    timing_repeats: int      # encode/decode of the 512x512 image: median of this many, after a warm-up
    timing_threads: int      # torch and VVenC threads while timing (0: leave torch's default)
    vvc_preset: str          # VVenC preset of the speed comparison
    vvc_qp: int              # VVC QP of the speed comparison


@dataclass(frozen=True)
class CodecStageParams:
    """The ``codec`` section of params.yaml: our codec, its pixel baseline, ablations, evaluation.

    ``model``/``loss``/``train`` describe ``ours`` (the LVLM-oriented codec); the baseline
    and every ablation are derived from them (:mod:`vlmcompress.codec.variants`).
    """

    model: CodecModelParams
    loss: LossParams
    train: CodecTrainParams
    baseline: BaselineParams
    ablations: list[str]     # names in vlmcompress.codec.variants.ABLATIONS, each trained like ours
    eval: CodecEvalParams
    max_pixels: int          # largest image encode and decode accept: bounds the decoder's memory
    train_images: str        # "": the data stage's train split | a folder of images to train on instead

    @property
    def ours(self) -> CodecParams:
        return CodecParams(model=self.model, loss=self.loss, train=self.train)


def check_model_params(p: CodecModelParams, path: str = "model") -> None:
    """Value checks of a model section (raises :class:`ConfigError` naming the key)."""
    require(p.N > 0, f"{path}.N", f"must be > 0, got {show(p.N)}")
    require(p.M > 0, f"{path}.M", f"must be > 0, got {show(p.M)}")
    require(p.hyper_channels >= 0, f"{path}.hyper_channels",
             f"must be >= 0 (0: N), got {show(p.hyper_channels)}")
    require(p.synthesis_tail >= 0, f"{path}.synthesis_tail",
             f"must be >= 0 (0: N), got {show(p.synthesis_tail)}")
    k = p.synthesis_tail_kernel
    require(k >= 3 and k % 2 == 1, f"{path}.synthesis_tail_kernel", f"must be odd and >= 3, got {show(k)}")
    require(1 <= p.levels <= 64, f"{path}.levels", f"must be in [1, 64], got {show(p.levels)}")
    lo, hi = p.gain_init
    require(all(math.isfinite(g) and g > 0 for g in (lo, hi)), f"{path}.gain_init",
             f"gains must be finite and > 0, got {show(list(p.gain_init))}")
    require(lo <= hi, f"{path}.gain_init", "must be non-decreasing (level R-1 is the highest rate)")
    e = p.preedit
    if e.enabled:
        require(e.channels > 0, f"{path}.preedit.channels", f"must be > 0, got {show(e.channels)}")
        require(1 <= e.depth <= 6, f"{path}.preedit.depth", f"must be in [1, 6], got {show(e.depth)}")
        if e.use_tokens:
            require(e.token_dim > 0, f"{path}.preedit.token_dim", f"must be > 0, got {show(e.token_dim)}")
            require(e.token_channels > 0, f"{path}.preedit.token_channels",
                     f"must be > 0, got {show(e.token_channels)}")


def _check_lambdas(lambdas: list[float], levels: int, path: str) -> None:
    """One finite, positive multiplier per rate level, increasing with the level (higher rate)."""
    require(len(lambdas) == levels, path, f"needs one value per rate level ({levels}), got {len(lambdas)}")
    require(all(math.isfinite(v) and v > 0 for v in lambdas), path,
             f"values must be finite and > 0, got {show(lambdas)}")
    require(all(a < b for a, b in zip(lambdas, lambdas[1:])), path,
             f"must increase with the rate level (a higher level spends more bits), got {show(lambdas)}")


def check_codec_params(p: CodecParams, path: str = "codec") -> None:
    """Cross-field checks of a whole codec section."""

    check_choice(f"{path}.model.name", p.model.name, MODELS.names(), "model")
    check_model_params(p.model, f"{path}.model")
    lo = p.loss
    _check_lambdas(lo.lambdas, p.model.levels, f"{path}.loss.lambdas")
    for name in ("w_token_mse", "w_token_cos", "w_rank", "w_pixel", "w_lowpass"):
        v = getattr(lo, name)
        require(math.isfinite(v) and v >= 0, f"{path}.loss.{name}", f"must be >= 0, got {show(v)}")
    require(lo.lowpass >= 1, f"{path}.loss.lowpass", f"must be >= 1, got {show(lo.lowpass)}")
    check_choice(f"{path}.loss.token_space", lo.token_space, TOKEN_SPACES, "token space")
    check_choice(f"{path}.loss.lowpass_weighting", lo.lowpass_weighting, LOWPASS_WEIGHTINGS, "weighting")
    require(lo.w_token_mse + lo.w_token_cos + lo.w_rank + lo.w_pixel + lo.w_lowpass > 0, f"{path}.loss",
             "at least one distortion weight must be > 0")
    check_choice(f"{path}.loss.rank_mode", lo.rank_mode, RANK_LOSSES.names(), "rank loss")
    t = p.train
    check_range(f"{path}.train.seed", t.seed, 0, SEED_MAX)
    for name in ("steps", "batch_size", "patch_size", "checkpoint_every", "log_every"):
        v = getattr(t, name)
        require(v > 0, f"{path}.train.{name}", f"must be > 0, got {show(v)}")
    require(t.patch_size % 64 == 0, f"{path}.train.patch_size",
             f"must be a multiple of 64 (the codec's stride), got {show(t.patch_size)}")
    require(t.lr > 0, f"{path}.train.lr", f"must be > 0, got {show(t.lr)}")
    require(t.aux_lr > 0, f"{path}.train.aux_lr", f"must be > 0, got {show(t.aux_lr)}")
    require(0 < t.lr_decay_at <= 1, f"{path}.train.lr_decay_at", f"must be in (0, 1], got {show(t.lr_decay_at)}")
    require(t.grad_clip >= 0, f"{path}.train.grad_clip", f"must be >= 0 (0: off), got {show(t.grad_clip)}")
    require(math.isfinite(t.gain_lr_scale) and t.gain_lr_scale > 0, f"{path}.train.gain_lr_scale",
             f"must be > 0, got {show(t.gain_lr_scale)}")


def check_stage_params(p: CodecStageParams, path: str = "codec") -> None:
    """Checks of the whole ``codec`` section, including every codec it derives."""
    from vlmcompress.codec.variants import ABLATIONS, model_variants  # late: avoids a cycle

    from vlmcompress.codec.bitstream import MAX_DIM
    check_codec_params(p.ours, path)
    require(1 <= p.max_pixels <= MAX_DIM * MAX_DIM, f"{path}.max_pixels",
             f"must be in [1, {MAX_DIM * MAX_DIM}], got {show(p.max_pixels)}")
    from pathlib import Path
    require(not p.train_images or Path(p.train_images).is_dir(), f"{path}.train_images",
             f'must be "" (the train split) or a folder of images, got {show(p.train_images)}')
    b = p.baseline
    _check_lambdas(b.lambdas, p.model.levels, f"{path}.baseline.lambdas")
    require(b.steps >= 0, f"{path}.baseline.steps", f"must be >= 0 (0: train.steps), got {show(b.steps)}")
    require(b.patch_size >= 0 and b.patch_size % 64 == 0, f"{path}.baseline.patch_size",
             f"must be 0 (train.patch_size) or a multiple of 64 (the codec's stride), got {show(b.patch_size)}")
    check_names(f"{path}.ablations", p.ablations, sorted(ABLATIONS), "ablation", allow_empty=True)
    variants = model_variants(p)
    for name, variant in variants.items():
        try:
            check_codec_params(variant, path)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in codec variant {name!r})") from None
    src = p.train.init_from
    if src:
        from vlmcompress.codec.variants import codec_names, training_order
        # A codec's name that this params file does not train is a mistake, not a folder.
        require(src in variants or src not in codec_names(), f"{path}.train.init_from",
                 f"{show(src)} is not trained by this params file (codecs: {', '.join(variants)})")
        try:
            training_order(variants)
        except ValueError as exc:
            require(False, f"{path}.train.init_from", str(exc))
    e = p.eval
    require(e.n_test_images >= 0, f"{path}.eval.n_test_images",
             f"must be >= 0 (0: all), got {show(e.n_test_images)}")
    require(e.n_rates >= 2, f"{path}.eval.n_rates", f"must be >= 2 (both ends), got {show(e.n_rates)}")
    require(len(e.example_rates) > 0, f"{path}.eval.example_rates", "needs at least one rate")
    for i, r in enumerate(e.example_rates):
        require(0 <= r <= p.model.levels - 1, f"{path}.eval.example_rates[{i}]",
                 f"must be in [0, {p.model.levels - 1}], got {show(r)}")
    require(e.timing_repeats > 0, f"{path}.eval.timing_repeats", f"must be > 0, got {show(e.timing_repeats)}")
    require(e.timing_threads >= 0, f"{path}.eval.timing_threads",
             f"must be >= 0 (0: torch's default), got {show(e.timing_threads)}")
    check_choice(f"{path}.eval.vvc_preset", e.vvc_preset, VVENC_PRESETS, "VVenC preset")
    require(0 <= e.vvc_qp <= 63, f"{path}.eval.vvc_qp", f"must be in [0, 63], got {show(e.vvc_qp)}")
