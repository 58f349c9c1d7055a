"""Any folder of images as an extra rate–distortion evaluation set.

Files are visited in sorted name order; the folder is read non-recursively
(sub-folders and hidden files such as ``.DS_Store`` are ignored). Images are read by
:func:`vlmcompress.images.read_image_rgb` (the package's one reader: formats, bit depths,
transparency and orientation rules are stated there). Any other file, an unreadable or
corrupt image and an empty folder raise a one-line ``ValueError`` naming the file or
folder.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlmcompress.images import EXTENSIONS, read_image_rgb


def list_image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` in sorted name order (validated, not yet decoded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() not in EXTENSIONS:
            raise ValueError(f"{p}: not an image file (allowed extensions: {', '.join(EXTENSIONS)})")
        files.append(p)
    if not files:
        raise ValueError(f"{folder}: no images in folder")
    return files



def iter_image_folder(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(file name, (H, W, 3) uint8)`` in sorted order; the listing is checked first."""
    for path in list_image_files(folder):
        yield path.name, read_image_rgb(path)


def load_image_folder(folder: str | Path) -> list[tuple[str, np.ndarray]]:
    """All images of ``folder`` as ``(file name, (H, W, 3) uint8)``, sorted by name."""
    return list(iter_image_folder(folder))
