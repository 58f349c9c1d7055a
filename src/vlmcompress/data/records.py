"""One record API for every data set: procedural scenes and COCO-format downloads alike.

Both worlds write the same on-disk layout under a data-set root::

    images/<split>/<file_name>
    annotations/instances_<split>.json      COCO instances (images, annotations, categories)
    annotations/captions_<split>.json       COCO captions
    annotations/vqa_questions_<split>.json  VQAv2 questions  {"questions": [...]}
    annotations/vqa_annotations_<split>.json VQAv2 answers   {"annotations": [...]}
    annotations/refs_<split>.json           RefCOCO-style    [{"ref_id", "ann_id", "image_id",
                                                              "sentences": [{"sent"}], ...}]

so :func:`load_split` never needs to know which world it is in. Only ``instances`` is
required; the other files are optional (a split without referring expressions loads
with empty ``refs``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcompress.io import read_json

ANNOTATION_KINDS = ("instances", "captions", "vqa_questions", "vqa_annotations", "refs")


def image_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / split


def annotation_path(root: str | Path, kind: str, split: str) -> Path:
    if kind not in ANNOTATION_KINDS:
        raise ValueError(f"unknown annotation kind {kind!r} (known: {', '.join(ANNOTATION_KINDS)})")
    return Path(root) / "annotations" / f"{kind}_{split}.json"


@dataclass(frozen=True)
class ObjectAnn:
    """One annotated object; ``bbox`` is COCO ``[x, y, w, h]`` in pixels."""

    ann_id: int
    category: str
    bbox: tuple[float, float, float, float]
    attributes: dict[str, Any] = field(default_factory=dict)  # scenes: colour, size, shape


@dataclass(frozen=True)
class Question:
    """A VQAv2-format question with its ten (or fewer) human / generated answers."""

    question_id: int
    question: str
    answer: str                   # multiple_choice_answer: the most common answer
    answers: tuple[str, ...]
    question_type: str
    answer_type: str


@dataclass(frozen=True)
class RefExpr:
    """A referring expression and the box of the object it names (COCO ``[x, y, w, h]``)."""

    ref_id: int
    sentence: str
    bbox: tuple[float, float, float, float]
    ann_id: int


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    objects: tuple[ObjectAnn, ...] = ()
    captions: tuple[str, ...] = ()
    questions: tuple[Question, ...] = ()
    refs: tuple[RefExpr, ...] = ()


def _optional(root: Path, kind: str, split: str) -> Any:
    path = annotation_path(root, kind, split)
    return read_json(path) if path.is_file() else None


def load_split(root: str | Path, split: str) -> list[ImageRecord]:
    """All records of one split, sorted by ``image_id``.

    Raises ``FileNotFoundError`` (one line, naming the file) when the split's
    ``instances`` file is missing, and ``ValueError`` when a file is not valid JSON or
    references an unknown image.
    """
    root = Path(root)
    inst = read_json(annotation_path(root, "instances", split))
    cats = {c["id"]: c["name"] for c in inst.get("categories", [])}
    images = {im["id"]: im for im in inst["images"]}

    def check(image_id: int, kind: str) -> int:
        if image_id not in images:
            raise ValueError(f"{annotation_path(root, kind, split)}: unknown image_id {image_id}")
        return image_id

    objects: dict[int, list[ObjectAnn]] = defaultdict(list)
    anns_by_id: dict[int, dict[str, Any]] = {}
    for a in inst.get("annotations", []):
        anns_by_id[a["id"]] = a
        objects[check(a["image_id"], "instances")].append(ObjectAnn(
            ann_id=a["id"], category=cats.get(a["category_id"], str(a["category_id"])),
            bbox=tuple(float(v) for v in a["bbox"]), attributes=dict(a.get("attributes", {}))))

    captions: dict[int, list[str]] = defaultdict(list)
    cap = _optional(root, "captions", split)
    for a in (cap or {}).get("annotations", []):
        captions[check(a["image_id"], "captions")].append(a["caption"].strip())

    questions: dict[int, list[Question]] = defaultdict(list)
    vq, va = _optional(root, "vqa_questions", split), _optional(root, "vqa_annotations", split)
    if vq is not None and va is not None:
        answers = {a["question_id"]: a for a in va["annotations"]}
        for q in vq["questions"]:
            a = answers.get(q["question_id"])
            if a is None:
                continue  # a question without annotation cannot be scored
            questions[check(q["image_id"], "vqa_questions")].append(Question(
                question_id=q["question_id"], question=q["question"],
                answer=a["multiple_choice_answer"],
                answers=tuple(x["answer"] for x in a.get("answers", [])) or (a["multiple_choice_answer"],),
                question_type=a.get("question_type", ""), answer_type=a.get("answer_type", "")))

    refs: dict[int, list[RefExpr]] = defaultdict(list)
    for r in _optional(root, "refs", split) or []:
        ann = anns_by_id.get(r["ann_id"])
        if ann is None:
            continue  # object not in this split's instances (e.g. a subset download)
        for s in r["sentences"]:
            refs[check(r["image_id"], "refs")].append(RefExpr(
                ref_id=r["ref_id"], sentence=s["sent"].strip(),
                bbox=tuple(float(v) for v in ann["bbox"]), ann_id=r["ann_id"]))

    return [ImageRecord(
        image_id=i, path=image_dir(root, split) / im["file_name"], width=im["width"],
        height=im["height"], objects=tuple(objects[i]), captions=tuple(captions[i]),
        questions=tuple(questions[i]), refs=tuple(refs[i]))
        for i, im in sorted(images.items())]
