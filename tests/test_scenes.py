from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from vlmcompress.data.generate import generate_scenes
from vlmcompress.data.records import annotation_path, load_split
from vlmcompress.data.scenes import QUESTION_TYPES, STREAMS, make_scene, named_objects, question_objects


def test_scene_is_deterministic_and_independent_of_count(tiny_scenes):
    a = make_scene(tiny_scenes, STREAMS["test"], 3)
    b = make_scene(tiny_scenes, STREAMS["test"], 3)
    assert np.array_equal(a.image, b.image) and a.questions == b.questions
    c = make_scene(tiny_scenes, STREAMS["train"], 3)
    assert not np.array_equal(a.image, c.image)


def test_answers_agree_with_objects(tiny_scenes):
    for i in range(40):
        s = make_scene(tiny_scenes, 100, i, n_questions=20)
        shapes = Counter(o.shape for o in s.objects)
        colors = {o.color: o for o in s.objects}
        pairs = {(o.color, o.shape) for o in s.objects}
        for q in s.questions:
            words = q["question"].rstrip("?").split()
            if q["question_type"] == "count":
                shape = {"circles": "circle", "squares": "square", "triangles": "triangle",
                         "crosses": "cross"}[words[2]]
                assert q["answer"] == str(shapes[shape])
            elif q["question_type"] == "exists":
                assert q["answer"] == ("yes" if (words[3], words[4]) in pairs else "no")
            elif q["question_type"] == "shape":
                assert q["answer"] == colors[words[4]].shape
            elif q["question_type"] == "color":
                (obj,) = [o for o in s.objects if o.shape == words[4]]
                assert q["answer"] == obj.color


def test_objects_are_inside_and_do_not_overlap(tiny_scenes):
    for i in range(30):
        objs = make_scene(tiny_scenes, 100, i).objects
        assert tiny_scenes.min_objects - 1 <= len(objs) <= tiny_scenes.max_objects
        for o in objs:
            x, y, w, h = o.bbox
            assert x >= 0 and y >= 0 and x + w <= tiny_scenes.image_size and y + h <= tiny_scenes.image_size
        for a in objs:
            for b in objs:
                if a is not b:
                    ax, ay, aw, ah = a.bbox
                    bx, by, bw, bh = b.bbox
                    assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay


def test_generated_dataset_is_coco_format_with_disjoint_splits(tiny_scenes, tmp_path):
    root = tmp_path / "ds"
    counts = generate_scenes(tiny_scenes, root, workers=1)
    assert counts["images.train"] == 12 and counts["images.test"] == 6
    assert counts["generate_seconds"] > 0
    digests: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        coco = COCO(str(annotation_path(root, "instances", split)))
        caps = COCO(str(annotation_path(root, "captions", split)))
        recs = load_split(root, split)
        assert len(recs) == len(coco.getImgIds()) == len(caps.getImgIds())
        assert sum(len(r.objects) for r in recs) == len(coco.getAnnIds())
        for r in recs:
            img = Image.open(r.path)
            assert img.size == (r.width, r.height) and img.mode == "RGB"
            assert len(r.refs) == len(r.objects) and r.captions and r.questions
            mask = coco.annToMask(coco.loadAnns(r.objects[0].ann_id)[0])
            assert mask.sum() > 0  # polygons are real segmentations
        digests[split] = {hashlib.sha256(r.path.read_bytes()).hexdigest() for r in recs}
        assert counts[f"questions.{split}"] == sum(counts.get(f"questions.{split}.{t}", 0) for t in QUESTION_TYPES)
    assert not (digests["train"] & digests["test"]) and not (digests["train"] & digests["val"])
    assert not (digests["val"] & digests["test"])


def test_question_types_are_balanced(tiny_scenes):
    types = Counter(q["question_type"] for i in range(100)
                    for q in make_scene(tiny_scenes, 100, i).questions)
    assert set(types) == set(QUESTION_TYPES)
    assert min(types.values()) > 0.6 * max(types.values())
    yn = Counter(q["answer"] for i in range(100) for q in make_scene(tiny_scenes, 100, i).questions
                 if q["answer_type"] == "yes/no")
    assert abs(yn["yes"] - yn["no"]) < 0.2 * (yn["yes"] + yn["no"])


def test_load_split_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_test.json: no such file"):
        load_split(tmp_path, "test")


def test_question_objects_reads_each_wording():
    assert question_objects("is the red circle left of the blue cross?") == [("red", "circle"), ("blue", "cross")]
    assert question_objects("how many crosses are there?") == [(None, "cross")]
    assert question_objects("what shape is the green object?") == [("green", None)]
    assert question_objects("what color is the triangle?") == [(None, "triangle")]
    assert question_objects("describe the image") == []


def test_named_objects_match_every_generated_question(tiny_scenes):
    """Tied to the generator: each question names exactly the objects its answer is about."""
    seen = set()
    for i in range(40):
        s = make_scene(tiny_scenes, 100, i, n_questions=20)
        objs = [(o.color, o.shape) for o in s.objects]
        for q in s.questions:
            named = named_objects(q["question"], objs)
            qt, a = q["question_type"], q["answer"]
            seen.add(qt)
            if qt == "count":
                assert len(named) == int(a)
            elif qt == "exists":
                assert len(named) == (1 if a == "yes" else 0)
            elif qt == "spatial":
                assert len(named) == 2
            else:                                   # colour and shape questions name one object
                assert len(named) == 1
                o = s.objects[named[0]]
                assert a == (o.color if qt == "color" else o.shape)
    assert seen == set(QUESTION_TYPES)
