"""Train the LVLM recipe of a params file into a work dir and score it, outside the pipeline.

    python scripts/lvlm_trial.py params.yaml /tmp/trial     # resumable; prints curves and test scores

For comparing recipes without touching ``outputs/lvlm``: the same ``Trainer`` and quick val
check as the ``lvlm`` stage (200 val questions every ``eval_every`` steps), then VQA on 2,000
test questions (with the most-common-answer baseline) and retrieval on the test split.
Results: ``docs/experiments/2026-12-03-embedded-lvlm-recipe.md``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmcompress.config import load_params  # noqa: E402
from vlmcompress.api import load_all  # noqa: E402
from vlmcompress.eval.tasks import majority_baseline, run_retrieval, run_vqa, vqa_items  # noqa: E402
from vlmcompress.lvlm.train import Trainer  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    params, work = load_params(argv[0]), argv[1]
    splits = load_all()
    val_items = vqa_items(splits["val"], 200, seed=1)

    def quick(lvlm):
        r = run_vqa(lvlm, val_items, batch_size=50)
        return {"val_acc": round(r.acc, 1), **{f"val_{k}": round(v, 1) for k, v in r.by_type.items()}}

    trainer = Trainer(params.lvlm, params.data.scenes, work, seed=params.seed)
    t0 = time.perf_counter()
    seconds = trainer.run(Path(work) / "model", eval_fn=quick)
    print("train", seconds, round(time.perf_counter() - t0, 1), flush=True)
    trainer.write_curves(Path(work) / "curves.csv")
    lvlm = trainer.lvlm()
    items = vqa_items(splits["test"], 2000, seed=0)
    r = run_vqa(lvlm, items, batch_size=50)
    print("test vqa", round(r.acc, 2), {k: round(v, 2) for k, v in r.by_type.items()})
    print("majority", majority_baseline(splits["train"], items))
    print("retrieval", run_retrieval(lvlm, splits["test"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
