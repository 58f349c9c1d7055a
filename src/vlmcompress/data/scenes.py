"""Procedural multi-object scenes: the embedded profile's data set.

A scene is a few coloured shapes (small and large) on a textured background. From
its object list we derive, exactly and without labelling noise, everything the
paper's tasks need: COCO instances (boxes, polygons), captions, VQAv2-style questions
of five types (colour, shape, exists, count, spatial) and RefCOCO-style referring
expressions.

Determinism: scene ``i`` of a split is drawn from ``default_rng([seed, stream, i])``
where ``stream`` identifies the split, so a scene never depends on how many scenes
are generated and no scene is shared between splits. Training code can draw fresh
scenes from other streams (:data:`STREAMS`) without ever touching val/test.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmcompress.data.config import ScenesParams

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 85, 225),
    "yellow": (235, 215, 40), "purple": (150, 60, 195), "cyan": (40, 205, 215),
}
SIZES = ("small", "large")
QUESTION_TYPES = ("color", "shape", "exists", "count", "spatial")
RELATIONS = ("left of", "right of", "above", "below")   # what a spatial question asks
# Split name -> seed stream. Streams >= 100 are for on-the-fly training data.
STREAMS = {"train": 1, "val": 2, "test": 3}
ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
_SUPERSAMPLE = 4
_MIN_SPATIAL_GAP = 8.0  # px between centres for a left/right/above/below relation to count


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    extent: float                            # side of the shape's bounding square, px
    polygon: tuple[tuple[float, float], ...]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """COCO ``[x, y, w, h]`` of the polygon."""
        xs, ys = zip(*self.polygon)
        return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _polygon(shape: str, cx: float, cy: float, s: float) -> tuple[tuple[float, float], ...]:
    """Vertices of ``shape`` centred at (cx, cy) inside an ``s``-wide square."""
    h = s / 2
    if shape == "square":
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0.0, -h), (h, h), (-h, h)]
    elif shape == "cross":
        t = s / 6  # arm half-width: arms one third of the extent wide
        pts = [(-t, -h), (t, -h), (t, -t), (h, -t), (h, t), (t, t), (t, h), (-t, h),
               (-t, t), (-h, t), (-h, -t), (-t, -t)]
    elif shape == "circle":
        pts = [(h * math.cos(a), h * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return tuple((round(cx + x, 2), round(cy + y, 2)) for x, y in pts)


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def sample_scene(rng: np.random.Generator, p: ScenesParams) -> list[SceneObject]:
    """Draw non-overlapping objects with distinct (colour, shape) pairs."""
    n = int(rng.integers(p.min_objects, p.max_objects + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objs: list[SceneObject] = []
    for k in chosen:
        color, shape = pairs[k]
        size = "small" if rng.random() < p.p_small else "large"
        lo, hi = p.small_size if size == "small" else p.large_size
        for _ in range(50):  # rejection sampling; a crowded scene just gets fewer objects
            s = float(rng.uniform(lo, hi))
            cx, cy = rng.uniform(s / 2 + 1, p.image_size - s / 2 - 1, size=2)
            if all(max(abs(cx - o.cx), abs(cy - o.cy)) > (s + o.extent) / 2 + 3 for o in objs):
                objs.append(SceneObject(shape, color, size, float(cx), float(cy), s,
                                        _polygon(shape, float(cx), float(cy), s)))
                break
    return objs


def _texture(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Background ``[size, size, 3]`` float: mid-grey plus multi-scale, weakly coloured noise.

    The noise is what a pixel codec pays for and what the LVLM must learn to ignore.
    """
    img = np.full((size, size, 3), 128.0, dtype=np.float32)
    if kind == "flat":
        return img
    for cells, amp in ((4, 28.0), (16, 18.0), (size // 2, 10.0)):
        grey = rng.normal(0, amp, (cells, cells)).astype(np.float32)
        tint = rng.normal(0, amp * 0.35, (cells, cells, 3)).astype(np.float32)
        for c in range(3):
            layer = Image.fromarray(grey + tint[..., c], mode="F").resize((size, size), Image.BICUBIC)
            img[..., c] += np.asarray(layer)
    return img


def render_scene(objs: Sequence[SceneObject], rng: np.random.Generator, p: ScenesParams) -> np.ndarray:
    """Render to ``[H, W, 3]`` uint8, anti-aliased by supersampling each object's mask.

    Each mask is drawn only over the object's own pixel window, which keeps a scene at
    a few milliseconds.
    """
    size = p.image_size
    img = _texture(rng, size, p.texture)
    ss = _SUPERSAMPLE
    for o in objs:
        x0, y0, w, h = o.bbox
        x0, y0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        x1, y1 = min(int(math.ceil(o.bbox[0] + w)) + 1, size), min(int(math.ceil(o.bbox[1] + h)) + 1, size)
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        ImageDraw.Draw(mask).polygon([((x - x0) * ss, (y - y0) * ss) for x, y in o.polygon], fill=255)
        alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32)[..., None] / 255.0
        rgb = np.array(COLORS[o.color], dtype=np.float32) + rng.normal(0, 8, 3).astype(np.float32)
        win = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = win * (1 - alpha) + rgb * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --- language ---------------------------------------------------------------------------

def _describe(o: SceneObject, with_size: bool) -> str:
    return f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}"


