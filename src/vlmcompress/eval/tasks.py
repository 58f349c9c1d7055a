"""Downstream tasks through the LVLM adapter: VQA, captioning, retrieval, grounding.

Metric functions are pure (strings / tensors in, numbers out); the ``run_*`` functions
batch records through an :class:`~vlmcompress.lvlm.adapter.LVLM`. Images can be replaced
(``images=`` a mapping image_id -> ``[3, H, W]`` float tensor) so the same code scores
decoded images of any codec, and ``transform`` plugs in visual-token compression.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vlmcompress.data.records import ImageRecord, Question, RefExpr
from vlmcompress.images import read_image_rgb
from vlmcompress.lvlm.imageprep import box_to_input

# --- pure metrics ----------------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(ans: str) -> str:
    """VQAv2-style normalisation: lower case, punctuation out, number words to digits, no articles."""
    ans = re.sub(r"(?<=\d),(?=\d)", "", ans.lower().strip())
    ans = re.sub(r"[^\w\s]", " ", ans)
    words = [_NUMBERS.get(w, w) for w in ans.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: min(1, #annotators who gave ``pred`` / 3), averaged over the 10 leave-one-out
    subsets as the official evaluation does. With identical answers this is exact match."""
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) < 2:
        return float(bool(gts) and p == gts[0])
    scores = [min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return float(np.mean(scores))


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """First four numbers of a ``[x1, y1, x2, y2]`` answer (normalised), or None."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", text)
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in nums[:4])
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def ref_box(rec: ImageRecord, bbox: Sequence[float], aspect: str = "resize") -> tuple[float, float, float, float]:
    """A COCO ``[x, y, w, h]`` pixel box of ``rec`` -> normalised ``[x1, y1, x2, y2]`` in the
    square the vision tower sees (LLaVA-1.5 answers boxes in that frame: the padded square)."""
    x, y, w, h = bbox
    box = (x / rec.width, y / rec.height, (x + w) / rec.width, (y + h) / rec.height)
    return box_to_input(box, rec.height, rec.width, aspect)


def grounding_iou(text: str, rec: ImageRecord, bbox: Sequence[float], aspect: str = "resize") -> float:
    """IoU of a generated box answer with the reference box (0 when no box can be read)."""
    box = parse_box(text)
    return box_iou(box, ref_box(rec, bbox, aspect)) if box is not None else 0.0


def grounding_ious(texts: Sequence[str], refs: Sequence[tuple[ImageRecord, RefExpr]],
                   aspect: str = "resize") -> list[float]:
    """:func:`grounding_iou` of each generated box answer with the box of its referring expression."""
    if len(texts) != len(refs):
        raise ValueError(f"grounding_ious: {len(texts)} answers for {len(refs)} referring expressions")
    return [grounding_iou(text, r, ref.bbox, aspect) for text, (r, ref) in zip(texts, refs)]


def grounding_accuracy(ious: Sequence[float], threshold: float = 0.5) -> float:
    """Grounding accuracy (percent): the share of answers whose IoU reaches ``threshold``
    (acc@0.5 by default). Needs at least one IoU."""
    if not len(ious):
        raise ValueError("grounding_accuracy: no IoUs to score")
    return 100.0 * float(np.mean([i >= threshold for i in ious]))


# The widest box answer in LLaVA-1.5's format: generation must never cut one.
BOX_ANSWER = "[0.00, 0.00, 0.00, 0.00]"


def answer_tokens(lvlm, texts: Sequence[str]) -> int:
    """``max_new_tokens`` that fits the longest of ``texts`` in the model's own tokens, plus
    the end-of-sequence token (so a reference-length answer is never cut)."""
    tok = lvlm.tokenizer
    return max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) + 1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def recall_at_k(sim: Tensor, gt: Sequence[set[int]], ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """``sim [Q, G]``; query q is a hit at k if any of ``gt[q]`` is among its top k. Percentages."""
    top = sim.topk(min(max(ks), sim.shape[1]), dim=1).indices.tolist()   # a gallery may hold < k items
    return {k: 100.0 * float(np.mean([bool(set(t[:k]) & g) for t, g in zip(top, gt)])) for k in ks}


def cider(preds: Mapping[int, str], refs: Mapping[int, Sequence[str]]) -> float:
    """CIDEr-D (pycocoevalcap's implementation) on lower-cased, punctuation-free words.

    pycocoevalcap's PTB tokenizer needs Java; scene captions are plain words, so a regex
    tokenizer gives the same tokens without it.
    """
    from pycocoevalcap.cider.cider import Cider

    def tok(s: str) -> str:
        return " ".join(re.findall(r"[\w']+", s.lower()))

    ids = sorted(preds)
    gts = {i: [tok(r) for r in refs[i]] for i in ids}
    res = {i: [tok(preds[i])] for i in ids}
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


def caption_cider(records: Sequence[ImageRecord], captions: Sequence[str]) -> float:
    """:func:`cider` of one generated caption per record against the record's reference captions."""
    if len(records) != len(captions):
        raise ValueError(f"caption_cider: {len(captions)} captions for {len(records)} records")
    return cider({r.image_id: c for r, c in zip(records, captions)}, {r.image_id: r.captions for r in records})


# --- running the model -----------------------------------------------------------------

def load_image(path) -> Tensor:
    """An image file as ``[3, H, W]`` float in [0, 1] (:func:`vlmcompress.images.read_image_rgb`)."""
    arr = read_image_rgb(path).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


ImageSource = Callable[[ImageRecord], Tensor]


def file_images(rec: ImageRecord) -> Tensor:
    return load_image(rec.path)


def _unique_images(recs: Sequence[ImageRecord], images: ImageSource) -> tuple[list[Tensor], list[int]]:
    """Each distinct image once (``[3, H, W]`` each, sizes may differ) and the image index of
    every record."""
    first: dict[int, int] = {}
    for r in recs:
        first.setdefault(r.image_id, len(first))
    uniq = {r.image_id: r for r in recs}
    return [images(uniq[i]) for i in first], [first[r.image_id] for r in recs]


def _batches(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


@dataclass(frozen=True)
class VQAResult:
    acc: float
    by_type: dict[str, float]
    n: int
    predictions: list[tuple[int, str, str]]   # (question_id, prediction, answer)


def vqa_items(records: Sequence[ImageRecord], max_questions: int = 0, seed: int = 0
              ) -> list[tuple[ImageRecord, Question]]:
    """(record, question) pairs; a seeded, type-stratified subset when ``max_questions`` > 0."""
    items = [(r, q) for r in records for q in r.questions]
    if 0 < max_questions < len(items):
        rng = np.random.default_rng(seed)
        items = [items[i] for i in sorted(rng.choice(len(items), max_questions, replace=False))]
    return items


def run_vqa(lvlm, items: Sequence[tuple[ImageRecord, Question]], batch_size: int = 32,
            images: ImageSource = file_images, transform=None, progress: bool = False) -> VQAResult:
    from tqdm.auto import tqdm
    per_type: dict[str, list[float]] = defaultdict(list)
    preds = []
    it = list(_batches(items, batch_size))
    for batch in tqdm(it, disable=not progress, desc="vqa"):
        imgs, index = _unique_images([r for r, _ in batch], images)
        answers = lvlm.generate(imgs, [q.question for _, q in batch], task="vqa", transform=transform,
                                max_new_tokens=answer_tokens(lvlm, [a for _, q in batch for a in q.answers]),
                                image_index=index)
        for (_, q), a in zip(batch, answers):
            per_type[q.question_type].append(vqa_accuracy(a, q.answers))
            preds.append((q.question_id, a, q.answer))
    scores = [s for v in per_type.values() for s in v]
    return VQAResult(acc=100.0 * float(np.mean(scores)) if scores else float("nan"),
                     by_type={t: 100.0 * float(np.mean(v)) for t, v in sorted(per_type.items())},
                     n=len(scores), predictions=preds)


def majority_baseline(train: Sequence[ImageRecord], items: Sequence[tuple[ImageRecord, Question]]
                      ) -> tuple[float, dict[str, float]]:
    """Accuracy of always answering each question type's most common *training* answer."""
    common = {t: c.most_common(1)[0][0] for t, c in _answer_counts(train).items()}
    per_type: dict[str, list[float]] = defaultdict(list)
    for _, q in items:
        per_type[q.question_type].append(vqa_accuracy(common.get(q.question_type, ""), q.answers))
    scores = [s for v in per_type.values() for s in v]
    return 100.0 * float(np.mean(scores)), {t: 100.0 * float(np.mean(v)) for t, v in sorted(per_type.items())}


def _answer_counts(records: Sequence[ImageRecord]) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        for q in r.questions:
            out[q.question_type][normalize_answer(q.answer)] += 1
    return out


def run_captions(lvlm, records: Sequence[ImageRecord], batch_size: int = 32, images: ImageSource = file_images,
                 transform=None) -> tuple[float, dict[int, str]]:
    """CIDEr of generated captions (percent) and the captions by image id."""
    captions: list[str] = []
    for batch in _batches(list(records), batch_size):
        captions += lvlm.generate([images(r) for r in batch], None, task="caption", transform=transform,
                                  max_new_tokens=answer_tokens(lvlm, [c for r in batch for c in r.captions]))
    return caption_cider(records, captions), {r.image_id: c for r, c in zip(records, captions)}


def run_grounding(lvlm, records: Sequence[ImageRecord], batch_size: int = 32, max_refs: int = 0,
                  images: ImageSource = file_images, transform=None) -> tuple[float | None, float | None]:
    """(accuracy at IoU >= 0.5 in percent, mean IoU) over referring expressions; ``(None, None)``
    when the records have none (the task is absent, not failed)."""
    items = [(r, ref) for r in records for ref in r.refs]
    if not items:
        return None, None
    if 0 < max_refs < len(items):
        rng = np.random.default_rng(0)
        items = [items[i] for i in sorted(rng.choice(len(items), max_refs, replace=False))]
    ious = []
    for batch in _batches(items, batch_size):
        imgs, index = _unique_images([r for r, _ in batch], images)
        out = lvlm.generate(imgs, [ref.sentence for _, ref in batch], task="ground", transform=transform,
                            max_new_tokens=answer_tokens(lvlm, [BOX_ANSWER]), image_index=index)
        ious += grounding_ious(out, batch, lvlm.image_aspect)
    return grounding_accuracy(ious), float(np.mean(ious))


@torch.inference_mode()
def run_retrieval(lvlm, records: Sequence[ImageRecord], batch_size: int = 64,
                  images: ImageSource = file_images) -> dict[str, float]:
    """Image-to-text and text-to-image R@1/R@5 (percent) over the records' captions."""
    img_emb = torch.cat([lvlm.image_embeddings([images(r) for r in b])
                         for b in _batches(list(records), batch_size)])
    caps = [(i, c) for i, r in enumerate(records) for c in r.captions]
    txt_emb = torch.cat([lvlm.text_embeddings([c for _, c in b]) for b in _batches(caps, 256)])
    owner = [i for i, _ in caps]
    sim = img_emb @ txt_emb.T                                           # [I, C]
    per_image: dict[int, set[int]] = defaultdict(set)
    for j, i in enumerate(owner):
        per_image[i].add(j)
    i2t = recall_at_k(sim, [per_image[i] for i in range(len(records))])
    t2i = recall_at_k(sim.T, [{i} for i in owner])
    return {"retrieval_i2t_r1": i2t[1], "retrieval_i2t_r5": i2t[5],
            "retrieval_t2i_r1": t2i[1], "retrieval_t2i_r5": t2i[5]}
