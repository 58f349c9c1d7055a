"""Staged training of the embedded LLaVA-architecture model on procedural scenes.

Trained jointly from scratch with the loss on answers only, a small LLaVA stays at the
most-common-answer baseline: its language model never learns to look. A staged recipe
fixes that, each stage giving the next a signal it can use:

A. **CLIP** (vision + text towers): per-patch heads on the LLaVA feature layer (colour,
   shape, size, object centre), patch-to-phrase alignment in the joint space (each object
   patch matches the text embedding of ``"a small red circle"``), and the usual contrastive
   image-caption loss.
A2. **Text tower** (vision frozen): each training question's CLIP embedding is pulled onto the
   patches it asks about (``relevant_patches``: a softmax over the image's patches with the
   target spread over them), beside the caption contrastive loss. Phase A aligns patches with
   full phrases only ("a small red circle"); a question naming just a shape ("how many
   circles") then pointed nowhere, and text-guided token recovery had nothing to recover.
B. **Projector alignment**: each projected patch token is regressed onto the sum of the LM's
   word embeddings of its object's words (background onto ``"background"``), so the LM starts
   out reading visual tokens as if they were words.
C. **Language model** (+ projector; towers frozen): multi-turn sequences (several questions,
   sometimes a caption and a grounding turn, about one image), loss on answer tokens, plus
   :class:`RelationHeads`' readouts of where a relation question's two objects are.

Training data are fresh scenes from seed streams that never produce val/test scenes. Every
batch is a pure function of ``(seed, phase, step)``, so a resumed run sees the same batches.
Each phase has a digest of the params it depends on (:func:`phase_digests`); a finished phase
whose digest still matches is reused, so a changed text-phase recipe retrains neither the
projector nor the LM.
Written with ``accelerate`` so the same code runs under ``accelerate launch``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from vlmcompress.data.config import ScenesParams
from vlmcompress.data.scenes import (COLORS, PLURALS, QUESTION_TYPES, SHAPES, SIZES, SceneObject, make_captions,
                                     make_questions, make_refs, make_scene, question_candidates, question_objects,
                                     scene_rng, sample_scene)
from vlmcompress.io import atomic_path, write_json
from vlmcompress.lvlm.adapter import CLIP_MEAN, CLIP_STD, LVLM, Prompts
from vlmcompress.lvlm.build import ModelSpec, build_clip, build_llava, save_lvlm
from vlmcompress.lvlm.config import LvlmParams
from vlmcompress.lvlm.labels import COLOR_IDS, SHAPE_IDS, patch_labels
from vlmcompress.lvlm.tokenizer import build_tokenizers, build_vocab

POOL_STREAM = 100          # seed stream of the training pool (val/test use 1..3)
VOCAB_STREAM = 99          # scenes whose language seeds the vocabulary
PHRASES = ["background"] + [f"a {z} {c} {s}" for z in SIZES for c in COLORS for s in SHAPES]


def phrase_index(labels: Tensor) -> Tensor:
    """Per-patch index into :data:`PHRASES` from ``labels [..., 4, G, G]`` -> ``[..., G, G]``."""
    color, shape, size = labels[..., 0, :, :], labels[..., 1, :, :], labels[..., 2, :, :]
    idx = ((size - 1) * len(COLORS) + (color - 1)) * len(SHAPES) + (shape - 1) + 1
    return torch.where(color > 0, idx, torch.zeros_like(idx))


SHAPE_WORDS = {**SHAPE_IDS, **{PLURALS[s]: i for s, i in SHAPE_IDS.items()}}


def relevant_patches(text: str, labels: Tensor) -> Tensor:
    """The patches a turn is about, from its words and the dense labels ``[4, G, G]`` -> ``[N]`` bool.

    Colour-shape pairs in the text ("the red circle") select those objects' patches; without
    a pair, or when no object matches one (a "no" existence question), any patch sharing a
    named colour or shape; a turn naming neither (a caption) is about every object patch.
    """
    words = re.findall(r"[a-z]+", text.lower())
    color, shape = labels[0].flatten(), labels[1].flatten()
    obj = color > 0
    pairs = [(COLOR_IDS[a], SHAPE_WORDS[b]) for a, b in zip(words, words[1:]) if a in COLOR_IDS and b in SHAPE_WORDS]
    out = torch.zeros_like(obj)
    for c, s in pairs:
        out |= (color == c) & (shape == s)
    if out.any():
        return out
    cols = [COLOR_IDS[w] for w in words if w in COLOR_IDS]
    shps = [SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS]
    if not cols and not shps:
        return obj
    for c in cols:
        out |= color == c
    for s in shps:
        out |= obj & (shape == s)
    return out


def look_loss(attn: Tensor, queries: Tensor, targets: Tensor) -> Tensor:
    """Negative log attention mass on the relevant tokens, averaged over queries.

    ``attn [B, H, T, T]`` softmax attention of one layer; ``queries [Q, 2]`` (batch row,
    position) of the tokens that predict an answer; ``targets [Q, T]`` bool relevant keys.
    Queries without a relevant key (e.g. a scene with no object named) are skipped.
    """
    rows = attn[queries[:, 0], :, queries[:, 1]].mean(1)              # [Q, T]
    mass = (rows * targets).sum(-1)
    has = targets.any(-1)
    if not has.any():
        return attn.new_zeros(())
    return -(mass[has].clamp(min=1e-6).log()).mean()


_RELATIONS = (" left of ", " right of ", " above ", " below ")


def relation_targets(text: str, objs: Sequence[SceneObject], image_size: int
                     ) -> tuple[tuple[str, str], Tensor] | None:
    """The two objects of a relation question: their shape words and where they are, ``[2, 2]``
    = (x, y) of each centre mapped to [-1, 1], in the question's order. None for any other
    turn, or when a named object is not in ``objs`` (names are unique within a scene)."""
    low = text.lower()
    named = question_objects(low)         # the generator's wording is read in one place
    if not any(r in low for r in _RELATIONS) or len(named) != 2 or any(None in n for n in named):
        return None
    by_name = {o.name: o for o in objs}
    pair = [by_name.get(f"{c} {s}") for c, s in named]
    if pair[0] is None or pair[1] is None:
        return None
    xy = torch.tensor([[o.cx, o.cy] for o in pair], dtype=torch.float32)
    return (pair[0].shape, pair[1].shape), 2 * xy / image_size - 1


def word_positions(prompt_ids: Sequence[int], first: int, second: int) -> tuple[int, int] | None:
    """Where a relation question's two shape words are among its prompt's token ids: the first
    occurrence of ``first`` and the last of ``second`` (the two may be the same word). None
    if either is missing."""
    ids = list(prompt_ids)
    if first not in ids or second not in ids:
        return None
    return ids.index(first), len(ids) - 1 - ids[::-1].index(second)


class RelationHeads(nn.Module):
    """Phase C's auxiliary readouts for relation questions ("is the red circle left of the blue
    square?"), on the LM's hidden states; training only, not part of the saved LLaVA.

    ``where``: after ``layer`` LM layers, at each of the question's two shape words, that
    object's centre. ``compare``: one layer later, at the answer-predicting token, the first
    centre minus the second. Without them the LM answered relation questions at chance after
    2,000 steps, though a linear probe read "left of" from the visual tokens 81-96% of the time:
    nothing asked it to carry where an object is to the token that answers.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.where = nn.Linear(dim, 2)
        self.compare = nn.Linear(dim, 2)

    def losses(self, hidden: Sequence[Tensor], layer: int, words: Tensor, answers: Tensor, xy: Tensor
               ) -> tuple[Tensor, Tensor]:
        """MSE of both readouts. ``hidden``: the LM's hidden states (embeddings first), each
        ``[B, T, D]``; ``words [2Q, 2]`` (batch row, index) of the Q questions' shape words,
        first object then second for each; ``answers [Q, 2]`` their answer-predicting tokens;
        ``xy [Q, 2, 2]`` the two centres in [-1, 1]."""
        where = F.mse_loss(self.where(hidden[layer][words[:, 0], words[:, 1]]), xy.flatten(0, 1))
        diff = xy[:, 0] - xy[:, 1]
        compare = F.mse_loss(self.compare(hidden[layer + 1][answers[:, 0], answers[:, 1]]), diff)
        return where, compare


