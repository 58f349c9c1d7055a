"""Comparing the runs of a sweep: accuracy tables, paired differences, equal prefill cost.

Every function reads :class:`~vlmcompress.tokens.sweep.RunOutput` s (or the tables built from
them) and returns numbers or tables. VQA accuracy by question type (:func:`vqa_table`) and, on
scenes, by the size of the objects a question names (:func:`vqa_by_size`); paired per-question
differences between methods (:func:`paired_difference`, :func:`paired_table`); each run's cost
and accuracy (:func:`cost_table`); each peer run paired with the run of ours at the nearest
prefill GFLOPs (:func:`equal_cost_table`, with :func:`equal_cost_runs` adding runs of ours
where none is near) and the headline numbers at one budget (:func:`headline_at`); the choice of
our method on validation questions (:func:`choose_ours`, :func:`candidates_table`); caption and
grounding scores per run (:func:`task_table`) and grounding against the tokens kept
(:func:`grounding_table`), scored by :mod:`vlmcompress.eval.tasks`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vlmcompress.data.records import ImageRecord, Question
from vlmcompress.data.scenes import named_objects
from vlmcompress.eval.tasks import caption_cider, grounding_accuracy, grounding_ious, vqa_accuracy
from vlmcompress.tokens.patch import TEXT_GUIDED
from vlmcompress.tokens.sweep import Batch, Run, RunOutput, Sweeper


def scores_by(o: RunOutput, group: Callable[[ImageRecord, Question], str | None]) -> dict[str, list[float]]:
    """VQA accuracy (0-1) of each answer of a run, grouped by ``group(record, question)``;
    questions it maps to ``None`` are left out."""
    scores: dict[str, list[float]] = defaultdict(list)
    for (r, q), a in zip(o.samples, o.answers):
        g = group(r, q)
        if g is not None:
            scores[g].append(vqa_accuracy(a, q.answers))
    return scores


def vqa_table(outputs: dict[Run, RunOutput]) -> pd.DataFrame:
    """Long table: method, budget, mean_tokens, question_type ('all' = overall), acc, n."""
    rows = []
    for run, o in outputs.items():
        scores = scores_by(o, lambda r, q: q.question_type)
        mean_tokens = float(np.mean(o.tokens))
        everything = [s for v in scores.values() for s in v]
        for qt, v in [("all", everything)] + sorted(scores.items()):
            rows.append({"method": run.method, "budget": run.key, "mean_tokens": round(mean_tokens, 2),
                         "question_type": qt, "acc": round(100.0 * float(np.mean(v)), 2), "n": len(v)})
    return pd.DataFrame(rows)


def paired_difference(a: RunOutput, b: RunOutput) -> dict[str, float | int]:
    """Accuracy of ``a`` minus ``b`` on the same questions, in points, with the standard error
    of that mean difference (paired: the spread of the per-question differences / sqrt(n)).
    A difference within about two standard errors is noise."""
    if [q for _, q in a.samples] != [q for _, q in b.samples]:
        raise ValueError("paired_difference: the two runs answered different questions")
    d = 100.0 * np.array([vqa_accuracy(x, q.answers) - vqa_accuracy(y, q.answers)
                          for (_, q), x, y in zip(a.samples, a.answers, b.answers)])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": round(float(d.mean()), 2), "se": round(se, 2), "n": len(d)}


def paired_table(outputs: dict[Run, RunOutput], key: str) -> pd.DataFrame:
    """:func:`paired_difference` of each text-guided method against every other compressing
    method, at budget ``key``: one row per pair (method, other, budget, diff, se, n)."""
    at = {r.method: o for r, o in outputs.items() if r.key == key}
    rows = [{"method": m, "other": other, "budget": key, **paired_difference(at[m], at[other])}
            for m in sorted(TEXT_GUIDED & at.keys()) for other in at if other != m]
    return pd.DataFrame(rows, columns=["method", "other", "budget", "diff", "se", "n"])


# --- equal cost ------------------------------------------------------------------------

def count_for_cost(cost_at: Callable[[int], float], target: float, n_max: int) -> int:
    """The token count ``k`` in ``[1, n_max]`` whose cost ``cost_at(k)`` (increasing in k) is
    nearest ``target`` (ties: the smaller k)."""
    if n_max < 1:
        raise ValueError(f"count_for_cost: n_max must be >= 1, got {n_max}")
    lo, hi = 1, n_max
    while lo < hi:                      # smallest k with cost_at(k) >= target
        mid = (lo + hi) // 2
        if cost_at(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    near = [k for k in (lo - 1, lo) if 1 <= k <= n_max]
    return min(near, key=lambda k: (abs(cost_at(k) - target), k))


def mean_cost(o: RunOutput) -> float:
    """Mean prefill GFLOPs per question of a run."""
    return float(np.mean(o.gflops))


def nearest_cost_run(outputs: dict[Run, RunOutput], method: str, gflops: float) -> Run:
    """The run of ``method`` whose mean prefill GFLOPs is nearest ``gflops`` (ties: fewer GFLOPs)."""
    runs = [r for r in outputs if r.method == method]
    if not runs:
        raise ValueError(f"nearest_cost_run: no run of method {method!r}")
    return min(runs, key=lambda r: (abs(mean_cost(outputs[r]) - gflops), mean_cost(outputs[r])))


def gap_pct(a: float, b: float) -> float:
    """``a`` relative to ``b``, in percent of ``b``."""
    return 100.0 * (a - b) / b


def peer_runs(outputs: dict[Run, RunOutput], ours: str) -> list[Run]:
    """Every run of a compressing method other than ``ours`` (``full`` is the reference)."""
    return [r for r in outputs if r.method not in ("full", ours)]


def equal_cost_runs(outputs: dict[Run, RunOutput], ours: str, sweeper: Sweeper, tolerance: float) -> list[Run]:
    """Fixed-count runs of ``ours`` to add so each peer run has one of ours within ``tolerance``
    (relative) of its mean prefill GFLOPs, on the same questions. The count is solved from the
    FLOPs formula with the questions' own prompt lengths; peers already matched need none."""
    if ours not in {r.method for r in outputs}:
        raise ValueError(f"equal_cost_runs: no run of {ours!r} to match against")
    o = next(v for r, v in outputs.items() if r.method == ours)
    extra: list[Run] = []
    for peer in peer_runs(outputs, ours):
        target = mean_cost(outputs[peer])
        near = nearest_cost_run(outputs, ours, target)
        if abs(gap_pct(mean_cost(outputs[near]), target)) <= 100.0 * tolerance:
            continue
        k = count_for_cost(lambda k: sweeper.mean_gflops(Run(ours, k), k, o.n_text, o.n_clip), target,
                           sweeper.n_patches)
        run = Run(ours, k)
        if run not in outputs and run not in extra:
            extra.append(run)
    return extra