def make_captions(objs: Sequence[SceneObject], rng: np.random.Generator, n: int) -> list[str]:
    """``n`` captions; the first lists objects left to right, the rest in random order."""
    if not objs:
        return ["an empty textured background"] * n
    out = []
    for k in range(n):
        order = sorted(objs, key=lambda o: o.cx) if k == 0 else [objs[i] for i in rng.permutation(len(objs))]
        parts = [f"a {_describe(o, True)}" for o in order]
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        prefix = ("", "there is ", "an image of ", "a picture with ", "a scene with ")[k % 5]
        out.append(prefix + listing)
    return out


def _relation(a: SceneObject, b: SceneObject, rel: str) -> bool | None:
    """Is ``a`` <rel> of ``b``? None when the centres are too close to tell."""
    d = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[rel]
    if abs(d) < _MIN_SPATIAL_GAP:
        return None
    return d > 0


def near_misses(objs: Sequence[SceneObject]) -> list[tuple[str, str]]:
    """(colour, shape) pairs the scene lacks although it has the colour or the shape, in
    ``COLORS`` x ``SHAPES`` order: what a "no" is asked about, so that it cannot be told from
    one attribute."""
    present = {(o.color, o.shape) for o in objs}
    colors, shapes = {o.color for o in objs}, {o.shape for o in objs}
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c in colors or s in shapes)]


