"""Paper profile data: COCO 2017 val + VQAv2 val + RefCOCO (UNC) in the project's layout.

The three sources use different COCO releases, which line up as follows:

* **COCO 2017 val** (``val2017.zip``, ``annotations_trainval2017.zip``) gives the 5000
  images, their objects (``instances_val2017.json``) and captions
  (``captions_val2017.json``). COCO 2017 re-split the 2014 images without renumbering,
  so image ids *and* annotation ids are the same as in COCO 2014.
* **VQAv2 val** (``v2_OpenEnded_mscoco_val2014_questions.json``,
  ``v2_mscoco_val2014_annotations.json``) is on COCO val2014 images: we keep the
  questions whose ``image_id`` is a val2017 image.
* **RefCOCO** (``refcoco/refs(unc).p``) is on COCO train2014 images: we keep the refs
  whose ``image_id`` is a val2017 image and whose ``ann_id`` is one of that image's
  objects in ``instances_val2017.json`` (its box is taken from there).

val2014 and train2014 are disjoint, so an image has VQA questions *or* referring
expressions, never both. That is why ``subset`` keeps the first N image ids (sorted)
that have a question **or** a referring expression: "with questions" alone would
drop every RefCOCO image. With ``subset: null`` all val2017 images are kept (captions
and objects exist for all of them).

**COCO 2017 train** (``train2017.zip``, with ``train_images > 0``) gives split ``train``: the
first N images by name (= by image id), images only, for the codec to train on. train2017 and
val2017 are disjoint; the split is still checked against the evaluated images. Only those
members' bytes are fetched, by HTTP range requests (:func:`fetch_train_images`).

The RefCOCO pickle is read with :class:`RestrictedUnpickler`, which only builds
builtin containers and scalars; anything else (a class, a function) is refused. Before
that, :func:`check_pickle` caps its size and walks its opcodes, so a small pickle cannot
make the unpickler allocate gigabytes. Archive members are read within the caps of
:class:`vlmcompress.data.download.ArchiveLimits`.

The result is written atomically under ``out_root`` (see :mod:`vlmcompress.data.records`)
for split ``test`` (and ``val`` when ``val_images > 0``, ``train`` when ``train_images > 0``) and loads with both
:func:`vlmcompress.data.records.load_split` and ``pycocotools.coco.COCO``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import pickletools
import posixpath
import re
import shutil
import sys
import urllib.parse
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmcompress.data.config import DownloadParams, LocalParams, SourceParams
from vlmcompress.data.download import (DEFAULT_MAX_BYTES, ArchiveLimitError, ArchiveLimits, ChecksumError,
                                       DownloadError, RangesUnsupported, RemoteZipFile, copy_member, download,
                                       extract, member_spans, read_member)
from vlmcompress.data.records import annotation_path, image_dir
from vlmcompress.io import atomic_path, write_json

# Defaults for configs/paper.yaml. The hosts publish neither hashes nor sizes; pin them
# in the config after a first verified download if you want byte-exact reproduction.
PAPER_SOURCES: dict[str, dict[str, Any]] = {
    "coco_val_images": {"url": "http://images.cocodataset.org/zips/val2017.zip",
                        "sha256": None, "size": None},
    "coco_annotations": {"url": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                         "sha256": None, "size": None},
    "vqa_questions": {"url": "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip",
                      "sha256": None, "size": None},
    "vqa_annotations": {"url": "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Annotations_Val_mscoco.zip",
                        "sha256": None, "size": None},
    "refcoco": {"url": "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco.zip",
                "sha256": None, "size": None},
    "coco_train_images": {"url": "http://images.cocodataset.org/zips/train2017.zip",
                          "sha256": None, "size": None},
}
REQUIRED_SOURCES = ("coco_val_images", "coco_annotations", "vqa_questions", "vqa_annotations")
OPTIONAL_SOURCES = ("refcoco",)   # its host is often down; without it the splits have no refs
TRAIN_SOURCE = "coco_train_images"   # read only when data.download.train_images > 0
KNOWN_SOURCES = REQUIRED_SOURCES + OPTIONAL_SOURCES + (TRAIN_SOURCE,)

# Member names inside the official archives (matched by trailing path).
MEMBERS = {
    "instances": "annotations/instances_val2017.json",
    "captions": "annotations/captions_val2017.json",
    "vqa_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
    "vqa_annotations": "v2_mscoco_val2014_annotations.json",
    "refs": "refs(unc).p",
}
_SOURCE_OF = {"instances": "coco_annotations", "captions": "coco_annotations",
              "vqa_questions": "vqa_questions", "vqa_annotations": "vqa_annotations", "refs": "refcoco"}
IMAGE_FOLDER = "val2017"          # top folder inside val2017.zip
TRAIN_FOLDER = "train2017"        # top folder inside train2017.zip
TRAIN_NAME = re.compile(r"\d{1,12}\.jpg")   # its images: <12-digit image id>.jpg
TRAIN_MAX_MEMBERS = 200_000       # train2017.zip: 118,288 entries
TRAIN_MAX_BYTES = 32 << 30        # whole-archive cap of the fallback download (train2017.zip: ~18 GB)
TRAIN_MAX_DIRECTORY = 24 << 20    # its central directory (~12 MB): bounds the entries zipfile builds


# --- the RefCOCO pickle -----------------------------------------------------------------

MAX_PICKLE_BYTES = 256 << 20      # refs(unc).p is ~40 MB
_MEMO_SLACK = 1 << 16             # memo indices allowed beyond the number of PUTs seen so far
_WATCHED = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "FRAME"}   # opcodes check_pickle looks at


def _flat(kind: type, scalars: tuple[type, ...]) -> Callable[..., Any]:
    """``kind(*args)`` for arguments of the ``scalars`` types only.

    This is what the unpickler calls for a global: ``bytes(2**31)`` (a size, not data)
    or ``str(x)`` of a structure whose shared parts multiply in its repr would allocate
    far more than the pickle holds, so anything but flat data is refused. Being a plain
    function, not a type, it cannot be used by ``NEWOBJ`` (``bytes.__new__(bytes, n)``).
    """
    def build(*args: Any) -> Any:
        bad = [type(a).__name__ for a in args if not isinstance(a, scalars)]
        if bad:
            raise pickle.UnpicklingError(f"refused {kind.__name__}() of a {bad[0]}")
        return kind(*args)

    build.__name__ = kind.__name__
    return build


_TEXT = (str, bytes, bytearray)
_NUMBER = _TEXT + (int, float)
_CONTAINER = (list, tuple, set, frozenset, dict)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only harmless builtin types (never a class or a function).

    Lists, dicts, strings and numbers are built by opcodes and need no lookup at all;
    the globals below cover sets, tuples built by ``REDUCE`` and Python 2 names. Each
    resolves to a guarded constructor that accepts only flat arguments (see :func:`_flat`).
    """

    _SAFE: dict[str, Callable[..., Any]] = {
        **{t.__name__: _flat(t, _TEXT) for t in (str, bytes, bytearray)},
        **{t.__name__: _flat(t, _NUMBER) for t in (int, float, complex, bool)},
        **{t.__name__: _flat(t, _CONTAINER) for t in (set, frozenset, list, dict, tuple)},
    }
    _PY2_NAMES = {"unicode": "str", "long": "int"}

    def find_class(self, module: str, name: str) -> Any:
        name = self._PY2_NAMES.get(name, name) if module == "__builtin__" else name
        if module in ("builtins", "__builtin__") and name in self._SAFE:
            return self._SAFE[name]
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} (only builtin data allowed)")


