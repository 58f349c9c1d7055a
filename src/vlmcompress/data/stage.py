"""The data stage (``01_data``): make the evaluation data set, whichever world we are in."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from vlmcompress.config import Params
from vlmcompress.data.dataset import dataset_root
from vlmcompress.data.records import ImageRecord
from vlmcompress.io import write_json
from vlmcompress.paths import outputs_dir


def run_data_stage(params: Params, root: Path | None = None,
                   metrics_path: Path | None = None) -> dict[str, float]:
    """Generate (embedded) or download + prepare (paper) the data set.

    Writes the data set under ``root`` and the flat counts to ``metrics_path``
    (defaults: ``outputs/data/dataset`` and ``outputs/data/metrics.json``); returns them.
    """
    root = Path(root) if root is not None else dataset_root()
    d = params.data
    if d.source == "scenes":
        from vlmcompress.data.generate import generate_scenes
        metrics = generate_scenes(d.scenes, root)
    elif d.source == "local":
        from vlmcompress.data.prepare_coco import prepare_from_folder
        metrics = prepare_from_folder(d.local, root, subset=d.download.subset, val_images=d.download.val_images)
    else:
        from vlmcompress.data.prepare_coco import prepare_paper_data
        metrics = prepare_paper_data(d.download, outputs_dir("data", "raw"), root, deadline_s=d.download.deadline_s)
    write_json(metrics_path or outputs_dir("data", "metrics.json"), metrics)
    return metrics


def counts_table(records_by_split: dict[str, list[ImageRecord]]) -> pd.DataFrame:
    """Images, objects, captions, refs and questions per type, one row per split."""
    rows = []
    for split, recs in records_by_split.items():
        qt = Counter(q.question_type for r in recs for q in r.questions)
        rows.append({"split": split, "images": len(recs),
                     "objects": sum(len(r.objects) for r in recs),
                     "captions": sum(len(r.captions) for r in recs),
                     "refs": sum(len(r.refs) for r in recs),
                     "questions": sum(qt.values()), **{f"q:{k}": v for k, v in sorted(qt.items())}})
    return pd.DataFrame(rows).set_index("split").fillna(0).astype(int)