def question_candidates(objs: Sequence[SceneObject], rng: np.random.Generator, qtype: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of one type that are unambiguous for this scene."""
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    out: list[tuple[str, str]] = []
    if qtype == "color":
        out = [(f"what color is the {o.shape}?", o.color) for o in objs if shapes[o.shape] == 1]
    elif qtype == "shape":
        out = [(f"what shape is the {o.color} object?", o.shape) for o in objs if colors[o.color] == 1]
    elif qtype == "exists":
        yes = [(f"is there a {c} {s}?", "yes") for c, s in sorted({(o.color, o.shape) for o in objs})]
        near = near_misses(objs)
        k = len(yes)
        picks = rng.choice(len(near), size=min(k, len(near)), replace=False) if near else []
        out = yes + [(f"is there a {near[i][0]} {near[i][1]}?", "no") for i in picks]
    elif qtype == "count":
        out = [(f"how many {PLURALS[s]} are there?", str(shapes.get(s, 0))) for s in SHAPES]
    elif qtype == "spatial":
        for a in objs:
            for b in objs:
                if a is b:
                    continue
                rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
                ans = _relation(a, b, rel)
                if ans is not None:
                    out.append((f"is the {a.name} {rel} the {b.name}?", "yes" if ans else "no"))
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return out


def object_phrases(question: str) -> list[tuple[str, str | None, str | None]]:
    """Each object phrase of a generated question as (its head word, colour, shape), in order;
    ``None`` matches any: "how many circles" names every circle, "the red object" every red
    thing.

    Example: ``"how many circles are there?"`` -> ``[("circles", None, "circle")]``.
    """
    singular = {p: s for s, p in PLURALS.items()}
    words = re.findall(r"[a-z]+", question.lower())
    out: list[tuple[str, str | None, str | None]] = []
    for i, w in enumerate(words):
        shape = w if w in SHAPES else singular.get(w)
        if shape is None and w != "object":
            continue
        colour = words[i - 1] if i > 0 and words[i - 1] in COLORS else None
        if shape is not None or colour is not None:
            out.append((w, colour, shape))
    return out


def question_objects(question: str) -> list[tuple[str | None, str | None]]:
    """(colour, shape) of each object a generated question names, in order (see
    :func:`object_phrases`).

    Example: ``"is the red circle left of the blue cross?"`` -> ``[("red", "circle"),
    ("blue", "cross")]``.
    """
    return [(c, s) for _, c, s in object_phrases(question)]


def named_objects(question: str, objects: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the ``(colour, shape)`` objects a generated question names (see
    :func:`question_objects`); empty for "is there a red cross?" in a scene without one."""
    wanted = question_objects(question)
    return [i for i, (c, s) in enumerate(objects)
            if any((wc is None or wc == c) and (ws is None or ws == s) for wc, ws in wanted)]


def question_relation(question: str) -> tuple[tuple[str, str], str, tuple[str, str]] | None:
    """A generated spatial question read back as (first object, relation, second object), each
    object a (colour, shape); None for any other text.

    Example: ``"is the red circle left of the blue cross?"`` -> ``(("red", "circle"), "left of",
    ("blue", "cross"))``.
    """
    low = question.lower()
    rel = next((r for r in RELATIONS if f" {r} " in low), None)
    named = question_objects(low)
    if rel is None or len(named) != 2:
        return None
    (c0, s0), (c1, s1) = named
    if c0 is None or s0 is None or c1 is None or s1 is None:
        return None
    return (c0, s0), rel, (c1, s1)


def make_questions(objs: Sequence[SceneObject], rng: np.random.Generator, n: int,
                   type_probs: Sequence[float] | None = None) -> list[dict[str, str]]:
    """``n`` questions cycling through the types (balanced), yes/no answers balanced; with
    ``type_probs`` (one per :data:`QUESTION_TYPES`), each question's type drawn from them.

    For ``count``, answers are balanced by drawing the shape uniformly, so zero counts
    appear as often as the scene composition implies.
    """
    out: list[dict[str, str]] = []
    start = int(rng.integers(len(QUESTION_TYPES)))
    for k in range(n):
        qtype = (QUESTION_TYPES[(start + k) % len(QUESTION_TYPES)] if type_probs is None
                 else QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=np.asarray(type_probs)))])
        cands = question_candidates(objs, rng, qtype)
        if qtype in ("exists", "spatial"):
            want = ("yes", "no")[int(rng.integers(2))]
            cands = [c for c in cands if c[1] == want] or cands
        if not cands:
            continue
        q, a = cands[int(rng.integers(len(cands)))]
        atype = "yes/no" if a in ("yes", "no") else "number" if qtype == "count" else "other"
        out.append({"question": q, "answer": a, "question_type": qtype, "answer_type": atype})
    return out


_TYPE_OPENINGS = (("what color", "color"), ("what shape", "shape"), ("is there", "exists"), ("how many", "count"),
                  ("is the", "spatial"))


def question_type(question: str) -> str | None:
    """The :data:`QUESTION_TYPES` entry of a generated question, from its opening words; None
    for any other text."""
    q = question.lower()
    return next((t for opening, t in _TYPE_OPENINGS if q.startswith(opening + " ")), None)


def make_refs(objs: Sequence[SceneObject]) -> list[str]:
    """One referring expression per object (colour + shape is unique in a scene)."""
    return [f"the {_describe(o, True)}" for o in objs]


def absent_refs(objs: Sequence[SceneObject]) -> list[str]:
    """Referring expressions in :func:`make_refs`' form of objects the scene lacks: every size
    of every :func:`near_misses` pair."""
    return [f"the {z} {c} {s}" for c, s in near_misses(objs) for z in SIZES]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray                # [H, W, 3] uint8
    objects: list[SceneObject]
    captions: list[str]
    questions: list[dict[str, str]]
    refs: list[str]


def make_scene(p: ScenesParams, stream: int, index: int, n_questions: int | None = None) -> Scene:
    """The scene ``index`` of seed ``stream``: image, objects and all of its language."""
    rng = scene_rng(p.seed, stream, index)
    objs = sample_scene(rng, p)
    image = render_scene(objs, rng, p)
    nq = p.questions_per_image if n_questions is None else n_questions
    return Scene(image, objs, make_captions(objs, rng, p.captions_per_image),
                 make_questions(objs, rng, nq), make_refs(objs))