def equal_cost_table(outputs: dict[Run, RunOutput], ours: str, tolerance: float) -> pd.DataFrame:
    """``ours`` against every peer run at equal prefill cost: the run of ours whose mean GFLOPs
    is nearest the peer's (``gap_pct``: ours' cost relative to the peer's; ``matched``: within
    ``tolerance``), and the paired per-question accuracy difference ours - peer (points), its
    standard error and ``z = diff / se``."""
    cols = ["ours", "ours_budget", "ours_tokens", "ours_gflops", "peer", "peer_budget", "peer_tokens",
            "peer_gflops", "gap_pct", "matched", "diff", "se", "z", "n"]
    rows = []
    for peer in peer_runs(outputs, ours):
        target = mean_cost(outputs[peer])
        mine = nearest_cost_run(outputs, ours, target)
        gap = gap_pct(mean_cost(outputs[mine]), target)
        d = paired_difference(outputs[mine], outputs[peer])
        z = d["diff"] / d["se"] if d["se"] and math.isfinite(d["se"]) else None
        rows.append({"ours": ours, "ours_budget": mine.key, "ours_tokens": round(float(np.mean(outputs[mine].tokens)), 2),
                     "ours_gflops": round(mean_cost(outputs[mine]), 6), "peer": peer.method, "peer_budget": peer.key,
                     "peer_tokens": round(float(np.mean(outputs[peer].tokens)), 2), "peer_gflops": round(target, 6),
                     "gap_pct": round(gap, 2), "matched": abs(gap) <= 100.0 * tolerance, "diff": d["diff"],
                     "se": d["se"], "z": None if z is None else round(z, 2), "n": d["n"]})
    return pd.DataFrame(rows, columns=cols)