def check_pickle(data: bytes, origin: str, max_bytes: int = MAX_PICKLE_BYTES) -> None:
    """Refuse a pickle larger than ``max_bytes`` or one that could allocate far more than its size.

    Walks the opcodes (:func:`pickletools.genops`, nothing is built) and refuses a
    length prefix beyond the data (``BINBYTES8`` of 2**40 bytes), a ``FRAME`` longer than
    the rest, and a memo index far beyond the memo entries stored so far (the unpickler
    sizes its memo table by the largest index). One-line ``ValueError`` naming ``origin``.
    """
    if len(data) > max_bytes:
        raise ValueError(f"{origin}: refused pickle: {len(data)} bytes, more than the {max_bytes}-byte cap")
    stored = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name not in _WATCHED:
                continue
            if op.name == "FRAME":
                if arg > len(data) - pos:
                    raise pickle.UnpicklingError(f"frame of {arg} bytes at byte {pos} beyond the data")
                continue
            if op.name != "MEMOIZE" and arg > stored + _MEMO_SLACK:
                raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} after {stored} entries")
            stored += 1
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{origin}: refused pickle: {exc}") from None
    except ValueError as exc:               # genops: truncated argument, unknown opcode, no STOP
        raise ValueError(f"{origin}: corrupt pickle ({exc})") from None