def turn_mask(segments: Tensor) -> Tensor:
    """Who may attend to whom in a batch of packed single-turn samples: ``segments [B, T]``
    (0: the shared prompt prefix and image, k >= 1: turn k, -1: padding) -> ``[B, 1, T, T]``
    bool, True where query i may attend key j: causal, and only to the shared part or to its
    own turn. A padding query attends to itself alone (a row with no key would be NaN).
    """
    T = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool) & (q < 0)
    return allowed.unsqueeze(1)


def background_budget(step: int, steps: int, start: int, ramp: float, n_tokens: int) -> int:
    """Background visual tokens kept at ``step``: ``start``, growing linearly to all
    ``n_tokens`` over the first ``ramp`` fraction of ``steps`` (then all)."""
    span = ramp * steps
    frac = 1.0 if span <= 0 else min(1.0, step / span)
    return int(round(start + frac * max(n_tokens - start, 0)))


def kept_tokens(labels: Tensor, n_background: int, rng: np.random.Generator) -> list[Tensor]:
    """Curriculum over visual tokens: every object patch plus ``n_background`` random background
    patches. ``labels [B, 4, G, G]`` -> per image the kept grid indices, ascending.

    With all 256 tokens from the start, the few object tokens get ~1/256 of the attention at
    initialisation; fewer distractors make early steps cheaper and the signal stronger.
    """
    obj = labels[:, 0].flatten(1) > 0                                      # [B, N]
    out = []
    for b in range(obj.shape[0]):
        bg = (~obj[b]).nonzero().flatten()
        pick = bg[torch.from_numpy(rng.permutation(len(bg))[:min(len(bg), n_background)])]
        out.append(torch.cat([obj[b].nonzero().flatten(), pick]).sort().values)
    return out


# --- phases ----------------------------------------------------------------------------

PHASES = ("clip", "text", "align", "lm")                       # run order
PHASE_STREAM = {"clip": 0, "align": 1, "lm": 2, "text": 3}   # seed stream of each phase's batches
# What each phase trains, as (state group, key prefixes): a reused or resumed phase restores
# only these, so it never overwrites what a re-run earlier phase has just produced.
PHASE_OWNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "clip": (("clip", ("",)), ("heads", ("",)), ("llava", ("model.vision_tower.",))),
    "text": (("clip", ("text_model.", "text_projection.")),),
    "align": (("llava", ("model.multi_modal_projector.",)),),
    "lm": (("llava", ("model.multi_modal_projector.", "model.language_model.", "lm_head.")), ("relation", ("",))),
}
PHASE_INPUTS = {"clip": None, "text": "clip", "align": "clip", "lm": "align"}   # the phase each starts from


def phase_digests(params: LvlmParams, scenes: ScenesParams, seed: int) -> dict[str, str]:
    """Per phase, a hash of everything its result depends on: the shared recipe (seed, scenes,
    architecture, prompts — the vocabulary —, pool, warm-up), its own ``<phase>_*`` params and
    the digest of the phase it starts from."""
    t = dataclasses.asdict(params.train)
    common = {"seed": seed, "scenes": dataclasses.asdict(scenes), "arch": dataclasses.asdict(params.arch),
              "prompts": dataclasses.asdict(params.prompts), "pool": t["pool_scenes"], "warmup": t["warmup_steps"]}
    own = {"clip": {k: v for k, v in t.items() if k.startswith("clip_")},
           "text": {k: v for k, v in t.items() if k.startswith("text_")},
           "align": {k: v for k, v in t.items() if k.startswith("align_")},
           "lm": {k: v for k, v in t.items() if k.startswith("lm_") or k in ("caption_prob", "ground_prob")}}
    out: dict[str, str] = {}
    for phase in PHASES:
        parent = PHASE_INPUTS[phase]
        blob = {"common": common, "own": own[phase], "parent": out[parent] if parent else None}
        out[phase] = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    return out