def cost_table(outputs: dict[Run, RunOutput], latency_ms: dict[str, float], ours: str | None,
               added: Sequence[Run] = ()) -> pd.DataFrame:
    """One row per run: method, budget, mean visual tokens, mean prefill GFLOPs (total and the LM
    part), measured prefill latency (median ms; ``latency_ms`` by run label, NaN if not
    measured), VQA accuracy (%) and its share of the full model's (``rel_acc``, %; NaN without
    a full run or when it scores 0), whether the method is ours, and whether the run was
    ``planned`` (a method at a budget) rather than one of the ``added`` equal-cost runs."""
    acc = {run: round(100.0 * float(np.mean([vqa_accuracy(a, q.answers) for (_, q), a in zip(o.samples, o.answers)])), 2)
           for run, o in outputs.items()}
    full_acc = next((a for r, a in acc.items() if r.method == "full"), 0.0)
    rows = []
    for run, o in outputs.items():
        rows.append({"method": run.method, "budget": run.key, "tokens": round(float(np.mean(o.tokens)), 2),
                     "gflops": round(mean_cost(o), 6), "lm_gflops": round(float(np.mean(o.lm_gflops)), 6),
                     "latency_ms": latency_ms.get(run.label, float("nan")), "accuracy": acc[run],
                     "rel_acc": round(100.0 * acc[run] / full_acc, 2) if full_acc > 0 else float("nan"),
                     "ours": run.method == ours, "planned": run not in added})
    return pd.DataFrame(rows, columns=["method", "budget", "tokens", "gflops", "lm_gflops", "latency_ms",
                                       "accuracy", "rel_acc", "ours", "planned"])


def _number(v: Any) -> float | None:
    """A table cell as a JSON number; NaN (not measured, not defined) as None."""
    return None if v is None or pd.isna(v) else float(v)


def headline_at(cost: pd.DataFrame, equal: pd.DataFrame, ours: str | None, key: str) -> dict[str, Any]:
    """The comparison at budget ``key`` in a few numbers, from :func:`cost_table` and
    :func:`equal_cost_table`: ours' accuracy and share of the full model's, the peer most
    accurate at ``key`` (ties: the first run), and ours minus that peer run at equal prefill
    cost with its paired standard error (None where a run or the pairing is missing)."""
    at = cost[cost["planned"] & (cost["budget"] == key)]
    mine = at[at["method"] == ours]
    peers = at[~at["method"].isin(["full", ours])]
    best = peers.loc[peers["accuracy"].idxmax()] if len(peers) else None
    pair = equal[(equal["peer"] == best["method"]) & (equal["peer_budget"] == key)] if best is not None else equal[:0]
    return {"ours_acc": _number(mine["accuracy"].iloc[0]) if len(mine) else None,
            "ours_rel_acc": _number(mine["rel_acc"].iloc[0]) if len(mine) else None,
            "best_peer": None if best is None else str(best["method"]),
            "best_peer_acc": None if best is None else _number(best["accuracy"]),
            "ours_minus_best_peer": _number(pair["diff"].iloc[0]) if len(pair) else None,
            "ours_minus_best_peer_se": _number(pair["se"].iloc[0]) if len(pair) else None}


def mean_accuracy(outputs: dict[Run, RunOutput], method: str) -> float:
    """VQA accuracy (%) of ``method`` averaged over its runs (budgets)."""
    accs = [100.0 * float(np.mean([vqa_accuracy(a, q.answers) for (_, q), a in zip(o.samples, o.answers)]))
            for r, o in outputs.items() if r.method == method]
    return float(np.mean(accs))


def choose_ours(sweeper: Sweeper, batches: Sequence[Batch], candidates: Sequence[str],
                budgets: Sequence[int | float], max_new_tokens: int) -> tuple[str | None, dict[str, float]]:
    """The candidate with the best VQA accuracy averaged over ``budgets`` on ``batches`` (the
    validation split; ties: the first listed), and each candidate's accuracy. One candidate is
    chosen without running; none gives ``(None, {})``."""
    if len(candidates) <= 1:
        return (candidates[0] if candidates else None), {}
    out = sweeper.sweep(batches, [Run(m, b) for m in candidates for b in budgets], "vqa", max_new_tokens)
    acc = {m: round(mean_accuracy(out, m), 2) for m in candidates}
    return max(candidates, key=lambda m: (acc[m], -candidates.index(m))), acc


def candidates_table(candidates: Sequence[str], val_acc: dict[str, float], ours: str | None) -> pd.DataFrame:
    """One row per candidate for ours: method, validation accuracy (%; NaN when a single
    candidate was chosen without running) and whether it was ``chosen``."""
    return pd.DataFrame([{"method": m, "val_acc": val_acc.get(m, float("nan")), "chosen": m == ours}
                         for m in candidates], columns=["method", "val_acc", "chosen"])


