"""What the LM sees in training: the turns drawn about a scene, the sequence they pack into,
which visual tokens are kept, the mask that isolates turns, and the position code phase B
writes into the visual tokens."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from vlmcompress.data.scenes import (COLORS, QUESTION_TYPES, SHAPES, SceneObject, absent_refs, make_questions,
                                     make_refs)
from vlmcompress.lvlm.labels import grid_xy


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


def box_text(o: SceneObject, image_size: int) -> str:
    """LLaVA-1.5's grounding format: normalised ``[x1, y1, x2, y2]`` with two decimals."""
    x, y, w, h = o.bbox
    vals = [x / image_size, y / image_size, (x + w) / image_size, (y + h) / image_size]
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in vals) + "]"


# A grounding turn's answer when the scene has no such object: the word a "no" to "is there
# ...?" is, so that absence is one answer across tasks.
NO_BOX = "no"


def sample_turns(objs: Sequence[SceneObject], captions: Sequence[str], rng: np.random.Generator, n: int,
                 caption_prob: float, ground_prob: float, image_size: int,
                 type_probs: Sequence[float] | None = None, ground_turns: int = 1,
                 ground_absent: float = 0.0) -> list[tuple[str, str, str]]:
    """``n`` (task, text, answer) turns about one scene: questions of every type (cycling, or
    drawn from ``type_probs``: :func:`~vlmcompress.data.scenes.make_questions`), sometimes a
    caption (the canonical left-to-right one) and, with chance ``ground_prob``, grounding turns
    about ``ground_turns`` different objects (or all, if fewer). Each grounding turn, with
    chance ``ground_absent``, names instead an object the scene lacks but nearly has
    (:func:`~vlmcompress.data.scenes.absent_refs`), answered :data:`NO_BOX`: without it every
    grounding turn teaches that a named object is there."""
    turns: list[tuple[str, str, str]] = []
    if rng.random() < caption_prob:
        turns.append(("caption", "", captions[0]))
    if objs and rng.random() < ground_prob:
        # One turn draws as it always has, so ground_turns 1 keeps recorded runs' draws.
        picks = ([int(rng.integers(len(objs)))] if ground_turns == 1
                 else rng.choice(len(objs), min(ground_turns, len(objs)), replace=False).tolist())
        absent = absent_refs(objs) if ground_absent > 0 else []
        for i in picks:
            if absent and rng.random() < ground_absent:
                turns.append(("ground", absent[int(rng.integers(len(absent)))], NO_BOX))
            else:
                turns.append(("ground", make_refs([objs[i]])[0], box_text(objs[i], image_size)))
    turns += [("vqa", q["question"], q["answer"]) for q in make_questions(objs, rng, max(n - len(turns), 0), type_probs)]
    return [turns[i] for i in rng.permutation(len(turns))]


def ground_amount(frac: float, prob: float, turns: int, schedule: Sequence[tuple[float, float, int]]
                  ) -> tuple[float, int]:
    """Grounding turns' (chance per sequence, objects) at ``frac`` of the LM phase: ``(prob,
    turns)``, or the last ``schedule`` entry ``(from_frac, prob, turns)`` whose ``from_frac``
    ``frac`` has reached (entries ascending by ``from_frac``)."""
    for start, p, k in schedule:
        if frac >= start:
            prob, turns = p, k
    return prob, turns


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


def type_probs(errors: Sequence[float], chance: Sequence[float], focus: float) -> np.ndarray:
    """How often to ask each question type: ``[T]``, a ``1 - focus`` share spread evenly and a
    ``focus`` share in proportion to each type's recent answer error ``errors [T]`` relative to
    its error at chance ``chance [T]`` (``1 - 1 / answers``): a yes/no type still at chance
    weighs as much as a six-colour type at chance, and more than either once learnt."""
    rel = np.clip(np.asarray(errors, dtype=np.float64) / np.asarray(chance, dtype=np.float64), 1e-3, None)
    return (1 - focus) / len(rel) + focus * rel / rel.sum()


def chance_errors(max_objects: int) -> list[float]:
    """Per :data:`~vlmcompress.data.scenes.QUESTION_TYPES`, the error of a uniform guess over
    the type's answers: colours, shapes, yes/no, counts 0..``max_objects``, yes/no."""
    answers = {"color": len(COLORS), "shape": len(SHAPES), "exists": 2, "count": max_objects + 1, "spatial": 2}
    return [1 - 1 / answers[t] for t in QUESTION_TYPES]


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


def place_basis(dim: int, seed: int, k: int = 2) -> Tensor:
    """The ``k`` orthonormal directions ``[dim, k]`` of :func:`place_code`, drawn from ``seed``:
    (x, y) for a point, (x1, y1, x2, y2) for a box."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    return basis


def place_code(xy: Tensor, dim: int, scale: float, seed: int) -> Tensor:
    """Places ``xy [..., k]`` (a point (x, y) or a box (x1, y1, x2, y2), in [-1, 1]) as vectors
    the LM can read: ``[..., dim]``, along ``k`` fixed orthonormal directions
    (:func:`place_basis`) times ``scale``. Linear, so a comparison ("left of") or a box is a
    linear readout."""
    return scale * xy.float() @ place_basis(dim, seed, xy.shape[-1]).T


def position_code(grid: int, dim: int, scale: float, seed: int) -> Tensor:
    """Where each patch is, as a vector the LM can read: ``[G*G, dim]``.

    Column and row, each mapped linearly to [-1, 1], through :func:`place_code`. Added to the
    projector's alignment target, so a visual token starts out as its object's words *plus* its
    place: a linear code is what a comparison ("left of") and a box readout need.
    """
    return place_code(grid_xy(grid), dim, scale, seed)