def text_losses(patches: Tensor, images: Tensor, questions: Tensor, captions: Tensor, rows: Tensor,
                targets: Tensor, scale: Tensor | float) -> tuple[Tensor, dict[str, float]]:
    """Phase A2's loss: question -> patch localisation plus image <-> caption contrast.

    ``patches [B, N, P]`` and ``images [B, P]`` unit embeddings of B images; ``questions [Q, P]``
    with ``rows [Q]`` (the image of each) and ``targets [Q, N]`` (distribution over its
    relevant patches); ``captions [B, P]`` one per image. Localisation is the cross-entropy of
    ``softmax(scale * cos)`` over the image's patches against the target; ``hit1`` is how often
    the most similar patch is a relevant one.
    """
    logits = scale * torch.einsum("qnp,qp->qn", patches[rows], questions)
    loc = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    sim = scale * images @ captions.T
    tgt = torch.arange(images.shape[0])
    contrast = 0.5 * (F.cross_entropy(sim, tgt) + F.cross_entropy(sim.T, tgt))
    hit = targets.gather(1, logits.argmax(-1, keepdim=True)).gt(0).float().mean().item()
    return loc + contrast, {"loc": loc.item(), "contrast": contrast.item(), "hit1": hit}


# --- data ------------------------------------------------------------------------------

class TrainSeq(NamedTuple):
    """One multi-turn LM training sequence."""

    embeds: Tensor                    # [T, D] inputs_embeds
    labels: Tensor                    # [T] answer token ids, -100 elsewhere
    weights: Tensor                   # [T] 1 / (answer length) on answer tokens, 0 elsewhere
    positions: Tensor                 # [T] position ids (visual tokens keep their grid positions)
    segments: Tensor                  # [T] 0 on the prompt prefix and the image, k + 1 on turn k
    queries: list[tuple[int, str]]    # per turn: index of the token predicting its answer, turn text
    prompts: list[tuple[int, list[int]]]  # per turn: index of its first prompt token, the prompt's ids
    vis_start: int                    # index of the first visual token

@dataclass
class Pool:
    images: Tensor                      # [M, H, W, 3] uint8
    labels: Tensor                      # [M, 4, G, G] int64 (colour, shape, size, centre)
    objects: list[list[SceneObject]]
    captions: list[list[str]]