def load_safe_pickle(data: bytes, origin: str, max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Unpickle plain data with :class:`RestrictedUnpickler` after :func:`check_pickle`.

    Raises a one-line ``ValueError`` naming ``origin``.
    """
    check_pickle(data, origin, max_bytes)
    try:
        # Python 2 ``str`` objects (the refs were pickled by Python 2) are decoded as UTF-8.
        return RestrictedUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{origin}: refused pickle: {exc}") from None
    except (EOFError, UnicodeDecodeError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, RecursionError) as exc:
        raise ValueError(f"{origin}: corrupt pickle ({type(exc).__name__}: {exc})") from None


# --- reading the official files ---------------------------------------------------------

def read_json_member(archive: Path, member: str) -> Any:
    """Parse one JSON member of an archive, with a one-line error naming both."""
    data = read_member(archive, member)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{archive}:{member}: invalid JSON ({exc})") from None


def _require(obj: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")


def _check_items(doc: dict, list_key: str, keys: tuple[str, ...], where: str) -> None:
    """Every entry of ``doc[list_key]`` is an object with ``keys`` (first offender named)."""
    items = doc[list_key]
    if not isinstance(items, list):
        raise ValueError(f"{where}.{list_key}: expected a list")
    for i, item in enumerate(items):
        _require(item, keys, f"{where}.{list_key}[{i}]")


def _check_types(obj: dict, types: Mapping[str, type], where: str) -> None:
    """Each of ``types``' keys present in ``obj`` holds a value of that type (first offender named)."""
    for key, kind in types.items():
        if key in obj and not isinstance(obj[key], kind):
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")


# Field types of a ref and of its sentences; the values are copied with int() / str(), so
# anything else (e.g. a nested structure whose repr could be huge) is refused first.
_REF_TYPES = {"ref_id": int, "ann_id": int, "image_id": int, "category_id": int, "split": str, "sentences": list}
_SENT_TYPES = {"sent": str, "raw": str, "sent_id": int, "tokens": list}


def check_refs(refs: Any, origin: str) -> list[dict[str, Any]]:
    """Validate the structure of ``refs(unc).p``: a list of refs with sentences, fields typed."""
    if not isinstance(refs, list):
        raise ValueError(f"{origin}: expected a list of refs, got {type(refs).__name__}")
    for i, r in enumerate(refs):
        where = f"{origin}[{i}]"
        _require(r, ("ref_id", "ann_id", "image_id", "sentences"), where)
        _check_types(r, _REF_TYPES, where)
        for j, s in enumerate(r["sentences"]):
            _require(s, ("sent",), f"{where}.sentences[{j}]")
            _check_types(s, _SENT_TYPES, f"{where}.sentences[{j}]")
            if not all(isinstance(t, str) for t in s.get("tokens", [])):
                raise ValueError(f"{where}.sentences[{j}].tokens: expected a list of str")
    return refs


# --- selection (pure) -------------------------------------------------------------------

def select_image_ids(all_ids: Iterable[int], with_tasks: set[int], subset: int | None) -> list[int]:
    """All ids (sorted) when ``subset`` is None, else the first ``subset`` sorted ids in ``with_tasks``."""
    ids = sorted(all_ids)
    if subset is None:
        return ids
    if subset <= 0:
        raise ValueError(f"data.download.subset: must be positive or null, got {subset}")
    return [i for i in ids if i in with_tasks][:subset]


def split_ids(ids: list[int], val_images: int) -> dict[str, list[int]]:
    """The first ``val_images`` ids are split ``val``, the rest ``test`` (never empty)."""
    if val_images < 0 or (ids and val_images >= len(ids)):
        raise ValueError(f"data.download.val_images: need 0 <= val_images < {len(ids)} selected images, "
                         f"got {val_images}")
    out = {"test": ids[val_images:]}
    if val_images:
        out = {"val": ids[:val_images], **out}
    return out


def keep_refs(refs: list[dict[str, Any]], anns_by_id: Mapping[int, dict[str, Any]]) -> tuple[list[dict], int]:
    """Refs whose object exists in COCO 2017 val on the same image; also the number dropped."""
    kept, dropped = [], 0
    for r in refs:
        ann = anns_by_id.get(r["ann_id"])
        if ann is None:
            continue                      # a train2017 image: not in our split at all
        if ann["image_id"] != r["image_id"]:
            dropped += 1                  # ids disagree: never seen, but do not trust it
            continue
        kept.append({
            "ref_id": int(r["ref_id"]), "ann_id": int(r["ann_id"]), "image_id": int(r["image_id"]),
            "category_id": int(r.get("category_id", ann["category_id"])),
            "refcoco_split": str(r.get("split", "")),   # UNC split (train/val/testA/testB)
            "sentences": [{"sent": str(s["sent"]), "raw": str(s.get("raw", s["sent"])),
                           "sent_id": int(s.get("sent_id", -1)),
                           "tokens": [str(t) for t in s.get("tokens", [])]} for s in r["sentences"]],
        })
    return kept, dropped


def _by_image(items: Iterable[dict[str, Any]], ids: set[int]) -> list[dict[str, Any]]:
    return [x for x in items if x["image_id"] in ids]


def split_documents(ids: list[int], instances: dict, captions: dict, vqa_q: dict, vqa_a: dict,
                    refs: list[dict] | None) -> dict[str, Any]:
    """The annotation files of one split (keyed like ``records.ANNOTATION_KINDS``)."""
    keep = set(ids)
    meta = {k: instances[k] for k in ("info", "licenses") if k in instances}
    images = [im for im in instances["images"] if im["id"] in keep]
    questions = _by_image(vqa_q["questions"], keep)
    qids = {q["question_id"] for q in questions}
    docs: dict[str, Any] = {
        "instances": {**meta, "images": images, "annotations": _by_image(instances["annotations"], keep),
                      "categories": instances["categories"]},
        "captions": {**meta, "images": images, "annotations": _by_image(captions["annotations"], keep)},
        "vqa_questions": {**{k: v for k, v in vqa_q.items() if k != "questions"}, "questions": questions},
        "vqa_annotations": {**{k: v for k, v in vqa_a.items() if k != "annotations"},
                            "annotations": [a for a in vqa_a["annotations"] if a["question_id"] in qids]},
    }
    if refs is not None:
        docs["refs"] = _by_image(refs, keep)
    return docs


def counts(split: str, docs: Mapping[str, Any]) -> dict[str, int]:
    """Flat counts of one split's documents (for metrics.json)."""
    out = {f"{split}_images": len(docs["instances"]["images"]),
           f"{split}_objects": len(docs["instances"]["annotations"]),
           f"{split}_captions": len(docs["captions"]["annotations"]),
           f"{split}_questions": len(docs["vqa_questions"]["questions"])}
    if "refs" in docs:
        out[f"{split}_refs"] = len(docs["refs"])
        out[f"{split}_ref_sentences"] = sum(len(r["sentences"]) for r in docs["refs"])
    return out


# --- the whole preparation --------------------------------------------------------------

def _place_images(archive: Path, file_names: Mapping[str, str], root: Path) -> None:
    """Extract the wanted images and move each to ``images/<split>/``; ``file_names``: name -> split."""
    def wanted(name: str) -> bool:
        return posixpath.dirname(name) == IMAGE_FOLDER and posixpath.basename(name) in file_names

    staging = extract(archive, root / ".extract", wanted)
    try:
        missing = [n for n in sorted(file_names) if not (staging / IMAGE_FOLDER / n).is_file()]
        if missing:
            raise ValueError(f"{archive}: {len(missing)} images missing, e.g. {IMAGE_FOLDER}/{missing[0]}")
        for name, split in file_names.items():
            dest = image_dir(root, split) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / IMAGE_FOLDER / name, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_documents(docs: Mapping[str, Any], where: Mapping[str, str]) -> None:
    """The fields every later step reads, in each COCO / VQAv2 document (one-line errors)."""
    for list_key, keys, key in (
            ("images", ("id", "file_name", "width", "height"), "instances"),
            ("annotations", ("id", "image_id", "category_id", "bbox"), "instances"),
            ("categories", ("id", "name"), "instances"),
            ("annotations", ("image_id", "caption"), "captions"),
            ("questions", ("question_id", "image_id", "question"), "vqa_questions"),
            ("annotations", ("question_id", "image_id", "multiple_choice_answer"), "vqa_annotations")):
        _require(docs[key], (list_key,), where[key])
        _check_items(docs[key], list_key, keys, where[key])


def prepare_documents(docs: Mapping[str, Any], raw_refs: Any | None, where: Mapping[str, str],
                      place_images: Callable[[Mapping[str, str], Path], None], out_root: str | Path, *,
                      subset: int | None = None, val_images: int = 0,
                      train_files: Sequence[Path] = ()) -> dict[str, int]:
    """Select images, split, and write the data set under ``out_root`` (atomically).

    ``docs``: the ``instances``, ``captions``, ``vqa_questions`` and ``vqa_annotations``
    documents; ``raw_refs``: RefCOCO's refs list or None; ``where``: the file each came from
    (for errors); ``place_images(file name -> split, root)`` puts the selected images in place.
    ``train_files``: images of split ``train`` (images only, no tasks; see :func:`train_split`).
    """
    _check_documents(docs, where)
    instances, captions, vqa_q, vqa_a = (docs[k] for k in ("instances", "captions", "vqa_questions",
                                                           "vqa_annotations"))
    image_ids = {im["id"] for im in instances["images"]}
    anns_by_id = {a["id"]: a for a in instances["annotations"]}
    refs, dropped = None, 0
    if raw_refs is not None:
        refs, dropped = keep_refs(check_refs(raw_refs, where["refs"]), anns_by_id)

    with_tasks = {q["image_id"] for q in vqa_q["questions"] if q["image_id"] in image_ids}
    with_tasks |= {r["image_id"] for r in refs or []}
    splits = split_ids(select_image_ids(image_ids, with_tasks, subset), val_images)
    if not splits["test"]:
        raise ValueError(f"{where['instances']}: no images selected (subset={subset})")

    split_docs = {s: split_documents(ids, instances, captions, vqa_q, vqa_a, refs) for s, ids in splits.items()}
    file_of = {im["id"]: im["file_name"] for im in instances["images"]}
    result: dict[str, int] = {"refs_dropped_ann_mismatch": dropped} if refs is not None else {}
    evaluated = {file_of[i]: i for ids in splits.values() for i in ids}
    with atomic_path(out_root) as tmp:
        tmp.mkdir()
        place_images({file_of[i]: s for s, ids in splits.items() for i in ids}, tmp)
        for split, kinds in split_docs.items():
            for kind, doc in kinds.items():
                write_json(annotation_path(tmp, kind, split), doc, indent=None)
            result.update(counts(split, kinds))
        if train_files:
            train = train_split(train_files, evaluated, instances)
            dest = image_dir(tmp, "train")
            dest.mkdir(parents=True)
            for path in train_files:
                shutil.copyfile(path, dest / path.name)
            write_json(annotation_path(tmp, "instances", "train"), train, indent=None)
            result["train_images"] = len(train["images"])
    return result


def train_split(files: Sequence[Path], evaluated: Mapping[str, int], instances: Mapping[str, Any]) -> dict[str, Any]:
    """COCO instances document of split ``train``: images (id from the file name, size from the
    JPEG header), no annotations, the evaluated split's categories.

    Refuses a file whose name or id is one of the ``evaluated`` images (file name -> id): the
    codec trains on ``train`` and must never see an image the pipeline scores.
    """
    from PIL import Image, UnidentifiedImageError

    ids = set(evaluated.values())
    images = []
    for path in sorted(files, key=lambda p: p.name):
        if not TRAIN_NAME.fullmatch(path.name):
            raise ValueError(f"{path}: training image name is not <image id>.jpg")
        image_id = int(path.stem)
        if path.name in evaluated or image_id in ids:
            raise ValueError(f"{path}: training image {image_id} is also an evaluated image; "
                             f"train and evaluation images must be disjoint")
        try:
            with Image.open(path) as im:          # reads the header only
                width, height = im.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: not a readable image ({type(exc).__name__})") from None
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
    meta = {k: instances[k] for k in ("info", "licenses") if k in instances}
    return {**meta, "images": images, "annotations": [], "categories": instances["categories"]}


def prepare_from_archives(archives: Mapping[str, str | Path], out_root: str | Path, *,
                          subset: int | None = None, val_images: int = 0,
                          train_files: Sequence[Path] = ()) -> dict[str, int]:
    """Write the data set under ``out_root`` (atomically) from the official archives.

    ``archives`` maps the source keys of :data:`PAPER_SOURCES` to local files;
    ``refcoco`` may be absent (then no refs files are written). ``train_files``: images of
    split ``train`` (:func:`fetch_train_images`). Returns flat counts.
    """
    missing = [k for k in REQUIRED_SOURCES if k not in archives]
    if missing:
        raise ValueError(f"data.download.sources.{missing[0]}: archive missing")
    arc = {k: Path(v) for k, v in archives.items()}
    where = {key: f"{arc.get(_SOURCE_OF[key])}:{MEMBERS[key]}" for key in MEMBERS}
    docs = {key: read_json_member(arc[_SOURCE_OF[key]], MEMBERS[key]) for key in
            ("instances", "captions", "vqa_questions", "vqa_annotations")}
    raw_refs = None
    if "refcoco" in arc:
        data = read_member(arc["refcoco"], MEMBERS["refs"],
                           limits=dataclasses.replace(ArchiveLimits(), max_member_bytes=MAX_PICKLE_BYTES))
        raw_refs = load_safe_pickle(data, where["refs"])
    return prepare_documents(docs, raw_refs, where, lambda names, root: _place_images(arc["coco_val_images"],
                                                                                     names, root),
                             out_root, subset=subset, val_images=val_images, train_files=train_files)


def _read_local_json(path: Path, max_bytes: int = 1 << 30) -> Any:
    """A JSON annotation file (a regular file, size-capped) with one-line errors naming it."""
    from vlmcompress.io import check_regular_file
    check_regular_file(path, "annotation file")
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({type(exc).__name__})") from None


def _copy_images(folder: Path, file_names: Mapping[str, str], root: Path) -> None:
    """Copy the selected images of a local folder to ``images/<split>/`` (all checked first)."""
    from vlmcompress.io import check_regular_file
    for name in sorted(file_names):
        if posixpath.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{folder}: image file name {name!r} is not a plain file name")
        check_regular_file(folder / name, "image")
    for name, split in file_names.items():
        dest = image_dir(root, split) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, dest)


