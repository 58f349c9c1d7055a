"""Write the procedural scenes as a COCO / VQAv2 / RefCOCO-format data set on disk."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from vlmcompress.data.config import ScenesParams
from vlmcompress.data.records import annotation_path, image_dir
from vlmcompress.data.scenes import ID_BASE, SHAPES, STREAMS, make_scene
from vlmcompress.io import atomic_path, write_json

SPLITS = ("train", "val", "test")
_CATEGORIES = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
_CAT_ID = {c["name"]: c["id"] for c in _CATEGORIES}


def _scene_entries(p: ScenesParams, split: str, index: int, img_dir: str) -> dict[str, Any]:
    """Render and save one scene; return its annotation fragments (ids filled in later)."""
    scene = make_scene(p, STREAMS[split], index)
    image_id = ID_BASE[split] + index + 1
    file_name = f"{image_id:07d}.png"
    Image.fromarray(scene.image).save(Path(img_dir) / file_name, compress_level=1)
    return {"image_id": image_id, "file_name": file_name, "scene": scene}


def _split_annotations(p: ScenesParams, split: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    images, anns, caps, qs, qas, refs = [], [], [], [], [], []
    for e in entries:
        iid, scene = e["image_id"], e["scene"]
        images.append({"id": iid, "file_name": e["file_name"], "width": p.image_size, "height": p.image_size})
        for k, o in enumerate(scene.objects):
            ann_id = iid * 100 + k
            x, y, w, h = o.bbox
            anns.append({"id": ann_id, "image_id": iid, "category_id": _CAT_ID[o.shape],
                         "bbox": [round(v, 2) for v in (x, y, w, h)], "area": round(w * h, 2),
                         "iscrowd": 0, "segmentation": [[c for pt in o.polygon for c in pt]],
                         "attributes": {"color": o.color, "size": o.size, "shape": o.shape}})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": iid, "split": split,
                         "category_id": _CAT_ID[o.shape],
                         "sentences": [{"sent": scene.refs[k], "tokens": scene.refs[k].split()}]})
        for k, c in enumerate(scene.captions):
            caps.append({"id": iid * 100 + k, "image_id": iid, "caption": c})
        for k, q in enumerate(scene.questions):
            qid = iid * 100 + k
            qs.append({"question_id": qid, "image_id": iid, "question": q["question"]})
            qas.append({"question_id": qid, "image_id": iid, "question_type": q["question_type"],
                        "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
                        "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": j + 1}
                                    for j in range(10)]})
    info = {"description": "vlmcompress procedural scenes", "version": "1", "seed": p.seed}
    return {
        "instances": {"info": info, "images": images, "annotations": anns, "categories": _CATEGORIES},
        "captions": {"info": info, "images": images, "annotations": caps},
        "vqa_questions": {"info": info, "data_subtype": split, "questions": qs},
        "vqa_annotations": {"info": info, "data_subtype": split, "annotations": qas},
        "refs": refs,
    }


def _split_counts(split: str, ann: dict[str, Any]) -> dict[str, int]:
    qtypes = Counter(a["question_type"] for a in ann["vqa_annotations"]["annotations"])
    out = {f"images.{split}": len(ann["instances"]["images"]),
           f"objects.{split}": len(ann["instances"]["annotations"]),
           f"captions.{split}": len(ann["captions"]["annotations"]),
           f"questions.{split}": len(ann["vqa_questions"]["questions"]),
           f"refs.{split}": len(ann["refs"])}
    out.update({f"questions.{split}.{t}": n for t, n in sorted(qtypes.items())})
    return out


def generate_scenes(p: ScenesParams, root: str | Path, workers: int = 2) -> dict[str, float]:
    """Generate train/val/test under ``root`` (replaced atomically). Returns flat counts + seconds."""
    t0 = time.perf_counter()
    sizes = {"train": p.n_train, "val": p.n_val, "test": p.n_test}
    counts: dict[str, float] = {}
    with atomic_path(root) as tmp, ProcessPoolExecutor(max_workers=workers) as pool:
        for split in SPLITS:
            d = image_dir(tmp, split)
            d.mkdir(parents=True)
            n = sizes[split]
            entries = list(pool.map(_scene_entries, [p] * n, [split] * n, range(n), [str(d)] * n,
                                    chunksize=max(1, n // (8 * workers))))
            ann = _split_annotations(p, split, entries)
            for kind, obj in ann.items():
                write_json(annotation_path(tmp, kind, split), obj, indent=None)
            counts.update(_split_counts(split, ann))
    counts["generate_seconds"] = round(time.perf_counter() - t0, 2)
    return counts
