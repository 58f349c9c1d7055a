"""Run lmms-eval's evaluator on the tasks of this folder only, several runs in one process.

    python tests/lmms_tasks/evaluate.py RUNS.json OUT.json

``RUNS.json``: a list of ``{"model": ..., "model_args": "k=v,...", "tasks": [...],
"batch_size": n, "force_simple": false, "limit": null}``. ``OUT.json``: per run, lmms-eval's ``results`` and
``throughput`` and per task the logged samples (one per document and filter) as
``{"doc_id", "target", "resps", "filtered_resps", "token_counts", <metric>: value}``.

It calls ``lmms_eval.evaluator.simple_evaluate`` exactly as the ``lmms-eval`` command does
(model name resolved through lmms-eval's registry, ``--model_args`` string parsed by it), with a
task index of this folder alone: the command also indexes lmms-eval's ~2000 built-in task
files first, which takes longer than evaluating the tiny models. The runs share one process
because lmms-eval patches process-wide state (file locks, random seeds) when it evaluates.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEEP = ("doc_id", "target", "resps", "filtered_resps", "token_counts")


def sample_record(sample: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    """The JSON-able part of one logged sample."""
    out = {k: sample[k] for k in KEEP if k in sample}
    out.update({m: sample[m] for m in metrics if m in sample})
    return json.loads(json.dumps(out, default=str))


def evaluate(run: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(HERE), include_defaults=False, model_name=run["model"])
    res = simple_evaluate(model=run["model"], model_args=run["model_args"], tasks=tasks,
                          batch_size=run.get("batch_size", 1), device=run.get("device", "cpu"),
                          force_simple=run.get("force_simple", False), limit=run.get("limit"),
                          task_manager=manager, log_samples=True)
    samples = {}
    for task, rows in res["samples"].items():
        metrics = [k.split(",")[0] for k in res["results"][task] if "," in k and "stderr" not in k]
        samples[task] = [sample_record(s, metrics) for s in rows]
    return json.loads(json.dumps({"results": res["results"], "throughput": res.get("throughput", {}),
                                  "samples": samples}, default=str))


def main(argv: list[str]) -> None:
    runs = json.loads(Path(argv[0]).read_text())
    out = [evaluate(run, run["tasks"]) for run in runs]
    Path(argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
