"""Reading the pipeline's data set: where the data stage writes it and its splits as records."""
from __future__ import annotations

from pathlib import Path

from vlmcompress.data.records import ImageRecord, load_split
from vlmcompress.paths import outputs_dir


def dataset_root() -> Path:
    """Where the data stage writes the data set (same path in both profiles)."""
    return outputs_dir("data", "dataset")


def split_names(root: Path) -> list[str]:
    """Splits present under ``root`` (those with an instances file), in canonical order."""
    order = {"train": 0, "val": 1, "test": 2}
    found = [p.name[len("instances_"):-len(".json")] for p in (root / "annotations").glob("instances_*.json")]
    return sorted(found, key=lambda s: (order.get(s, 9), s))


def load_all(root: Path | None = None) -> dict[str, list[ImageRecord]]:
    """Every split of the data set under ``root`` (default: :func:`dataset_root`) as records.
    No data set there is an error naming the folder (a later stage would otherwise load a model
    before finding it has nothing to score)."""
    root = Path(root) if root is not None else dataset_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no data set; run the data stage first (dvc repro data)")
    return {s: load_split(root, s) for s in split_names(root)}