def prepare_from_folder(local: LocalParams, out_root: str | Path, *, subset: int | None = None,
                        val_images: int = 0) -> dict[str, int]:
    """Your own data, already in the official formats: a folder of images, COCO instances and
    captions, VQAv2 questions and annotations, and optionally RefCOCO's refs pickle (no HTTP).
    Malformed files give a one-line error naming the file and the field."""
    files = {"instances": local.instances, "captions": local.captions, "vqa_questions": local.vqa_questions,
             "vqa_annotations": local.vqa_annotations}
    docs = {key: _read_local_json(Path(f)) for key, f in files.items()}
    where = {**files, "refs": local.refs}
    raw_refs = None
    if local.refs:
        from vlmcompress.io import check_regular_file
        data = check_regular_file(local.refs, "refs file").read_bytes()
        raw_refs = load_safe_pickle(data, local.refs)
    images = Path(local.images)
    return prepare_documents(docs, raw_refs, where, lambda names, root: _copy_images(images, names, root),
                             out_root, subset=subset, val_images=val_images)


def _file_name(key: str, url: str) -> str:
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if not name:
        raise ValueError(f"data.download.sources.{key}.url: no file name in {url!r}")
    return name


def download_sources(params: DownloadParams, raw_dir: str | Path, *, progress: bool = True,
                     deadline_s: float | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Path]:
    """Download (or re-use verified copies of) every configured source into ``raw_dir``.

    ``deadline_s`` (per file, all attempts) and ``max_bytes`` (body cap of a source
    without ``size``) are passed to :func:`vlmcompress.data.download.download`;
    ``deadline_s=None`` derives each file's limit from ``timeout_s`` and its size.
    """
    known = REQUIRED_SOURCES + OPTIONAL_SOURCES      # the train images come from fetch_train_images
    unknown = sorted(set(params.sources) - set(KNOWN_SOURCES))
    if unknown:
        raise ValueError(f"data.download.sources.{unknown[0]}: unknown source (known: {', '.join(KNOWN_SOURCES)})")
    missing = [k for k in REQUIRED_SOURCES if k not in params.sources]
    if missing:
        raise ValueError(f"data.download.sources.{missing[0]}: missing (defaults: "
                         f"vlmcompress.data.prepare_coco.PAPER_SOURCES)")
    out = {}
    for key in known:
        src: SourceParams | None = params.sources.get(key)
        if src is None:
            continue
        try:
            out[key] = download(src.url, Path(raw_dir) / _file_name(key, src.url), sha256=src.sha256,
                                size=src.size, timeout_s=params.timeout_s, retries=params.retries,
                                progress=progress, deadline_s=deadline_s, max_bytes=max_bytes)
        except DownloadError as exc:
            if key not in OPTIONAL_SOURCES:
                raise
            # An optional source failing costs its task (no refs: no grounding), not the stage.
            warnings.warn(f"optional source {key} skipped: {exc}", stacklevel=2)
    return out