def object_size(record: ImageRecord, question: Question) -> str | None:
    """Size class of what a scenes question is about: ``small`` if any object it names is
    small, ``large`` if all are, ``none`` if it names no object of the scene ("is there a red
    cross?" without one, a zero count); ``None`` for records without size attributes (VQAv2)."""
    attrs = [o.attributes for o in record.objects]
    if not attrs or not all({"color", "shape", "size"} <= a.keys() for a in attrs):
        return None
    named = named_objects(question.question, [(a["color"], a["shape"]) for a in attrs])
    if not named:
        return "none"
    return "small" if any(attrs[i]["size"] == "small" for i in named) else "large"


def vqa_by_size(outputs: dict[Run, RunOutput]) -> pd.DataFrame:
    """Long table: method, budget, size (see :func:`object_size`), acc, n; empty when no
    question has a size class."""
    memo: dict[tuple[int, int], str | None] = {}

    def size_of(r: ImageRecord, q: Question) -> str | None:     # every run asks the same questions
        key = (r.image_id, q.question_id)
        if key not in memo:
            memo[key] = object_size(r, q)
        return memo[key]

    rows = []
    for run, o in outputs.items():
        for size, v in sorted(scores_by(o, size_of).items()):
            rows.append({"method": run.method, "budget": run.key, "size": size,
                         "acc": round(100.0 * float(np.mean(v)), 2), "n": len(v)})
    return pd.DataFrame(rows, columns=["method", "budget", "size", "acc", "n"])


# --- captions and grounding ------------------------------------------------------------

def caption_scores(outputs: dict[Run, RunOutput]) -> dict[str, float]:
    """CIDEr (percent, :func:`~vlmcompress.eval.tasks.caption_cider`) per ``method@budget``;
    samples are image records."""
    return {run.label: round(caption_cider(o.samples, o.answers), 2) for run, o in outputs.items()}


def grounding_scores(outputs: dict[Run, RunOutput], aspect: str = "resize") -> dict[str, float | None]:
    """Accuracy at IoU >= 0.5 (percent, :func:`~vlmcompress.eval.tasks.grounding_accuracy`) per
    ``method@budget``; samples are (record, ref). None when there are no referring expressions
    (the task is absent, not failed)."""
    out: dict[str, float | None] = {}
    for run, o in outputs.items():
        ious = grounding_ious(o.answers, o.samples, aspect)
        out[run.label] = round(grounding_accuracy(ious), 2) if ious else None
    return out


GROUNDING_COLUMNS = ["method", "budget", "tokens", "kept_fraction", "grounding_acc50", "grounding_miou", "n"]


def grounding_table(outputs: dict[Run, RunOutput], n_visual: int, aspect: str = "resize") -> pd.DataFrame:
    """One row per grounding run: method, budget, mean visual tokens the LM attends to (FastV:
    after its layer K), their share of the ``n_visual`` tokens of an image, accuracy at IoU >=
    0.5 (percent), mean IoU (0-1) and the number of referring expressions. Without referring
    expressions a run's row has NaN scores and ``n`` = 0 (the task is absent, not failed)."""
    rows = []
    for run, o in outputs.items():
        ious = grounding_ious(o.answers, o.samples, aspect)
        tokens = float(np.mean(o.tokens)) if o.tokens else math.nan
        rows.append({"method": run.method, "budget": run.key, "tokens": round(tokens, 2),
                     "kept_fraction": round(tokens / n_visual, 4),
                     "grounding_acc50": round(grounding_accuracy(ious), 2) if ious else math.nan,
                     "grounding_miou": round(float(np.mean(ious)), 4) if ious else math.nan, "n": len(ious)})
    return pd.DataFrame(rows, columns=GROUNDING_COLUMNS)


def task_table(captions: dict[Run, RunOutput], grounding: dict[Run, RunOutput], aspect: str = "resize") -> pd.DataFrame:
    """One row per run of the captions sweep: method, budget, CIDEr (:func:`caption_scores`)
    and grounding accuracy at IoU >= 0.5 of the same run (:func:`grounding_scores`; NaN without
    referring expressions or without that run; the other grounding runs are left out)."""
    cider = caption_scores(captions)
    acc50 = grounding_scores({r: grounding[r] for r in captions if r in grounding}, aspect)
    rows = [{"method": r.method, "budget": r.key, "caption_cider": cider[r.label],
             "grounding_acc50": acc50.get(r.label)} for r in captions]
    return pd.DataFrame(rows, columns=["method", "budget", "caption_cider", "grounding_acc50"])
