"""The LVLM stage (``02_lvlm``): train (embedded) or resolve (paper) the model, then score it."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import pandas as pd

from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.eval.tasks import (file_images, majority_baseline, run_captions, run_grounding, run_retrieval,
                                    run_vqa, vqa_items)
from vlmcompress.io import atomic_path, write_json
from vlmcompress.lvlm.adapter import LVLM
from vlmcompress.lvlm.config import EvalParams
from vlmcompress.lvlm.load import lvlm_from_params, lvlm_model_dir
from vlmcompress.lvlm.phases import recipe_digest
from vlmcompress.lvlm.probe import text_localisation
from vlmcompress.paths import outputs_dir


def stage_dir() -> Path:
    return outputs_dir("lvlm")


def train_embedded(params: Params, val: list[ImageRecord], log=print) -> dict[str, Any]:
    """Train the embedded model into ``outputs/lvlm/model`` (resuming from ``checkpoints/``):
    phase seconds, ``train_capability`` / ``train_threads`` / ``train_cpu`` that trained it, and
    ``train_recipe`` (:func:`~vlmcompress.lvlm.phases.recipe_digest`)."""
    from vlmcompress.lvlm.train import Trainer

    out = stage_dir()
    # Kept across recipes: the trainer reuses each finished phase whose params digest matches.
    work = out / "checkpoints"
    work.mkdir(parents=True, exist_ok=True)
    items = vqa_items(val, 200, seed=1)

    def quick(lvlm: LVLM) -> dict[str, float]:
        r = run_vqa(lvlm, items, batch_size=params.lvlm.eval.batch_size)
        return {"val_acc": round(r.acc, 2)}

    trainer = Trainer(params.lvlm, params.data.scenes, work, seed=params.seed, log=log)
    t0 = time.perf_counter()
    seconds = trainer.run(lvlm_model_dir(), eval_fn=quick)
    trainer.write_curves(out / "curves.csv")
    seconds["train_seconds"] = round(sum(seconds.values()), 1)
    seconds["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return {**seconds, **{f"train_{k}": v for k, v in trainer.setups().items()},
            "train_recipe": recipe_digest(params.lvlm, params.data.scenes)}


def evaluate(lvlm: LVLM, train: list[ImageRecord], test: list[ImageRecord], ev: EvalParams,
             progress: bool = True) -> tuple[dict[str, Any], pd.DataFrame]:
    """All floors' figures on the test split, and a table of example answers."""
    items = vqa_items(test, ev.max_questions, seed=0)
    vqa = run_vqa(lvlm, items, batch_size=ev.batch_size, progress=progress)
    maj, maj_by_type = majority_baseline(train, items)
    gallery = test[: ev.gallery] if ev.gallery > 0 else test
    ret = run_retrieval(lvlm, gallery)
    cap_recs = test[: ev.max_captions] if ev.max_captions > 0 else test
    cider, caps = run_captions(lvlm, cap_recs, batch_size=ev.batch_size)
    g50, miou = run_grounding(lvlm, test, batch_size=ev.batch_size, max_refs=ev.max_refs)
    metrics: dict[str, Any] = {
        "vqa_acc": round(vqa.acc, 2), "vqa_majority_acc": round(maj, 2), "vqa_questions": vqa.n,
        "vqa_acc_by_type": {k: round(v, 2) for k, v in vqa.by_type.items()},
        "vqa_majority_acc_by_type": {k: round(v, 2) for k, v in maj_by_type.items()},
        **{k: round(v, 2) for k, v in ret.items()}, "retrieval_gallery": len(gallery),
        "caption_cider": round(cider, 2),
        "grounding_acc50": None if g50 is None else round(g50, 2),        # None: no referring expressions
        "grounding_miou": None if miou is None else round(miou, 4),
    }
    if ev.text_probe_images > 0:
        # What text-guided recovery ranks by: are the patches most similar to a question the
        # ones it asks about? k = 5% of the grid, the recovered half of a 10% budget.
        k = max(1, round(0.05 * lvlm.grid[0] * lvlm.grid[1]))
        loc = text_localisation(lvlm, test[: ev.text_probe_images], k, file_images)
        if loc is not None:
            metrics.update(text_loc_k=k, text_loc_precision=loc["all"]["precision"], text_loc_base=loc["all"]["base"],
                           text_loc_hit1=loc["all"]["hit1"],
                           text_loc_by_type={t: v for t, v in loc.items() if t != "all"})
    qtext = {q.question_id: (r.image_id, q.question, q.question_type) for r, q in items}
    rows = [{"image_id": qtext[qid][0], "type": qtext[qid][2], "question": qtext[qid][1], "answer": gt,
             "prediction": pred} for qid, pred, gt in vqa.predictions[:200]]
    refs = {r.image_id: r.captions[0] for r in cap_recs}
    rows += [{"image_id": i, "type": "caption", "question": "", "answer": refs[i], "prediction": c}
             for i, c in list(caps.items())[:20]]
    return metrics, pd.DataFrame(rows)


def record_pretrained(params: Params) -> None:
    """The stage's outputs when nothing is trained, so both profiles have the same DVC outs:
    ``model/source.json`` names the checkpoints every later stage loads, ``checkpoints/`` is
    empty and ``curves.csv`` has a header and no rows."""
    out = stage_dir()
    with atomic_path(lvlm_model_dir()) as tmp:
        tmp.mkdir()
        write_json(tmp / "source.json", {"source": "pretrained", "llava": params.lvlm.llava,
                                          "clip": params.lvlm.clip, "dtype": params.lvlm.dtype})
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "curves.csv") as tmp:
        tmp.write_text("phase,step\n")


def run_lvlm_stage(params: Params, splits: dict[str, list[ImageRecord]], log=print) -> dict[str, Any]:
    """Train or resolve, evaluate, and write ``outputs/lvlm/{metrics.json, examples.csv}``."""
    out = stage_dir()
    timing: dict[str, Any] = {}
    if params.lvlm.source == "train":
        timing = train_embedded(params, splits["val"], log=log)
    else:
        record_pretrained(params)
    lvlm = lvlm_from_params(params)
    train = splits.get("train", [])
    metrics, examples = evaluate(lvlm, train, splits["test"], params.lvlm.eval)
    metrics.update(timing)
    metrics.setdefault("train_seconds", 0.0)
    with atomic_path(out / "examples.csv") as tmp:
        # Text quoted: a generated answer may hold a bare "\r", which minimal quoting leaves as a line break.
        examples.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
    write_json(out / "metrics.json", metrics)
    return metrics
