"""Schema of the ``lvlm`` section of params.yaml."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Literal

from vlmcompress.schema import ConfigError, check_min, check_range, clip, require, show


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
    clip_place_weight: float  # weight of the tower's per-patch regression of its object's centre
                              # (labels.patch_centres: sub-patch precision; 0: off)
    clip_xy_weight: float     # weight of the tower's per-patch regression of its own centre (0: off)
    clip_box_weight: float    # weight of the tower's per-patch regression of its object's box
                              # (labels.patch_boxes; 0: off)
    text_steps: int           # phase A2: CLIP's text tower alone learns to point questions at their patches
    text_batch: int
    text_lr: float
    text_questions: int       # questions per scene in a text-phase batch
    align_steps: int
    align_batch: int
    align_lr: float
    align_position_scale: float  # position code added to the align target, in word-embedding norms (0: off)
    align_position_target: Literal["patch", "object", "box"]  # whose place that code is: the patch's
                              # own, or the centre (object) or box (box: four directions) of the object
                              # it shows, shared by all its patches
    align_place_weight: float  # extra weight of the alignment error along the place code's two directions (0: none)
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
    lm_look_on: Literal["answers", "ground", "ground_word"]  # ... at each turn's answer-predicting
                              # token on its patches, or only on grounding turns, at each token
                              # predicting a box coordinate, on the object's patches (ground) or on
                              # the expression's shape word (ground_word)
    lm_look_start: float      # ... and the hop loss, switched on after this fraction of the LM steps
    lm_look_heads: int        # ... on the mean of the layer's first this many heads (0: all): the
                              # others stay free for what the same layer does on other turns
    lm_hop_weight: float      # weight of the 'hop' look loss: on grounding turns, the referred shape
                              # word's attention mass on that object's patches (0: off; from lm_look_start)
    lm_hop_layer: int         # LM layer whose attention the hop loss supervises
    lm_hop_heads: int         # ... the mean of its first this many heads (0: all)
    lm_hop_on: Literal["ground", "exists", "named"]   # ... at grounding turns only, + existence
                              # questions' shape word, or + every question's object phrases (head
                              # word): on the named objects' patches, or the first token if none
    lm_phrase_weight: float   # weight of the 'phrase' look: each hop word's attention mass on the
                              # colour word before it ("red" in "the red cube"), so the word the
                              # hop reads from carries colour and shape (0: off; from lm_look_start)
    lm_phrase_layer: int      # LM layer whose attention the phrase look supervises (before lm_hop_layer)
    lm_phrase_heads: int      # ... the mean of its first this many heads (0: all)
    lm_where_weight: float    # relation questions (RelationHeads): MSE of a linear readout of each
                              # object's centre from the LM's hidden state at its shape word (0: off)
    lm_where_layer: int       # ... read after this many LM layers (hidden_states index)
    lm_compare_weight: float  # ... and of the first centre minus the second, one layer later at the
                              # answer-predicting token (0: off)
    lm_ground_weight: float   # grounding turns: the where readout of the referred object's centre at
                              # its shape word, and MSE of a linear readout of each box coordinate
                              # from the last hidden state at the token predicting it (0: off)
    lm_ground_start: float    # ... switched on after this fraction of the LM steps (the relation
                              # readouts' routing forms first; grounding turns train by CE throughout)
    lm_projector_lr_scale: float  # phase C's projector lr as a fraction of lm_lr (0: frozen, keeps
                              # phase B's map of words + position code)
    lm_isolate_turns: bool    # each turn a separate single-turn sample sharing the image (turn_mask)
    lm_type_focus: float      # share of questions whose type is drawn by its recent answer error
                              # relative to chance (curriculum.type_probs; 0: the types cycle evenly)
    lm_loss_per: Literal["token", "turn"]  # answer-token CE averaged per token, or per
                              # turn (a 20-word caption then weighs as much as a one-word answer)
    lm_number_sigma: float    # box coordinates: CE against a Gaussian over the number tokens'
                              # values of this width (0: one-hot); near misses then cost less
    caption_prob: float       # chance that a sequence includes a caption turn
    ground_prob: float        # chance that a sequence includes grounding turns ...
    ground_turns: int         # ... about this many different objects (or all, if fewer)
    ground_schedule: list[tuple[float, float, int]]  # (from fraction of the LM steps, ground_prob,
                              # ground_turns) from then on, ascending ([]: constant)
    ground_absent: float      # chance that a grounding turn names an object the scene lacks (a
                              # near miss), answered "no" (0: every named object is there)
    warmup_steps: int
    checkpoint_every: int     # steps between resumable checkpoints
    eval_every: int           # steps between quick val checks (training curves)

    @property
    def relation_readouts(self) -> bool:
        """Whether phase C trains :class:`~vlmcompress.lvlm.heads.RelationHeads`."""
        return self.lm_where_weight > 0 or self.lm_compare_weight > 0 or self.lm_ground_weight > 0


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
    image_aspect: Literal["pad", "crop", "resize"]   # how any image becomes the tower's square (lvlm/imageprep.py)
    prompts: PromptParams
    arch: ArchParams
    train: TrainParams
    eval: EvalParams


# Placeholders each prompt is formatted with (lvlm/adapter.py Prompts); system and caption are not formatted.
_PROMPT_FIELDS = {"template": "instruction", "vqa": "question", "ground": "ref"}
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]+)?")   # a torch device string: cpu, cuda, cuda:1, mps, ...


def check_lvlm_params(p: LvlmParams, path: str = "lvlm") -> None:
    """Value checks of the ``lvlm`` section (messages name the key path)."""

    if p.source == "pretrained":
        for name in ("llava", "clip"):
            require(getattr(p, name).strip() != "", f"{path}.{name}",
                    "needs a hub id or folder with source: pretrained")
    require(_DEVICE.fullmatch(p.device) is not None, f"{path}.device",
            f"must be a torch device such as cpu, cuda or cuda:1, got {show(p.device)}")
    check_prompts(p.prompts, f"{path}.prompts")
    check_arch_params(p.arch, f"{path}.arch")
    check_train_params(p.train, p.arch, f"{path}.train")
    check_eval_params(p.eval, f"{path}.eval")
    if p.source == "train":   # a hub model's depth is known only once it is loaded
        n = p.arch.vision_layers
        check_range(f"{path}.attn_layer", p.attn_layer, -n, n - 1)


def check_prompts(p: PromptParams, path: str = "lvlm.prompts") -> None:
    """Each formatted prompt holds exactly its own ``{placeholder}`` (no format spec or conversion,
    so formatting cannot fail or grow); ``<image>`` appears once, in the template only."""

    for name in ("system", "template", "vqa", "caption", "ground"):
        text, want = getattr(p, name), _PROMPT_FIELDS.get(name)
        if want is not None:
            try:
                fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
            except ValueError as exc:   # an unmatched brace
                raise ConfigError(f"{path}.{name}: not a format string ({clip(str(exc))}): {show(text)}") from None
            require(all(f == want and not spec and conv is None for f, spec, conv in fields) and len(fields) > 0,
                    f"{path}.{name}", f"needs the placeholder {{{want}}} and no other (write {{{{ or }}}} for a "
                    f"literal brace), got {show(text)}")
        count = text.count("<image>")
        if name == "template":
            require(count == 1, f"{path}.template", f"needs exactly one <image>, got {count}")
        else:
            require(count == 0, f"{path}.{name}", "must not contain <image> (only the template places the image)")


def check_arch_params(a: ArchParams, path: str = "lvlm.arch") -> None:
    """Positive sizes, a patch grid that tiles the image, and widths that split into heads."""

    for name in ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "text_hidden",
                 "text_layers", "text_heads", "text_max_len", "projection_dim", "lm_hidden", "lm_layers",
                 "lm_heads", "lm_intermediate"):
        check_min(f"{path}.{name}", getattr(a, name), 1)
    check_min(f"{path}.stem_context", a.stem_context, 0)
    require(a.image_size % a.patch_size == 0, f"{path}.patch_size",
            f"must divide {path}.image_size ({show(a.image_size)}), got {show(a.patch_size)}")
    # The stem is stem_layers stride-2 convolutions: its stride 2**stem_layers is the patch size.
    check_range(f"{path}.stem_layers", a.stem_layers, 0, 16)
    if a.stem_layers > 0:
        require(2 ** a.stem_layers == a.patch_size, f"{path}.stem_layers",
                f"gives stride 2**{a.stem_layers} = {2 ** a.stem_layers}, but {path}.patch_size is "
                f"{show(a.patch_size)} (0: one-conv patch embedding)")
    for part in ("vision", "text", "lm"):
        hidden, heads = getattr(a, f"{part}_hidden"), getattr(a, f"{part}_heads")
        require(hidden % heads == 0, f"{path}.{part}_hidden",
                f"must be a multiple of {path}.{part}_heads ({show(heads)}), got {show(hidden)}")
    n = a.vision_layers   # hidden_states holds the embeddings and one entry per layer
    check_range(f"{path}.vision_feature_layer", a.vision_feature_layer, -(n + 1), n)


def check_train_params(t: TrainParams, a: ArchParams, path: str = "lvlm.train") -> None:
    """Steps, batches, rates and weights of the training recipe; layer indices against ``a``."""

    check_min(f"{path}.threads", t.threads, 0, " (0: torch's default)")
    check_min(f"{path}.pool_scenes", t.pool_scenes, 1)
    for phase in ("clip", "text", "align", "lm"):
        check_min(f"{path}.{phase}_steps", getattr(t, f"{phase}_steps"), 0)
        batch = getattr(t, f"{phase}_batch")
        check_min(f"{path}.{phase}_batch", batch, 1)
        # A batch is drawn from the pool without replacement.
        require(batch <= t.pool_scenes, f"{path}.{phase}_batch",
                f"must be <= {path}.pool_scenes ({show(t.pool_scenes)}), got {show(batch)}")
        lr = getattr(t, f"{phase}_lr")
        require(lr > 0, f"{path}.{phase}_lr", f"must be > 0, got {show(lr)}")
    for name in ("clip_position_weight", "clip_place_weight", "clip_xy_weight", "clip_box_weight",
                 "align_position_scale", "align_place_weight", "lm_projector_lr_scale", "lm_look_weight",
                 "lm_hop_weight", "lm_phrase_weight", "lm_where_weight", "lm_compare_weight", "lm_ground_weight",
                 "lm_number_sigma"):
        check_min(f"{path}.{name}", getattr(t, name), 0.0)
    check_min(f"{path}.text_questions", t.text_questions, 1)
    check_min(f"{path}.lm_turns", t.lm_turns, 1)
    check_min(f"{path}.ground_turns", t.ground_turns, 1)
    for i, (start, prob, turns) in enumerate(t.ground_schedule):
        at = f"{path}.ground_schedule[{i}]"
        check_range(f"{at}[0]", start, 0.0, 1.0)
        check_range(f"{at}[1]", prob, 0.0, 1.0)
        check_min(f"{at}[2]", turns, 1)
        require(i == 0 or start > t.ground_schedule[i - 1][0], at, "must start after the entry before it")
    check_min(f"{path}.lm_bg_start", t.lm_bg_start, 0)
    for name in ("lm_bg_ramp", "lm_ground_start", "lm_look_start", "lm_type_focus", "caption_prob", "ground_prob",
                 "ground_absent"):
        check_range(f"{path}.{name}", getattr(t, name), 0.0, 1.0)
    check_min(f"{path}.warmup_steps", t.warmup_steps, 0)
    check_min(f"{path}.checkpoint_every", t.checkpoint_every, 1)
    check_min(f"{path}.eval_every", t.eval_every, 1)
    if t.lm_look_weight > 0:
        check_range(f"{path}.lm_look_layer", t.lm_look_layer, 0, a.lm_layers - 1)
        check_range(f"{path}.lm_look_heads", t.lm_look_heads, 0, a.lm_heads)
    if t.lm_hop_weight > 0:
        check_range(f"{path}.lm_hop_layer", t.lm_hop_layer, 0, a.lm_layers - 1)
        check_range(f"{path}.lm_hop_heads", t.lm_hop_heads, 0, a.lm_heads)
    if t.lm_phrase_weight > 0:
        require(t.lm_hop_weight > 0, f"{path}.lm_phrase_weight", "needs lm_hop_weight > 0 (it looks from the hop's words)")
        check_range(f"{path}.lm_phrase_layer", t.lm_phrase_layer, 0, t.lm_hop_layer - 1)
        check_range(f"{path}.lm_phrase_heads", t.lm_phrase_heads, 0, a.lm_heads)
    if t.relation_readouts:   # the Trainer's rule: the compare readout reads the layer after it
        check_range(f"{path}.lm_where_layer", t.lm_where_layer, 0, a.lm_layers - 1)


def check_eval_params(e: EvalParams, path: str = "lvlm.eval") -> None:
    """A positive batch and non-negative limits."""

    check_min(f"{path}.batch_size", e.batch_size, 1)
    for name in ("max_questions", "max_captions", "max_refs", "gallery", "text_probe_images"):
        check_min(f"{path}.{name}", getattr(e, name), 0, " (0: all)" if name != "text_probe_images" else " (0: off)")