def prepare_paper_data(params: DownloadParams, raw_dir: str | Path, out_root: str | Path, *,
                       progress: bool = True, deadline_s: float | None = None,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, int]:
    """Download COCO 2017 val / VQAv2 val / RefCOCO into ``raw_dir`` and write the data set.

    ``deadline_s`` and ``max_bytes`` bound each download (see :func:`download_sources`).
    Returns flat counts per split (``test_images``, ``test_questions``, ...).
    """
    archives = download_sources(params, raw_dir, progress=progress, deadline_s=deadline_s, max_bytes=max_bytes)
    train: list[Path] = []
    if params.train_images > 0:
        if TRAIN_SOURCE not in params.sources:
            raise ValueError(f"data.download.sources.{TRAIN_SOURCE}: missing (needed when "
                             f"data.download.train_images > 0)")
        train = fetch_train_images(params.sources[TRAIN_SOURCE], params.train_images, raw_dir,
                                   timeout_s=params.timeout_s, retries=params.retries, deadline_s=deadline_s,
                                   progress=progress)
    return prepare_from_archives(archives, out_root, subset=params.subset, val_images=params.val_images,
                                 train_files=train)


# --- the first N images of train2017.zip ---------------------------------------------------

def first_train_members(zf: zipfile.ZipFile, n: int, archive: str) -> list[zipfile.ZipInfo]:
    """The first ``n`` members ``train2017/<id>.jpg`` of ``zf`` in name order (= image id order)."""
    infos = zf.infolist()
    if len(infos) > TRAIN_MAX_MEMBERS:
        raise ArchiveLimitError(f"{archive}: more than {TRAIN_MAX_MEMBERS} members (max_members)")
    found = {}
    for info in infos:
        folder, base = posixpath.split(info.filename)
        if folder == TRAIN_FOLDER and TRAIN_NAME.fullmatch(base) and not info.is_dir():
            if base in found:
                raise ValueError(f"{archive}: member {info.filename!r} appears twice")
            found[base] = info
    if len(found) < n:
        raise ValueError(f"{archive}: {len(found)} images {TRAIN_FOLDER}/<id>.jpg, fewer than "
                         f"data.download.train_images ({n})")
    return [found[k] for k in sorted(found)[:n]]


