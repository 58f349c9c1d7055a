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
    """Paper profile: where COCO 2017 val, VQAv2 val and RefCOCO come from."""

    sources: dict[str, SourceParams]
    subset: int | None            # keep at most this many images (null: all)
    timeout_s: float
    retries: int
    val_images: int = 0           # the first this many selected images form split `val`, the rest `test`


@dataclass(frozen=True)
class DataParams:
    source: Literal["scenes", "coco"]   # scenes: generate; coco: download (paper profile)
    scenes: ScenesParams
    download: DownloadParams
    image_folders: list[str] = field(default_factory=list)  # extra RD-only evaluation sets
