"""Train the LVLM recipe of a params file into a work dir and score it, outside the pipeline.

    python scripts/lvlm_trial.py params.yaml /tmp/trial     # resumable; prints curves and test scores
    python scripts/lvlm_trial.py params.yaml /tmp/trial --reuse outputs/lvlm/checkpoints   # start from its finished phases
    python scripts/lvlm_trial.py params.yaml /tmp/trial --score-only   # score its saved model again

For comparing recipes without touching ``outputs/lvlm``: the same ``Trainer`` and quick val
check as the ``lvlm`` stage (200 val questions every ``eval_every`` steps), then VQA (with the
most-common-answer baseline) and grounding on the val split, to choose recipes on, and VQA on
2,000 test questions, retrieval and grounding (1,000 referring expressions) on the test split,
printed and written to ``<work>/scores.json``. Run again on a
finished trial, it loads the trained phases and only scores.
Results: ``docs/experiments/2026-12-03-embedded-lvlm-recipe.md`` and later entries on the LM phase.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmcompress.config import load_params  # noqa: E402
from vlmcompress.api import load_all  # noqa: E402
from vlmcompress.eval.tasks import majority_baseline, run_grounding, run_retrieval, run_vqa, vqa_items  # noqa: E402
from vlmcompress.io import write_json  # noqa: E402
from vlmcompress.lvlm.load import load_lvlm  # noqa: E402
from vlmcompress.lvlm.phases import PHASES, phase_digests  # noqa: E402
from vlmcompress.lvlm.train import Trainer  # noqa: E402


def reuse_phases(source: Path, work: Path, digests: dict[str, str]) -> list[str]:
    """Seed an empty ``work`` dir with the finished phases of another run's checkpoints whose
    digest equals this recipe's (in run order, stopping at the first that differs) -> their names.
    A ``work`` dir with a run of its own is left alone."""
    if (work / "progress.json").exists():
        return []
    prog = json.loads((source / "progress.json").read_text())
    taken: list[str] = []
    for phase in PHASES:
        if phase not in prog.get("done", []) or prog.get("digests", {}).get(phase) != digests[phase]:
            break
        taken.append(phase)
    work.mkdir(parents=True, exist_ok=True)
    for phase in taken:
        shutil.copy2(source / f"after_{phase}.pt", work / f"after_{phase}.pt")
    seeded = {"digests": {p: digests[p] for p in taken}, "done": taken, "phase": None, "phase_digest": None,
              "seconds": {p: prog.get("seconds", {}).get(p, 0.0) for p in taken}, "step": 0,
              "setups": {p: prog.get("setups", {}).get(p, []) for p in taken}}
    (work / "progress.json").write_text(json.dumps(seeded, indent=1))
    return taken


def split_scores(lvlm, split, train, n_questions: int, n_refs: int, name: str, retrieval: bool = True) -> dict:
    """VQA on ``n_questions`` questions of ``split`` (with the most-common-answer baseline of
    ``train``), retrieval and grounding on ``n_refs`` referring expressions, printed as ``name``."""
    items = vqa_items(split, n_questions, seed=0)
    r = run_vqa(lvlm, items, batch_size=50)
    scores: dict = {"vqa_acc": round(r.acc, 2), "vqa_acc_by_type": {k: round(v, 2) for k, v in r.by_type.items()},
                    "vqa_majority": majority_baseline(train, items)}
    print(f"{name} vqa", scores["vqa_acc"], scores["vqa_acc_by_type"])
    print(f"{name} majority", scores["vqa_majority"])
    if retrieval:
        scores["retrieval"] = run_retrieval(lvlm, split)
        print(f"{name} retrieval", scores["retrieval"])
    g50, miou = run_grounding(lvlm, split, batch_size=50, max_refs=n_refs)
    scores.update(grounding_acc50=g50, grounding_miou=miou)
    print(f"{name} grounding acc@0.5", g50, "mIoU", miou, flush=True)
    return scores


def score(lvlm, splits: dict, work: Path, extra: dict) -> dict:
    """Val scores (1,000 questions, 500 referring expressions: what recipes are chosen on), then
    the test split's (2,000 and 1,000), printed and written to ``work/scores.json`` (test at
    the top level, val under ``"val"``)."""
    val = split_scores(lvlm, splits["val"], splits["train"], 1000, 500, "val", retrieval=False)
    scores = split_scores(lvlm, splits["test"], splits["train"], 2000, 1000, "test")
    scores.update(val=val, **extra)
    write_json(work / "scores.json", scores)
    return scores


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", help="params file of the recipe")
    ap.add_argument("work", help="checkpoint dir of the trial (resumable)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="checkpoint dir of another run: its finished phases with this recipe's digests are copied first")
    ap.add_argument("--score-only", action="store_true",
                    help="only score the trial's saved model (<work>/model), whatever its params file holds now")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.score_only:
        model = work / "model"
        if not (model / "llava").is_dir():
            print(f"lvlm_trial: {model} holds no trained model", file=sys.stderr)
            return 2
        score(load_lvlm(str(model / "llava"), str(model / "clip")), load_all(), work, {})
        return 0
    params = load_params(args.params)
    if args.reuse is not None:
        taken = reuse_phases(args.reuse, work, phase_digests(params.lvlm, params.data.scenes, params.seed))
        print("reused phases:", ", ".join(taken) or "none", flush=True)
    splits = load_all()
    val_items = vqa_items(splits["val"], 200, seed=1)

    def quick(lvlm):
        r = run_vqa(lvlm, val_items, batch_size=50)
        return {"val_acc": round(r.acc, 1), **{f"val_{k}": round(v, 1) for k, v in r.by_type.items()}}

    trainer = Trainer(params.lvlm, params.data.scenes, work, seed=params.seed)
    t0 = time.perf_counter()
    seconds = trainer.run(work / "model", eval_fn=quick)
    print("train", seconds, round(time.perf_counter() - t0, 1), flush=True)
    trainer.write_curves(work / "curves.csv")
    score(trainer.lvlm(), splits, work, {"train_seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
