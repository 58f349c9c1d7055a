"""Schema of the ``lvlm`` section of params.yaml."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PromptParams:
    """Chat template (must contain ``<image>`` and ``{instruction}``) and task instructions."""

    system: str
    template: str
    vqa: str
    caption: str
    ground: str


@dataclass(frozen=True)
class ArchParams:
    """Sizes of the embedded model (ignored when ``source: pretrained``)."""

    image_size: int
    patch_size: int
    stem_layers: int          # 0: CLIP's one-conv patch embedding; n: n stride-2 3x3 convs
    stem_context: int         # stride-1 3x3 convs on the patch grid after the stem (wider view)
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_max_len: int
    projection_dim: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_intermediate: int
    vision_feature_layer: int


@dataclass(frozen=True)
class TrainParams:
    """The staged recipe: (A) CLIP, (B) projector alignment, (C) language model."""

    threads: int              # torch threads (0: leave torch's default)
    pool_scenes: int          # fresh training scenes, drawn from seed streams never used by val/test
    clip_steps: int
    clip_batch: int
    clip_lr: float
    clip_position_weight: float  # weight of the tower's per-patch grid row/column heads (0: off)
    text_steps: int           # phase A2: CLIP's text tower alone learns to point questions at their patches
    text_batch: int
    text_lr: float
    text_questions: int       # questions per scene in a text-phase batch
    align_steps: int
    align_batch: int
    align_lr: float
    align_position_scale: float  # position code added to the align target, in word-embedding norms (0: off)
    lm_steps: int
    lm_batch: int
    lm_lr: float
    lm_turns: int             # question/answer turns packed into one training sequence
    lm_bg_start: int          # background visual tokens kept per image at the first LM step ...
    lm_bg_ramp: float         # ... growing linearly to all of them over this fraction of LM steps
    lm_look_weight: float     # weight of the 'look' loss: answer-position attention mass on the
                              # patches a turn is about (0: off; at 1.0 on the head mean of one
                              # layer it starved colour readout in a measured run, so off by default)
    lm_look_layer: int        # LM layer whose head-mean attention the look loss supervises
    lm_where_weight: float    # relation questions (RelationHeads): MSE of a linear readout of each
                              # object's centre from the LM's hidden state at its shape word (0: off)
    lm_where_layer: int       # ... read after this many LM layers (hidden_states index)
    lm_compare_weight: float  # ... and of the first centre minus the second, one layer later at the
                              # answer-predicting token (0: off)
    lm_projector_lr_scale: float  # phase C's projector lr as a fraction of lm_lr (0: frozen, keeps
                              # phase B's map of words + position code)
    lm_isolate_turns: bool    # each turn a separate single-turn sample sharing the image (turn_mask)
    lm_loss_per: Literal["token", "turn"]  # answer-token CE averaged per token, or per
                              # turn (a 20-word caption then weighs as much as a one-word answer)
    caption_prob: float       # chance that a sequence includes a caption turn
    ground_prob: float        # chance that a sequence includes a grounding turn
    warmup_steps: int
    checkpoint_every: int     # steps between resumable checkpoints
    eval_every: int           # steps between quick val checks (training curves)

    @property
    def relation_readouts(self) -> bool:
        """Whether phase C trains :class:`~vlmcompress.lvlm.train.RelationHeads`."""
        return self.lm_where_weight > 0 or self.lm_compare_weight > 0


@dataclass(frozen=True)
class EvalParams:
    batch_size: int
    max_questions: int        # 0: all test questions
    max_captions: int         # images captioned for CIDEr (0: all)
    max_refs: int             # referring expressions grounded (0: all)
    gallery: int              # retrieval gallery size (images; 0: whole split)
    text_probe_images: int    # test images of the text-guidance probe (lvlm/probe.py; 0: off)


@dataclass(frozen=True)
class LvlmParams:
    source: Literal["train", "pretrained"]   # train: embedded model; pretrained: load llava/clip
    llava: str                # hub id or folder (pretrained)
    clip: str
    dtype: Literal["float32", "bfloat16", "float16"]
    device: str
    attn_layer: int           # vision layer whose CLS attention the adapter records
    prompts: PromptParams
    arch: ArchParams
    train: TrainParams
    eval: EvalParams