def _have(path: Path, info: zipfile.ZipInfo) -> bool:
    """``path`` holds ``info``'s bytes already (size and CRC-32): a resumed run skips it."""
    if not path.is_file() or path.stat().st_size != info.file_size:
        return False
    return zlib.crc32(path.read_bytes()) == info.CRC


def fetch_train_images(src: SourceParams, n: int, raw_dir: str | Path, *, timeout_s: float, retries: int,
                       deadline_s: float | None = None, progress: bool = True) -> list[Path]:
    """The first ``n`` images of COCO's ``train2017.zip`` (by name) as ``raw_dir/train2017/<id>.jpg``.

    By HTTP range requests when the host answers them (``206``): the archive's tail and central
    directory, then only the byte spans of the chosen members (contiguous ones in one request),
    so a few thousand images cost their own size, not the 18 GB archive. A host that ignores
    ranges gets a full, resumable :func:`download` of the archive (capped at
    :data:`TRAIN_MAX_BYTES`). Members are checked by the directory's CRC-32 and written atomically;
    those already in ``raw_dir`` with the right size and CRC are not fetched again. ``src.size``
    is checked against the length the server announces; ``src.sha256`` (of the whole archive)
    only in the fallback, since a range fetch never has the whole file. ``deadline_s`` bounds
    each request (default: from ``timeout_s`` and its length).
    """
    out = Path(raw_dir) / TRAIN_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    try:
        remote = RemoteZipFile(src.url, timeout_s=timeout_s, retries=retries, deadline_s=deadline_s,
                               max_read=TRAIN_MAX_DIRECTORY)
        if src.size is not None and remote.size != src.size:
            raise ChecksumError(f"{src.url}: size mismatch: server announces {remote.size} bytes, "
                                f"expected {src.size}")
        return _copy_first(remote, src.url, remote, n, out, progress)
    except RangesUnsupported as exc:      # also mid-way: members already written are kept
        if progress:
            print(f"{TRAIN_FOLDER}: {exc}; downloading the whole archive", file=sys.stderr, flush=True)
        # The announced length (capped) sizes the deadline and lets a later run resume the .part.
        announced = exc.length if exc.length is not None and exc.length <= TRAIN_MAX_BYTES else None
    archive = download(src.url, Path(raw_dir) / _file_name(TRAIN_SOURCE, src.url), sha256=src.sha256,
                       size=src.size if src.size is not None else announced, timeout_s=timeout_s,
                       retries=retries, progress=progress,
                       deadline_s=deadline_s, max_bytes=TRAIN_MAX_BYTES)
    return _copy_first(archive, str(archive), None, n, out, progress)


def _copy_first(file: Path | RemoteZipFile, archive: str, remote: RemoteZipFile | None, n: int, out: Path,
                progress: bool) -> list[Path]:
    """Copy the first ``n`` train members of the zip ``file`` into ``out``; ``remote``: prefetch spans."""
    try:
        with zipfile.ZipFile(file) as zf:
            chosen = first_train_members(zf, n, archive)
            todo = [i for i in chosen if not _have(out / posixpath.basename(i.filename), i)]
            groups = member_spans(zf, todo) if remote is not None else [(0, 0, todo)]
            for k, (start, end, infos) in enumerate(groups):
                if remote is not None:
                    remote.load(start, end)
                for info in infos:
                    copy_member(zf, info, out / posixpath.basename(info.filename), archive)
                if progress and remote is not None:
                    print(f"{TRAIN_FOLDER}: range {k + 1}/{len(groups)}: {len(infos)} images, "
                          f"{(end - start) / 1e6:.1f} MB", file=sys.stderr, flush=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ValueError(f"{archive}: corrupt zip ({' '.join(str(exc).split())[:120]})") from None
    return [out / posixpath.basename(i.filename) for i in chosen]