def _pool_item(p: ScenesParams, index: int, patch: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    s = make_scene(p, POOL_STREAM, index, n_questions=0)
    return s.image, patch_labels(s.objects, p.image_size, patch), s.objects, s.captions


def build_pool(p: ScenesParams, n: int, patch: int, workers: int = 2) -> Pool:
    """``n`` training scenes with their dense labels (process pool; deterministic)."""
    with ProcessPoolExecutor(max_workers=workers) as ex:
        items = list(ex.map(_pool_item, [p] * n, range(n), [patch] * n, chunksize=max(1, n // 32)))
    return Pool(images=torch.from_numpy(np.stack([i[0] for i in items])),
                labels=torch.from_numpy(np.stack([i[1] for i in items])),
                objects=[i[2] for i in items], captions=[i[3] for i in items])


def box_text(o: SceneObject, image_size: int) -> str:
    """LLaVA-1.5's grounding format: normalised ``[x1, y1, x2, y2]`` with two decimals."""
    x, y, w, h = o.bbox
    vals = [x / image_size, y / image_size, (x + w) / image_size, (y + h) / image_size]
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in vals) + "]"


def scene_vocab(p: ScenesParams, prompts: Prompts, n_scenes: int = 400) -> list[str]:
    """Every word the scenes' language and the prompts can produce, plus box coordinates."""
    corpus: list[str] = [prompts.system, prompts.template, prompts.vqa, prompts.caption, prompts.ground, *PHRASES]
    for i in range(n_scenes):
        rng = scene_rng(p.seed, VOCAB_STREAM, i)
        objs = sample_scene(rng, p)
        corpus += make_captions(objs, rng, 5) + make_refs(objs)
        for t in QUESTION_TYPES:
            corpus += [f"{q} {a}" for q, a in question_candidates(objs, rng, t)]
    extra = [f"{i / 100:.2f}" for i in range(101)] + [str(i) for i in range(10)] + ["yes", "no", "[", "]", ","]
    return build_vocab(corpus, extra)


def sample_turns(objs: Sequence[SceneObject], captions: Sequence[str], rng: np.random.Generator, n: int,
                 caption_prob: float, ground_prob: float, image_size: int) -> list[tuple[str, str, str]]:
    """``n`` (task, text, answer) turns about one scene: questions of every type, sometimes a
    caption (the canonical left-to-right one) and a grounding turn."""
    turns: list[tuple[str, str, str]] = []
    if rng.random() < caption_prob:
        turns.append(("caption", "", captions[0]))
    if objs and rng.random() < ground_prob:
        o = objs[int(rng.integers(len(objs)))]
        turns.append(("ground", make_refs([o])[0], box_text(o, image_size)))
    turns += [("vqa", q["question"], q["answer"]) for q in make_questions(objs, rng, max(n - len(turns), 0))]
    return [turns[i] for i in rng.permutation(len(turns))]


# --- training machinery ----------------------------------------------------------------

def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _to_pixels(images_u8: Tensor) -> Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, H, W]`` float in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 255.0


class DenseHeads(nn.Module):
    """Per-patch colour / shape / size / centre classifiers on the LLaVA feature layer, and
    (``position_weight`` > 0) the patch's grid row and column.

    Without the position heads nothing asks the tower to keep where a patch is: a linear probe
    of its object patches read the grid column right 10% of the time (chance 6%), and the LM
    answered spatial questions at chance and grounded nothing.
    """

    def __init__(self, dim: int, grid: int = 0, position_weight: float = 0.0) -> None:
        super().__init__()
        self.color = nn.Linear(dim, len(COLORS) + 1)
        self.shape = nn.Linear(dim, len(SHAPES) + 1)
        self.size = nn.Linear(dim, len(SIZES) + 1)
        self.centre = nn.Linear(dim, 2)
        self.position_weight = position_weight
        if position_weight > 0:
            self.row = nn.Linear(dim, grid)
            self.col = nn.Linear(dim, grid)

    def loss(self, feats: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """``feats [B, N, D]``, ``labels [B, 4, G, G]`` -> loss and per-head patch accuracy."""
        lab = labels.flatten(2).transpose(1, 2)               # [B, N, 4]
        obj = lab[..., 0] > 0
        total, acc = feats.new_zeros(()), {}
        for k, head in enumerate((self.color, self.shape, self.size)):
            logits = head(feats)
            mask = torch.ones_like(obj) if k == 0 else obj     # shape/size only on object patches
            total = total + F.cross_entropy(logits[mask], lab[..., k][mask])
            acc[("color", "shape", "size")[k]] = (logits.argmax(-1) == lab[..., k])[mask].float().mean().item()
        logits = self.centre(feats)
        total = total + F.cross_entropy(logits.reshape(-1, 2), lab[..., 3].reshape(-1),
                                        weight=feats.new_tensor([1.0, 8.0]))
        if self.position_weight > 0:
            g = labels.shape[-1]
            cell = torch.arange(g * g, device=feats.device)
            for name, target in (("row", cell // g), ("col", cell % g)):
                logits = getattr(self, name)(feats)                     # [B, N, G]
                tgt = target.expand(feats.shape[0], -1)
                total = total + self.position_weight * F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
                acc[name] = (logits.argmax(-1) == tgt)[obj].float().mean().item()
        return total, acc


def position_code(grid: int, dim: int, scale: float, seed: int) -> Tensor:
    """Where each patch is, as a vector the LM can read: ``[G*G, dim]``.

    Column and row, each mapped linearly to [-1, 1], along two fixed orthonormal directions
    (drawn from ``seed``) times ``scale``. Added to the projector's alignment target, so a
    visual token starts out as its object's words *plus* its place: a linear code is what a
    comparison ("left of") and a box readout need.
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen))          # [dim, 2] orthonormal
    cell = torch.arange(grid * grid)
    coords = torch.stack([cell % grid, cell // grid], -1).float()           # [N, 2] (x, y)
    coords = 2 * (coords + 0.5) / grid - 1
    return scale * coords @ basis.T


def progress_line(phase: str, steps: int, row: dict[str, Any]) -> str:
    """``[lm] step 400/2000 (20%, 310 s, ~1240 s left) loss=...``: a curve row with where its
    phase stands. ``row`` holds the step and the phase's seconds so far (across resumed runs),
    so the time left extrapolates the phase's own pace."""
    step, secs = int(row["step"]), float(row.get("seconds", 0.0))
    left = f"~{secs / step * (steps - step):.0f} s left" if step > 0 else "time left unknown"
    rest = " ".join(f"{k}={v}" for k, v in row.items() if k not in ("phase", "step", "seconds"))
    return f"[{phase}] step {step}/{steps} ({100 * step // steps}%, {secs:.0f} s, {left}) {rest}".rstrip()


class Trainer:
    """Runs phases A, A2, B, C (:data:`PHASES`) with resumable checkpoints under ``work_dir``;
    saves HF folders."""

    def __init__(self, params: LvlmParams, scenes: ScenesParams, work_dir: str | Path, seed: int,
                 log: Callable[[str], None] = print) -> None:
        self.p, self.t, self.scenes, self.seed = params, params.train, scenes, seed
        self.work = Path(work_dir)
        self.log = log
        self.accel = Accelerator()
        if self.t.threads > 0:
            torch.set_num_threads(self.t.threads)
        a = params.arch
        self.spec = ModelSpec(**dataclasses.asdict(a))
        self.prompts = Prompts(**dataclasses.asdict(params.prompts))
        torch.manual_seed(seed)
        vocab = scene_vocab(scenes, self.prompts)
        self.tok, self.clip_tok = build_tokenizers(vocab)
        ids = {k: self.tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
        self.clip = build_clip(self.spec, len(vocab), ids["<pad>"], ids["<s>"], ids["</s>"])
        self.llava = build_llava(self.spec, self.clip, len(vocab), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"])
        self.heads = DenseHeads(a.vision_hidden, a.image_size // a.patch_size, self.t.clip_position_weight)
        if self.t.relation_readouts and not 0 <= self.t.lm_where_layer < a.lm_layers:
            raise ValueError(f"lvlm.train.lm_where_layer={self.t.lm_where_layer}: must be in [0, {a.lm_layers - 1}] "
                             f"(lvlm.arch.lm_layers={a.lm_layers}; the compare readout sits one layer later)")
        with torch.random.fork_rng():    # built after the models, drawing nothing they draw
            self.relation = RelationHeads(a.lm_hidden)
        self.digests = phase_digests(params, scenes, seed)
        self.curves: list[dict[str, Any]] = []
        self.phase_seconds: dict[str, float] = {}

    # -- bookkeeping ----------------------------------------------------------------------
    @property
    def _progress_path(self) -> Path:
        return self.work / "progress.json"

    def _progress(self) -> dict[str, Any]:
        if self._progress_path.is_file():
            return json.loads(self._progress_path.read_text())
        return {"done": [], "phase": None, "step": 0, "seconds": {}}

    @property
    def _curves_path(self) -> Path:
        return self.work / "curves.jsonl"

    def _log_row(self, row: dict[str, Any]) -> None:
        """Keep a curve row in memory and in the work dir, so a resumed run has the whole curve."""
        self.curves.append(row)
        with open(self._curves_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _load_curves(self, phase: str | None, step: int) -> None:
        """Rows logged before this run: every row of finished phases, and of ``phase`` up to
        its checkpoint ``step`` (later rows are about to be recomputed)."""
        if not self._curves_path.is_file():
            return
        rows = [json.loads(line) for line in self._curves_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["phase"] != phase or r["step"] <= step]
        with atomic_path(self._curves_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.curves = rows

    def _save_weights(self, name: str) -> None:
        state = {"clip": self.clip.state_dict(), "llava": self.llava.state_dict(), "heads": self.heads.state_dict(),
                 "relation": self.relation.state_dict()}
        with atomic_path(self.work / f"{name}.pt") as tmp:
            torch.save(state, tmp)

    def _load_weights(self, name: str, phase: str) -> None:
        """Restore from snapshot ``name`` the weights ``phase`` trains (:data:`PHASE_OWNS`)."""
        state = torch.load(self.work / f"{name}.pt", map_location="cpu", weights_only=True)
        groups = {"clip": self.clip, "llava": self.llava, "heads": self.heads, "relation": self.relation}
        for group, prefixes in PHASE_OWNS[phase]:
            part = {k: v for k, v in state.get(group, {}).items() if k.startswith(prefixes)}
            want = {k for k in groups[group].state_dict() if k.startswith(prefixes)}
            if set(part) != want:
                raise RuntimeError(f"{name}.pt: the {phase} weights of '{group}' do not match this model "
                                   f"({len(want - set(part))} missing, {len(set(part) - want)} unexpected)")
            groups[group].load_state_dict(part, strict=False)

    def _rng(self, phase: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, PHASE_STREAM[phase], step])

    # -- the loop shared by all phases ------------------------------------------------------
    def _run_phase(self, phase: str, steps: int, lr: float, params: list[nn.Parameter] | list[dict[str, Any]],
                   step_fn: Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]],
                   modules: list[nn.Module], eval_fn: Callable[[], dict[str, float]] | None = None,
                   max_grad_norm: float | None = 1.0) -> None:
        prog = self._progress()
        digest = self.digests[phase]
        digests = prog.setdefault("digests", {})
        if phase in prog["done"] and digests.get(phase) == digest:
            self._load_weights(f"after_{phase}", phase)
            self.phase_seconds[phase] = prog["seconds"].get(phase, 0.0)
            self.log(f"[{phase}] already done, loaded")
            return
        if phase in prog["done"]:
            self.log(f"[{phase}] done with other params: training again")
            prog["done"].remove(phase)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        trained = [q for g in groups for q in g["params"]]      # type: ignore[index]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(self.t.warmup_steps, steps))
        # One phase's optimizer in the accelerator: its saved state then holds this phase alone, so
        # a run resumed in a new process (earlier phases loaded, not prepared) reads it back.
        self.accel.free_memory()
        opt, sched = self.accel.prepare(opt, sched)
        state_dir = self.work / f"{phase}_state"
        start, spent = 0, 0.0
        if prog["phase"] == phase and prog.get("phase_digest") == digest and state_dir.is_dir():
            self._load_weights(f"{phase}_weights", phase)
            self.accel.load_state(str(state_dir))
            start, spent = prog["step"], prog["seconds"].get(phase, 0.0)
            self.log(f"[{phase}] resuming at step {start}")
        self._load_curves(phase, start)      # rows of an interrupted or stale run of this phase go
        for m in modules:
            m.train()
        t0 = time.perf_counter() - spent
        for step in range(start, steps):
            loss, logs = step_fn(self._rng(phase, step), step)
            opt.zero_grad(set_to_none=True)
            self.accel.backward(loss)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
            opt.step()
            sched.step()
            row = {"phase": phase, "step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                   "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in logs.items()}}
            done = step + 1 == steps
            if eval_fn is not None and ((step + 1) % self.t.eval_every == 0 or done):
                for m in modules:
                    m.eval()
                row.update(eval_fn())
                for m in modules:
                    m.train()
            if (step + 1) % self.t.eval_every == 0 or done or step == start:
                self._log_row(row)
                self.log(progress_line(phase, steps, row))
            if (step + 1) % self.t.checkpoint_every == 0 and not done:
                self._save_weights(f"{phase}_weights")
                self.accel.save_state(str(state_dir))
                prog.update(phase=phase, step=step + 1, phase_digest=digest)
                prog["seconds"][phase] = time.perf_counter() - t0
                write_json(self._progress_path, prog)
        for m in modules:
            m.eval()
        self.phase_seconds[phase] = time.perf_counter() - t0
        self._save_weights(f"after_{phase}")
        prog["done"].append(phase)
        digests[phase] = digest
        prog["seconds"][phase] = self.phase_seconds[phase]
        prog.update(phase=None, step=0, phase_digest=None)
        write_json(self._progress_path, prog)

    # -- phase A: CLIP ----------------------------------------------------------------------
    def _clip_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        vision, clip, t = self.clip.vision_model, self.clip, self.t
        layer = self.spec.vision_feature_layer
        phrase_enc = self.clip_tok(PHRASES, padding=True, return_tensors="pt")

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            idx = torch.from_numpy(rng.choice(len(pool.captions), t.clip_batch, replace=False))
            pix = _to_pixels(pool.images[idx])
            labels = pool.labels[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            # Horizontal flips: images and labels together (captions are left-right free but
            # for the first, so flipped samples draw one of the unordered ones).
            pix = torch.where(flip[:, None, None, None], pix.flip(-1), pix)
            labels = torch.where(flip[:, None, None, None], labels.flip(-1), labels)
            caps = [pool.captions[i][int(rng.integers(1 if f else 0, len(pool.captions[i])))]
                    for i, f in zip(idx.tolist(), flip.tolist())]
            out = vision((pix - LVLM_MEAN) / LVLM_STD, output_hidden_states=True, return_dict=True)
            dense, acc = self.heads.loss(out.hidden_states[layer][:, 1:], labels)
            scale = clip.logit_scale.exp().clamp(max=100)
            # Patch <-> phrase alignment in the joint space.
            ph = F.normalize(clip.text_projection(clip.text_model(**phrase_enc).pooler_output), dim=-1)
            pe = F.normalize(clip.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:])), dim=-1)
            target = phrase_index(labels).flatten(1)                       # [B, N]
            ce = F.cross_entropy((scale * pe @ ph.T).flatten(0, 1), target.flatten(), reduction="none")
            objm = (target > 0).flatten().float()
            align = (ce * objm).sum() / objm.sum().clamp(min=1) + 0.1 * (ce * (1 - objm)).mean()
            # Image <-> caption contrastive loss.
            enc = self.clip_tok(caps, padding=True, return_tensors="pt")
            te = F.normalize(clip.text_projection(clip.text_model(**enc).pooler_output), dim=-1)
            ie = F.normalize(clip.visual_projection(out.pooler_output), dim=-1)
            logits = scale * ie @ te.T
            tgt = torch.arange(len(idx))
            contrast = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
            acc["i2t"] = (logits.argmax(1) == tgt).float().mean().item()
            return dense + align + contrast, acc

        return step

    # -- phase A2: text tower -------------------------------------------------------------
    def _text_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        clip, vision, t = self.clip, self.clip.vision_model, self.t

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            idx = rng.choice(len(pool.captions), t.text_batch, replace=False)
            with torch.no_grad():
                out = vision((_to_pixels(pool.images[torch.from_numpy(idx)]) - LVLM_MEAN) / LVLM_STD, return_dict=True)
                pe = F.normalize(clip.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:])), dim=-1)
                ie = F.normalize(clip.visual_projection(out.pooler_output), dim=-1)
            texts, rows, targets = [], [], []
            for j, i in enumerate(idx.tolist()):
                for q in make_questions(pool.objects[i], rng, t.text_questions):
                    rel = relevant_patches(q["question"], pool.labels[i])
                    if rel.any():
                        texts.append(q["question"])
                        rows.append(j)
                        targets.append(rel.float() / rel.sum())
            caps = [pool.captions[i][int(rng.integers(len(pool.captions[i])))] for i in idx.tolist()]
            enc = self.clip_tok(texts + caps, padding=True, return_tensors="pt")
            te = F.normalize(clip.text_projection(clip.text_model(**enc).pooler_output), dim=-1)
            scale = clip.logit_scale.exp().clamp(max=100).detach()
            return text_losses(pe, ie, te[:len(texts)], te[len(texts):], torch.tensor(rows, dtype=torch.long),
                               torch.stack(targets), scale)

        return step

    # -- phase B: projector alignment -----------------------------------------------------
    def _align_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        emb = self.llava.get_input_embeddings()
        ids = self.tok.convert_tokens_to_ids
        # Word ids of each phrase's words ("background" alone for background patches).
        words = [[ids(w) for w in ph.split() if w != "a"] for ph in PHRASES]
        proj, vision, layer = self.llava.model.multi_modal_projector, self.llava.model.vision_tower, self.spec.vision_feature_layer
        # The position code's unit is a word embedding's typical norm (the LM's embeddings
        # are at their initialisation here), so place weighs like one more word.
        word_norm = emb.weight.detach().norm(dim=-1).mean().item()
        where = position_code(self.spec.image_size // self.spec.patch_size, emb.weight.shape[1],
                              self.t.align_position_scale * word_norm, self.seed)

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            idx = torch.from_numpy(rng.choice(len(pool.captions), self.t.align_batch, replace=False))
            with torch.no_grad():
                out = vision((_to_pixels(pool.images[idx]) - LVLM_MEAN) / LVLM_STD, output_hidden_states=True,
                             return_dict=True)
                table = torch.stack([emb.weight[w].sum(0) for w in words])  # [P, D]
                target = table[phrase_index(pool.labels[idx]).flatten(1)] + where  # [B, N, D]
            pred = proj(out.hidden_states[layer][:, 1:])
            loss = (pred - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
            return loss, {}

        return step

    # -- phase C: language model ------------------------------------------------------------
    def _sequence(self, vis: Tensor, turns: list[tuple[str, str, str]], vis_pos: Tensor,
                  n_vis: int, isolate: bool = False) -> TrainSeq:
        """One multi-turn training sequence: ``inputs_embeds [T, D]``, ``labels [T]`` and
        ``position_ids [T]``, and per turn (index of the token that predicts its first answer
        token, the turn's text). ``vis [K, D]`` are the kept visual tokens at grid positions
        ``vis_pos [K]`` out of ``n_vis``; positions are those of the full sequence, so a token
        keeps its position whether or not its neighbours were dropped.

        ``isolate``: every turn is a single-turn sample sharing the image prefix — the first
        turn's prompt, positions restarting right after the image — and (with :func:`turn_mask`)
        seeing no other turn: the shape of every question at test time."""
        emb = self.llava.get_input_embeddings()
        eos = self.tok.eos_token_id
        before, after = self.prompts.render(turns[0][0], turns[0][1])
        pre = self.tok(before).input_ids
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        queries: list[tuple[int, str]] = []
        turn_prompts: list[tuple[int, list[int]]] = []
        segs: list[int] = []
        text_pos: list[Tensor] = []
        start = len(pre) + vis.shape[0]
        for k, (task, text, answer) in enumerate(turns):
            if k == 0:
                prompt = after
            elif isolate:
                prompt = self.prompts.render(task, text)[1]
            else:
                prompt = self.prompts.render_followup(task, text)
            p_ids = self.tok(prompt, add_special_tokens=False).input_ids
            a_ids = self.tok(" " + answer, add_special_tokens=False).input_ids + [eos]
            queries.append((start + len(ids) + len(p_ids) - 1, text))
            turn_prompts.append((start + len(ids), p_ids))
            text_pos.append(torch.arange(len(p_ids) + len(a_ids)) + (0 if isolate else len(ids)))
            ids += p_ids + a_ids
            segs += [k + 1] * (len(p_ids) + len(a_ids))
            labels += [-100] * len(p_ids) + a_ids
            weights += [0.0] * len(p_ids) + [1.0 / len(a_ids)] * len(a_ids)
        seq = torch.cat([emb(torch.tensor(pre)), vis, emb(torch.tensor(ids))])
        lab = torch.tensor([-100] * (len(pre) + vis.shape[0]) + labels)
        wts = torch.tensor([0.0] * (len(pre) + vis.shape[0]) + weights)
        pos = torch.cat([torch.arange(len(pre)), len(pre) + vis_pos, len(pre) + n_vis + torch.cat(text_pos)])
        seg = torch.tensor([0] * (len(pre) + vis.shape[0]) + segs)
        return TrainSeq(seq, lab, wts, pos, seg, queries, turn_prompts, len(pre))

    def lm_loss(self, feats: Tensor, labels: Tensor, objects: Sequence[Sequence[SceneObject]],
                captions: Sequence[Sequence[str]], rng: np.random.Generator, step_no: int
                ) -> tuple[Tensor, dict[str, float]]:
        """LM loss on a batch: ``feats [B, N, C]`` vision features of the LLaVA feature layer,
        ``labels [B, 4, G, G]`` their scenes' dense labels; turns are drawn from ``rng``.

        Cross-entropy on answer tokens, plus (``lm_look_weight`` > 0) the look loss on the
        head-mean attention of layer ``lm_look_layer`` at each answer-predicting position.
        """
        proj, t = self.llava.model.multi_modal_projector, self.t
        lm, head = self.llava.model.language_model, self.llava.lm_head
        look, rel = t.lm_look_weight > 0, t.relation_readouts
        vis = proj(feats)
        n_bg = background_budget(step_no, t.lm_steps, t.lm_bg_start, t.lm_bg_ramp, labels[0, 0].numel())
        keep = kept_tokens(labels, n_bg, rng)
        seqs = [self._sequence(vis[b, keep[b]], sample_turns(objects[b], captions[b], rng, t.lm_turns,
                                                             t.caption_prob, t.ground_prob, self.spec.image_size),
                               keep[b], vis.shape[1], t.lm_isolate_turns) for b in range(len(objects))]
        T = max(s.embeds.shape[0] for s in seqs)
        embeds = vis.new_zeros(len(seqs), T, vis.shape[-1])
        target_ids = torch.full((len(seqs), T), -100, dtype=torch.long)
        weights = torch.zeros(len(seqs), T)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        pos = torch.zeros(len(seqs), T, dtype=torch.long)
        segments = torch.full((len(seqs), T), -1, dtype=torch.long)
        queries, targets = [], []
        words, answers, centres = [], [], []       # relation questions (RelationHeads)
        for b, sq in enumerate(seqs):
            n = sq.embeds.shape[0]
            embeds[b, :n], target_ids[b, :n], mask[b, :n], pos[b, :n] = sq.embeds, sq.labels, 1, sq.positions
            weights[b, :n], segments[b, :n] = sq.weights, sq.segments
            if look:
                vis_at = sq.vis_start + torch.arange(len(keep[b]))   # sequence index of each kept token
                for qpos, text in sq.queries:
                    tgt = torch.zeros(T, dtype=torch.bool)
                    tgt[vis_at[relevant_patches(text, labels[b])[keep[b]]]] = True
                    queries.append((b, qpos))
                    targets.append(tgt)
            for (qpos, text), (p0, p_ids) in zip(sq.queries, sq.prompts) if rel else ():
                found = relation_targets(text, objects[b], self.spec.image_size)
                at = found and word_positions(p_ids, *self.tok.convert_tokens_to_ids(list(found[0])))
                if at:
                    words += [(b, p0 + at[0]), (b, p0 + at[1])]
                    answers.append((b, qpos))
                    centres.append(found[1])
        captured: list[Tensor] = []
        hook = lm.layers[t.lm_look_layer].self_attn.register_forward_hook(
            lambda mod, args, out: captured.append(out[1])) if look else None
        attn_mask: Tensor = mask
        if t.lm_isolate_turns:   # additive 4-D mask: transformers passes a 4-D mask through as given
            allowed = turn_mask(segments)
            attn_mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
        try:
            out = lm(inputs_embeds=embeds, attention_mask=attn_mask, position_ids=pos, return_dict=True,
                     output_hidden_states=rel)
            h = out.last_hidden_state
        finally:
            if hook is not None:
                hook.remove()
        sel = target_ids[:, 1:] != -100                   # logits only where an answer token is next
        logits = head(h[:, :-1][sel])
        target = target_ids[:, 1:][sel]
        if t.lm_loss_per == "turn":
            w = weights[:, 1:][sel]
            loss = (F.cross_entropy(logits, target, reduction="none") * w).sum() / w.sum()
        else:
            loss = F.cross_entropy(logits, target)
        logs = {"tok_acc": (logits.argmax(-1) == target).float().mean().item()}
        if look:
            ll = look_loss(captured[0], torch.tensor(queries), torch.stack(targets))
            loss = loss + t.lm_look_weight * ll
            logs["look"] = ll.item()
        if rel and answers:
            wl, cl = self.relation.losses(out.hidden_states, t.lm_where_layer, torch.tensor(words),
                                          torch.tensor(answers), torch.stack(centres))
            loss = loss + t.lm_where_weight * wl + t.lm_compare_weight * cl
            logs.update(where=wl.item(), compare=cl.item())
        return loss, logs

    def _pool_features(self, pool: Pool, chunk: int = 100) -> Tensor:
        """The frozen tower's LLaVA feature layer for every pool scene -> ``[P, N, C]``.

        The tower is frozen in phase C and each scene is drawn about three times, so one pass
        over the pool replaces a tower forward in every step (about a quarter of a step's cost).
        """
        vision, layer = self.llava.model.vision_tower, self.spec.vision_feature_layer
        out = []
        with torch.no_grad():
            for i in range(0, len(pool.captions), chunk):
                h = vision((_to_pixels(pool.images[i:i + chunk]) - LVLM_MEAN) / LVLM_STD, output_hidden_states=True,
                           return_dict=True).hidden_states[layer]
                out.append(h[:, 1:].clone())
        return torch.cat(out)

    def _lm_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        feats: list[Tensor] = []     # filled on the first step, so a finished phase never pays for it

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            if not feats:
                feats.append(self._pool_features(pool))
            idx = rng.choice(len(pool.captions), self.t.lm_batch, replace=False)
            sel = torch.from_numpy(idx)
            return self.lm_loss(feats[0][sel], pool.labels[sel], [pool.objects[i] for i in idx],
                                [pool.captions[i] for i in idx], rng, step_no)

        return step

    def lvlm(self) -> LVLM:
        """The model being trained, behind the adapter (shares the modules, no copy)."""
        self.clip.vision_model.load_state_dict(self.llava.model.vision_tower.state_dict())
        self.llava.model.vision_tower.eval()
        return LVLM(self.llava, self.tok, self.clip, self.clip_tok, prompts=self.prompts,
                    attn_layer=self.p.attn_layer).eval()

    # -- everything -------------------------------------------------------------------------
    def run(self, out_dir: str | Path, eval_fn: Callable[[LVLM], dict[str, float]] | None = None) -> dict[str, float]:
        """Train all phases (resuming if a previous run was interrupted) and save HF folders."""
        self.work.mkdir(parents=True, exist_ok=True)
        prog = self._progress()
        self._load_curves(prog["phase"], prog["step"])
        t0 = time.perf_counter()
        pool = build_pool(self.scenes, self.t.pool_scenes, self.spec.patch_size)
        self.phase_seconds["pool"] = time.perf_counter() - t0
        self.log(f"pool of {self.t.pool_scenes} scenes in {self.phase_seconds['pool']:.1f} s")
        c, v = self.clip, self.clip.vision_model
        self._run_phase("clip", self.t.clip_steps, self.t.clip_lr,
                        list(c.parameters()) + list(self.heads.parameters()), self._clip_step(pool), [c, self.heads],
                        # Several summed losses give large gradient norms: clipping at 1 slowed
                        # shape learning several-fold in probes, and the phase is stable without it.
                        max_grad_norm=None)
        self.llava.model.vision_tower.load_state_dict(v.state_dict())
        # The tower is frozen from here on, in eval mode: a reused phase A leaves the freshly
        # built model in train mode, and the stem's BatchNorm would then embed the text phase's
        # patches with batch statistics instead of the running ones used at inference.
        v.requires_grad_(False).eval()
        text = [c.text_model, c.text_projection]
        self._run_phase("text", self.t.text_steps, self.t.text_lr, [q for m in text for q in m.parameters()],
                        self._text_step(pool), text)
        # Frozen from here on, and in eval mode: BatchNorm in the stem must use its running
        # statistics, not the statistics of each training batch.
        self.llava.model.vision_tower.requires_grad_(False).eval()
        proj = self.llava.model.multi_modal_projector
        self._run_phase("align", self.t.align_steps, self.t.align_lr, list(proj.parameters()),
                        self._align_step(pool), [proj])
        lm_params = list(self.llava.model.language_model.parameters()) + list(self.llava.lm_head.parameters())
        if self.t.relation_readouts:
            lm_params += list(self.relation.parameters())
        # The projector at a fraction of lm_lr: trained at the full rate it washes the position
        # code out of the tokens (a linear probe of its output read the column 16% right, the
        # tower's 97%); frozen (0) it keeps phase B's map of words + position code.
        scale = self.t.lm_projector_lr_scale
        proj.requires_grad_(scale > 0)
        lm_groups = [{"params": lm_params}] + ([{"params": list(proj.parameters()), "lr": self.t.lm_lr * scale}]
                                               if scale > 0 else [])
        ev = (lambda: eval_fn(self.lvlm())) if eval_fn is not None else None
        lm_cfg = self.llava.model.language_model.config
        attn_impl = lm_cfg._attn_implementation
        if self.t.lm_look_weight > 0:
            lm_cfg._attn_implementation = "eager"  # the look loss needs one layer's attention weights
        try:
            self._run_phase("lm", self.t.lm_steps, self.t.lm_lr, lm_groups, self._lm_step(pool),
                            [proj, self.llava.model.language_model, self.llava.lm_head, self.relation], ev)
        finally:
            lm_cfg._attn_implementation = attn_impl
        save_lvlm(out_dir, self.llava, self.tok, self.clip, self.clip_tok)
        return {f"{k}_seconds": round(s, 1) for k, s in self.phase_seconds.items()}

    def write_curves(self, path: str | Path) -> None:
        keys: list[str] = []
        for row in self.curves:
            keys += [k for k in row if k not in keys]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.curves)


LVLM_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
LVLM_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
