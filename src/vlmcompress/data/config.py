"""Schema of the ``data`` section of params.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ScenesParams:
    """Procedural multi-object scenes (the embedded profile's data set)."""

    seed: int
    image_size: int            # square images, pixels
    n_train: int
    n_val: int
    n_test: int
    min_objects: int
    max_objects: int
    small_size: tuple[int, int]   # [min, max] object extent in pixels, "small" objects
    large_size: tuple[int, int]   # [min, max] object extent in pixels, "large" objects
    p_small: float                # probability that an object is small
    questions_per_image: int
    captions_per_image: int
    texture: Literal["noise", "flat"]  # background: coloured multi-scale noise, or flat grey


@dataclass(frozen=True)
class SourceParams:
    """One file to download: URL, expected SHA-256 (or null) and size in bytes (or null)."""

    url: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DownloadParams:
    """Paper profile: where COCO 2017 val (and train images), VQAv2 val and RefCOCO come from."""

    sources: dict[str, SourceParams]
    subset: int | None            # keep at most this many images (null: all)
    timeout_s: float
    retries: int
    deadline_s: float | None      # whole-file time limit over all attempts (null: 10 x timeout_s + size at 100 kB/s)
    val_images: int = 0           # the first this many selected images form split `val`, the rest `test`
    train_images: int = 0         # source coco: the first N images of train2017.zip (by name) as split `train`


@dataclass(frozen=True)
class LocalParams:
    """``source: local``: your own data, already in the official formats (no download)."""

    images: str                   # folder holding every image the instances file names
    instances: str                # COCO instances JSON (images, annotations, categories)
    captions: str                 # COCO captions JSON
    vqa_questions: str            # VQAv2 questions JSON
    vqa_annotations: str          # VQAv2 annotations JSON
    refs: str                     # RefCOCO refs pickle, or "" (no grounding)


@dataclass(frozen=True)
class DataParams:
    source: Literal["scenes", "coco", "local"]   # scenes: generate; coco: download; local: data.local
    scenes: ScenesParams
    download: DownloadParams
    local: LocalParams
    image_folders: list[str] = field(default_factory=list)  # extra RD-only evaluation sets


# Captions and questions are numbered ``image_id * 100 + k`` (data/generate.py): k < 100.
_PER_IMAGE_IDS = 100


def check_data_params(p: DataParams, path: str = "data") -> None:
    """Value checks of the ``data`` section (messages name the key path)."""
    from vlmcompress.config import check_unique, require  # late: vlmcompress.config imports this module

    check_scenes_params(p.scenes, f"{path}.scenes")
    check_download_params(p.download, f"{path}.download", needed=p.source == "coco")
    if p.source == "local":
        for name in ("images", "instances", "captions", "vqa_questions", "vqa_annotations"):
            require(getattr(p.local, name).strip() != "", f"{path}.local.{name}", "must name a path with source: local")
    for i, folder in enumerate(p.image_folders):
        require(folder.strip() != "", f"{path}.image_folders[{i}]", "must be a folder path, got ''")
    check_unique(f"{path}.image_folders", p.image_folders)


def check_scenes_params(p: ScenesParams, path: str = "data.scenes") -> None:
    """Counts, sizes and probabilities of the scene generator."""
    from vlmcompress.config import SEED_MAX, check_min, check_range, require, show
    from vlmcompress.data.scenes import COLORS, ID_BASE, SHAPES  # late: numpy and PIL

    check_range(f"{path}.seed", p.seed, 0, SEED_MAX)
    check_min(f"{path}.image_size", p.image_size, 1)
    # Image ids are ID_BASE[split] + index + 1: a split larger than the gap would reuse the next one's.
    bases = sorted(ID_BASE.values())
    most = min(b - a for a, b in zip(bases, bases[1:])) - 1
    for name, low in (("n_train", 1), ("n_val", 0), ("n_test", 1)):
        check_range(f"{path}.{name}", getattr(p, name), low, most)
    check_min(f"{path}.min_objects", p.min_objects, 0)
    pairs = len(COLORS) * len(SHAPES)   # objects of a scene have distinct (colour, shape) pairs
    check_range(f"{path}.max_objects", p.max_objects, 0, pairs)
    require(p.min_objects <= p.max_objects, f"{path}.min_objects",
            f"must be <= {path}.max_objects ({show(p.max_objects)}), got {show(p.min_objects)}")
    for name in ("small_size", "large_size"):
        lo, hi = getattr(p, name)
        check_min(f"{path}.{name}[0]", lo, 1)
        require(lo <= hi, f"{path}.{name}", f"needs [min, max] with min <= max, got {show(list((lo, hi)))}")
        # An object of extent s is placed with its centre in [s/2 + 1, image_size - s/2 - 1].
        require(hi <= p.image_size - 2, f"{path}.{name}[1]",
                f"must be <= {path}.image_size - 2 ({show(p.image_size - 2)}) to fit the image, got {show(hi)}")
    check_range(f"{path}.p_small", p.p_small, 0.0, 1.0)
    check_range(f"{path}.questions_per_image", p.questions_per_image, 1, _PER_IMAGE_IDS - 1)
    check_range(f"{path}.captions_per_image", p.captions_per_image, 1, _PER_IMAGE_IDS - 1)


def check_download_params(p: DownloadParams, path: str = "data.download", needed: bool = True) -> None:
    """Subset, retries and sources of the paper data; ``needed``: the required sources must be listed."""
    import re

    from vlmcompress.config import check_choice, check_min, key_path, require, show
    from vlmcompress.data.prepare_coco import KNOWN_SOURCES, REQUIRED_SOURCES, TRAIN_SOURCE  # late: download code

    if p.subset is not None:
        check_min(f"{path}.subset", p.subset, 1, " (null: all)")
    check_min(f"{path}.val_images", p.val_images, 0)
    check_min(f"{path}.train_images", p.train_images, 0, " (0: none)")
    if p.subset is not None:   # the test split must keep at least one image
        require(p.val_images < p.subset, f"{path}.val_images",
                f"must be < {path}.subset ({show(p.subset)}), got {show(p.val_images)}")
    require(p.timeout_s > 0, f"{path}.timeout_s", f"must be > 0, got {show(p.timeout_s)}")
    check_min(f"{path}.retries", p.retries, 0)
    if p.deadline_s is not None:
        require(p.deadline_s > 0, f"{path}.deadline_s", f"must be > 0 (null: derived), got {show(p.deadline_s)}")
    for key, src in p.sources.items():
        where = key_path(f"{path}.sources", key)
        check_choice(where, key, KNOWN_SOURCES, "source")
        require(_url_file_name(src.url) != "", f"{where}.url",
                f"needs an http(s) URL whose path ends in a file name, got {show(src.url)}")
        if src.sha256 is not None:
            require(re.fullmatch(r"[0-9a-fA-F]{64}", src.sha256) is not None, f"{where}.sha256",
                    f"must be 64 hex digits or null, got {show(src.sha256)}")
        if src.size is not None:
            check_min(f"{where}.size", src.size, 1, " (null: unchecked)")
    if needed:
        missing = [k for k in REQUIRED_SOURCES if k not in p.sources]
        require(not missing, f"{path}.sources", f"misses {', '.join(missing)} (needed when data.source is coco)")
        require(p.train_images == 0 or TRAIN_SOURCE in p.sources, f"{path}.sources",
                f"misses {TRAIN_SOURCE} (needed when {path}.train_images > 0)")


def _url_file_name(url: str) -> str:
    """The file name a download of ``url`` is saved under ("" for a malformed or non-http(s) URL,
    which the downloader refuses)."""
    import posixpath
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:   # e.g. an unclosed IPv6 bracket
        return ""
    return posixpath.basename(urllib.parse.unquote(parts.path)) if parts.scheme in ("http", "https") else ""
