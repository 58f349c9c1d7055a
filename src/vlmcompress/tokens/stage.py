"""The token-compression stage (``05_eval_tokens``): every method at every budget on the test split.

One pass over the test images does all the work: each batch of images goes through the vision
tower once, and then through every (method, budget) run — full, the fixed budgets, the adaptive
modes, FastV inside the LM. Questions are a type-stratified subset (``tokens.eval.max_questions``),
at most one question of each type per image, so several questions share an image (one tower
pass, and for methods that ignore the question one compression and one prefill of the image
prefix). Captions (CIDEr) and grounding run at ``tokens.eval.task_budget``; prefill latency,
selection overhead and peak memory are measured for every run on a small fixed batch.

Our method is chosen on the validation split (``tokens.eval.ours``: the candidate with the best
mean accuracy over the budgets on ``val_questions`` questions); the test split is then reported
once. Methods are compared at equal prefill cost as well as at equal token count: each peer
run is paired with the run of ours whose prefill GFLOPs per question is nearest, and where none
is within ``cost_tolerance`` a run of ours at the token count the FLOPs formula solves for is
added; the paired per-question difference and its standard error judge the gap.

Writes ``outputs/tokens/``: ``metrics.json`` (``full_acc``; ``methods.<method>.<budget>`` =
``{acc, rel_acc, mean_tokens, prefill_gflops, lm_prefill_gflops}``; ``prefill_speedup_<task budget>``,
``selection_overhead_pct`` (CLIP text tower included), ``text_encoder_pct`` and
``selection_merge_pct`` (without it); paired differences of the text-guided methods against
the others at the task budget; task, object-size and efficiency tables), ``accuracy.csv`` (method,
budget, mean_tokens, question_type — ``all`` for overall —, acc), ``accuracy_by_size.csv``
(method, budget, size of the objects a question names, acc, n), ``efficiency.csv``, ``cost.csv``
(every run, the added ones too: method, budget, tokens, gflops, lm_gflops, latency_ms, accuracy,
ours), ``equal_cost.csv`` (ours against each peer run at equal cost: budgets, GFLOPs, gap_pct,
matched, diff, se, z, n; ``ours``, ``equal_cost`` and ``equal_cost_runs`` in metrics.json) and
``examples.json`` (token maps of a few test questions, for figures).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord, Question
from vlmcompress.data.scenes import named_objects
from vlmcompress.eval.tasks import BOX_ANSWER, answer_tokens, cider, grounding_iou, load_image, vqa_accuracy
from vlmcompress.io import atomic_path, write_json
from vlmcompress.paths import outputs_dir, project_relative
from vlmcompress.tokens.config import TokensParams
from vlmcompress.tokens.fastv import FastV
from vlmcompress.tokens.flops import model_dims, prefill_gflops
from vlmcompress.tokens.methods import ADAPTIVE
from vlmcompress.tokens.patch import TEXT_GUIDED, TextEmbeddingCache, make_transform
from vlmcompress.tokens.timing import measure_prefills
from vlmcompress.tokens.types import KIND_SALIENT

FULL_KEY = "1.00"


def stage_dir():
    return outputs_dir("tokens")


def budget_key(budget: int | float | None) -> str:
    """``None`` -> ``'adaptive'``, 0.1 -> ``'0.10'``, 0.125 -> ``'0.125'``, a count 64 -> ``'64'``."""
    if budget is None:
        return "adaptive"
    if isinstance(budget, int):
        return str(budget)
    two = f"{budget:.2f}"
    return two if math.isclose(float(two), budget, abs_tol=1e-12) else repr(budget)


@dataclass(frozen=True)
class Run:
    """One evaluated configuration: a method at a budget (``None``: adaptive; ``full``: all)."""

    method: str
    budget: int | float | None

    @property
    def key(self) -> str:
        return FULL_KEY if self.method == "full" else budget_key(self.budget)

    @property
    def label(self) -> str:
        return f"{self.method}@{self.key}"


def plan_runs(p: TokensParams) -> list[Run]:
    """``full`` first (every relative accuracy needs it), then each method at each budget and,
    with ``adaptive: true``, in its adaptive mode where it has one."""
    runs = [Run("full", None)]
    for m in p.methods:
        if m == "full":
            continue
        runs += [Run(m, b) for b in p.budgets]
        if p.adaptive and m in ADAPTIVE:
            runs.append(Run(m, None))
    return runs


def stratified_questions(records: Sequence[ImageRecord], n: int, seed: int = 0
                         ) -> list[tuple[ImageRecord, Question]]:
    """A seeded subset of ``n`` questions (0: all) with each question type in its share of the
    split (largest remainder), at most one question per type per image where possible,
    grouped by image."""
    every = [(r, q) for r in records for q in r.questions]
    if n <= 0 or n >= len(every):
        return every
    counts = Counter(q.question_type for _, q in every)
    exact = {t: n * c / len(every) for t, c in counts.items()}
    quota = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: (quota[t] - exact[t], t))[: n - sum(quota.values())]:
        quota[t] += 1
    rng = np.random.default_rng(seed)
    order = [records[i] for i in rng.permutation(len(records))]
    qorder = {r.image_id: [r.questions[j] for j in rng.permutation(len(r.questions))] for r in order}
    picked: dict[int, list[Question]] = defaultdict(list)
    taken: set[int] = set()
    for one_per_type in (True, False):
        for r in order:
            types = {q.question_type for q in picked[r.image_id]}
            for q in qorder[r.image_id]:
                if quota[q.question_type] == 0 or q.question_id in taken:
                    continue
                if one_per_type and q.question_type in types:
                    continue
                picked[r.image_id].append(q)
                taken.add(q.question_id)
                types.add(q.question_type)
                quota[q.question_type] -= 1
            if not any(quota.values()):
                break
        if not any(quota.values()):
            break
    return [(r, q) for r in order for q in picked.get(r.image_id, [])]


@dataclass
class Batch:
    """Samples about a few images: ``images`` (U tensors ``[3, H, W]``, sizes may differ), ``index [B]``
    (image of each sample)."""

    records: list[ImageRecord]
    images: list[torch.Tensor]
    index: list[int]
    texts: list[str] | None
    samples: list[Any]


def make_batches(samples: Sequence[Any], record_of: Callable[[Any], ImageRecord], text_of, n_images: int,
                 load: Callable[[ImageRecord], torch.Tensor] = lambda r: load_image(r.path)) -> list[Batch]:
    """Consecutive samples grouped so each batch holds ``n_images`` distinct images."""
    groups: list[list[Any]] = []
    seen: dict[int, int] = {}
    for s in samples:
        rid = record_of(s).image_id
        if rid not in seen:
            if not groups or len({record_of(x).image_id for x in groups[-1]}) >= n_images:
                groups.append([])
            seen[rid] = len(groups) - 1
        groups[seen[rid]].append(s)
    out = []
    for g in groups:
        first: dict[int, int] = {}
        recs = []
        for s in g:
            r = record_of(s)
            if r.image_id not in first:
                first[r.image_id] = len(recs)
                recs.append(r)
        out.append(Batch(recs, [load(r) for r in recs], [first[record_of(s).image_id] for s in g],
                         None if text_of is None else [text_of(s) for s in g], list(g)))
    return out


@dataclass
class RunOutput:
    """Per-sample outputs of one run over all batches (``samples`` in the same order)."""

    samples: list[Any] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)       # visual tokens the LM attends to (FastV: after K)
    gflops: list[float] = field(default_factory=list)
    lm_gflops: list[float] = field(default_factory=list)   # the LM prefill alone (the part compression shrinks)
    n_text: list[int] = field(default_factory=list)         # prompt text tokens (LM) of each sample
    n_clip: list[int] = field(default_factory=list)         # question tokens for CLIP's text tower
    seconds: float = 0.0          # wall time in generate (tower pass excluded: shared by all runs)
    cpu_seconds: float = 0.0      # process CPU time of the same


def _visual_counts(tr: Any, n_samples: int, index: Sequence[int], n_patches: int) -> list[int]:
    """Tokens per sample from a transform used for one call. A transform that ignores the
    question compresses once per image when the adapter shares the prefill (then it kept one
    count per image, and with one sample per image the two orders coincide)."""
    if tr is None:
        return [n_patches] * n_samples
    kept = list(tr.kept)
    if len(kept) == n_samples:
        return kept
    return [kept[i] for i in index]


class Sweeper:
    """Runs every configuration over batches, sharing the tower pass and text embeddings."""

    def __init__(self, lvlm: Any, params: TokensParams, seed: int = 0) -> None:
        self.lvlm, self.params, self.seed = lvlm, params, seed
        self.dims = model_dims(lvlm)
        self.n_patches = lvlm.grid[0] * lvlm.grid[1]
        self.text_cache = TextEmbeddingCache(lvlm)

    def gflops(self, run: Run, n_visual: int, n_text: int, n_clip: int) -> dict[str, float]:
        vision, projector, lm, text = self.dims
        N = self.n_patches
        if run.method == "fastv":
            g = prefill_gflops(n_patches=N, n_visual=N, n_text=n_text, vision=vision, projector=projector, lm=lm,
                               fastv=(self.params.fastv.layer, n_visual))
        else:
            g = prefill_gflops(n_patches=N, n_visual=n_visual, n_text=n_text, vision=vision, projector=projector,
                               lm=lm, text=text if run.method in TEXT_GUIDED else None, n_clip_tokens=n_clip)
        return g

    def sweep(self, batches: Sequence[Batch], runs: Sequence[Run], task: str, max_new_tokens: int,
              progress: bool = False) -> dict[Run, RunOutput]:
        from tqdm.auto import tqdm

        lv = self.lvlm
        out = {r: RunOutput() for r in runs}
        for bi, batch in enumerate(tqdm(batches, disable=not progress, desc=task)):
            n = len(batch.index)
            texts = batch.texts if batch.texts is not None else [""] * n
            n_text = lv.prompt_lengths(task, texts)
            guide = lv.transform_texts(task, texts)
            n_clip = [len(ids) for ids in lv.clip_tokenizer(guide, truncation=True).input_ids]
            with torch.inference_mode():
                feats = lv.visual_features(batch.images)
            for run in runs:
                tr = make_transform(lv, run.method, run.budget, self.params, seed=self.seed * 100_003 + bi,
                                    text_encoder=self.text_cache)
                t0, c0 = time.perf_counter(), time.process_time()
                answers = lv.generate_from_features(feats, batch.texts, task=task, transform=tr,
                                                    max_new_tokens=max_new_tokens, image_index=batch.index)
                o = out[run]
                o.seconds += time.perf_counter() - t0
                o.cpu_seconds += time.process_time() - c0
                o.samples += batch.samples
                o.answers += answers
                counts = _visual_counts(tr, n, batch.index, self.n_patches)
                o.tokens += counts
                g = [self.gflops(run, k, t, c) for k, t, c in zip(counts, n_text, n_clip)]
                o.gflops += [x["total"] for x in g]
                o.lm_gflops += [x["lm"] for x in g]
                o.n_text += list(n_text)
                o.n_clip += list(n_clip)
        return out

    def mean_gflops(self, run: Run, n_visual: int, n_text: Sequence[int], n_clip: Sequence[int]) -> float:
        """Mean prefill GFLOPs of ``run`` keeping ``n_visual`` tokens on questions with these prompt
        lengths (what a fixed-count run of a pre-LM method will cost, before running it)."""
        return float(np.mean([self.gflops(run, n_visual, t, c)["total"] for t, c in zip(n_text, n_clip)]))


# --- scoring ---------------------------------------------------------------------------

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


def paired_table(outputs: dict[Run, RunOutput], key: str) -> dict[str, dict[str, float | int]]:
    """``"A - B"``: :func:`paired_difference` of each text-guided method against every other
    compressing method, at budget ``key``."""
    at = {r.method: o for r, o in outputs.items() if r.key == key}
    return {f"{m} - {other}": paired_difference(at[m], at[other])
            for m in sorted(TEXT_GUIDED & at.keys()) for other in at if other != m}


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


def equal_cost_runs(outputs: dict[Run, RunOutput], ours: str, sweeper: "Sweeper", tolerance: float) -> list[Run]:
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


def equal_cost_metrics(eq: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``{"peer@budget": {ours_budget, gap_pct, diff, se, z}}`` for ``metrics.json``."""
    return {f"{r.peer}@{r.peer_budget}": {"ours_budget": r.ours_budget, "gap_pct": r.gap_pct, "matched": bool(r.matched),
                                          "diff": r.diff, "se": r.se, "z": None if pd.isna(r.z) else r.z}
            for r in eq.itertuples()}


def cost_table(outputs: dict[Run, RunOutput], latency_ms: dict[str, float], ours: str | None) -> pd.DataFrame:
    """One row per run: method, budget, mean visual tokens, mean prefill GFLOPs (total and the LM
    part), measured prefill latency (median ms; ``latency_ms`` by run label, NaN if not
    measured), VQA accuracy (%), and whether the method is ours."""
    rows = []
    for run, o in outputs.items():
        acc = 100.0 * float(np.mean([vqa_accuracy(a, q.answers) for (_, q), a in zip(o.samples, o.answers)]))
        rows.append({"method": run.method, "budget": run.key, "tokens": round(float(np.mean(o.tokens)), 2),
                     "gflops": round(mean_cost(o), 6), "lm_gflops": round(float(np.mean(o.lm_gflops)), 6),
                     "latency_ms": latency_ms.get(run.label, float("nan")), "accuracy": round(acc, 2),
                     "ours": run.method == ours})
    return pd.DataFrame(rows, columns=["method", "budget", "tokens", "gflops", "lm_gflops", "latency_ms",
                                       "accuracy", "ours"])


def mean_accuracy(outputs: dict[Run, RunOutput], method: str) -> float:
    """VQA accuracy (%) of ``method`` averaged over its runs (budgets)."""
    accs = [100.0 * float(np.mean([vqa_accuracy(a, q.answers) for (_, q), a in zip(o.samples, o.answers)]))
            for r, o in outputs.items() if r.method == method]
    return float(np.mean(accs))


def choose_ours(sweeper: "Sweeper", batches: Sequence[Batch], candidates: Sequence[str],
                budgets: Sequence[int | float], max_new_tokens: int) -> tuple[str | None, dict[str, float]]:
    """The candidate with the best VQA accuracy averaged over ``budgets`` on ``batches`` (the
    validation split; ties: the first listed), and each candidate's accuracy. One candidate is
    chosen without running; none gives ``(None, {})``."""
    if len(candidates) <= 1:
        return (candidates[0] if candidates else None), {}
    out = sweeper.sweep(batches, [Run(m, b) for m in candidates for b in budgets], "vqa", max_new_tokens)
    acc = {m: round(mean_accuracy(out, m), 2) for m in candidates}
    return max(candidates, key=lambda m: (acc[m], -candidates.index(m))), acc


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


def size_metrics(by_size: pd.DataFrame, key: str) -> dict[str, Any]:
    """``{"method@budget": {size: acc}}`` for every method at budget ``key`` and the full model,
    plus ``n`` (questions per size class); empty without size classes."""
    if by_size.empty:
        return {}
    at = by_size[by_size.budget.isin([key, FULL_KEY])]
    out: dict[str, Any] = {f"{m}@{b}": dict(zip(g["size"], g["acc"])) for (m, b), g in at.groupby(["method", "budget"])}
    full = by_size[by_size.method == "full"]
    out["n"] = dict(zip(full["size"], full["n"].astype(int).tolist()))
    return out


def caption_scores(outputs: dict[Run, RunOutput]) -> dict[str, float]:
    """CIDEr (percent) per ``method@budget``; samples are image records."""
    out = {}
    for run, o in outputs.items():
        refs = {r.image_id: r.captions for r in o.samples}
        out[run.label] = round(cider({r.image_id: a for r, a in zip(o.samples, o.answers)}, refs), 2)
    return out


def grounding_scores(outputs: dict[Run, RunOutput], aspect: str = "resize") -> dict[str, float]:
    """Accuracy at IoU >= 0.5 (percent) per ``method@budget``; samples are (record, ref).
    None when there are no referring expressions (the task is absent, not failed)."""
    out = {}
    for run, o in outputs.items():
        hits = [grounding_iou(text, r, ref.bbox, aspect) >= 0.5 for (r, ref), text in zip(o.samples, o.answers)]
        out[run.label] = round(100.0 * float(np.mean(hits)), 2) if hits else None
    return out


def metrics_from(table: pd.DataFrame, outputs: dict[Run, RunOutput]) -> dict[str, Any]:
    """The contract: ``full_acc`` and ``methods.<method>.<budget>`` blocks."""
    overall = table[table.question_type == "all"].set_index(["method", "budget"])
    full = outputs[next(r for r in outputs if r.method == "full")]
    full_acc = float(overall.loc[("full", FULL_KEY), "acc"])
    m: dict[str, Any] = {"full_acc": full_acc, "full_tokens": float(np.mean(full.tokens)),
                         "full_prefill_gflops": round(float(np.mean(full.gflops)), 4),
                         "full_lm_prefill_gflops": round(float(np.mean(full.lm_gflops)), 4),
                         "vqa_questions": len(full.answers), "methods": {}}
    for run, o in outputs.items():
        if run.method == "full":
            continue
        acc = float(overall.loc[(run.method, run.key), "acc"])
        m["methods"].setdefault(run.method, {})[run.key] = {
            "acc": acc,
            "rel_acc": round(100.0 * acc / full_acc, 2) if full_acc > 0 else None,
            "mean_tokens": round(float(np.mean(o.tokens)), 2),
            "prefill_gflops": round(float(np.mean(o.gflops)), 4),
            "lm_prefill_gflops": round(float(np.mean(o.lm_gflops)), 4),
        }
    return m


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Method x budget: ``acc (rel %) · tokens`` cells; the full model in column ``1.00``."""
    cols: list[str] = []
    for blocks in metrics["methods"].values():
        cols += [k for k in blocks if k not in cols]
    cols = sorted((c for c in cols if c != "adaptive"), key=float) + (["adaptive"] if "adaptive" in cols else [])
    cols.append(FULL_KEY)
    rows = {"full": {c: "" for c in cols}}
    rows["full"][FULL_KEY] = f"{metrics['full_acc']:.1f} (100) · {metrics['full_tokens']:.0f}"
    def cell(b: dict[str, Any] | None) -> str:
        if b is None:
            return ""
        rel = "–" if b["rel_acc"] is None else f"{b['rel_acc']:.0f}"
        return f"{b['acc']:.1f} ({rel}) · {b['mean_tokens']:.0f}"

    for m, blocks in metrics["methods"].items():
        rows[m] = {c: cell(blocks.get(c)) for c in cols}
    return pd.DataFrame(rows).T[cols]


# --- examples for figures --------------------------------------------------------------

def pick_examples(items: Sequence[tuple[ImageRecord, Question]], n: int) -> list[tuple[ImageRecord, Question]]:
    """Questions about images with the smallest objects, one question type after another."""
    def smallest(r: ImageRecord) -> float:
        return min((o.bbox[2] * o.bbox[3] for o in r.objects), default=math.inf)

    by_type: dict[str, list] = defaultdict(list)
    for it in sorted(items, key=lambda it: (smallest(it[0]), it[1].question_id)):
        by_type[it[1].question_type].append(it)
    out, used = [], set()
    while len(out) < n and any(by_type.values()):
        for t in sorted(by_type):
            while by_type[t] and by_type[t][0][0].image_id in used:
                by_type[t].pop(0)
            if by_type[t] and len(out) < n:
                it = by_type[t].pop(0)
                used.add(it[0].image_id)
                out.append(it)
    return out


def cell_kinds(tr: Any, n_patches: int) -> list[int]:
    """Role of every grid cell (row-major) after a one-sample call: KIND_* codes, 0 = dropped."""
    if tr is None:
        return [KIND_SALIENT] * n_patches
    if isinstance(tr, FastV):
        return [KIND_SALIENT if k else 0 for k in tr.last_keep[0].tolist()]
    return [int(k) for k in tr.last.cells[0].tolist()]


def token_examples(lvlm: Any, items: Sequence[tuple[ImageRecord, Question]], params: TokensParams,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Image, question, answer and per method (at the task budget) prediction + cell kinds."""
    E = params.eval
    n_patches = lvlm.grid[0] * lvlm.grid[1]
    out = []
    for rec, q in pick_examples(items, E.examples):
        img = load_image(rec.path).unsqueeze(0)
        entry: dict[str, Any] = {"image_id": rec.image_id, "image": project_relative(rec.path), "question": q.question,
                                 "question_type": q.question_type, "answer": q.answer,
                                 "grid": list(lvlm.grid), "budget": budget_key(E.task_budget),
                                 "objects": [{"category": o.category, "bbox": list(o.bbox)} for o in rec.objects],
                                 "methods": {}}
        for method in E.example_methods:
            tr = make_transform(lvlm, method, None if method == "full" else E.task_budget, params, seed=seed)
            pred = lvlm.generate(img, [q.question], transform=tr, max_new_tokens=answer_tokens(lvlm, q.answers))[0]
            entry["methods"][method] = {"prediction": pred, "correct": vqa_accuracy(pred, q.answers) > 0,
                                        "cells": cell_kinds(tr, n_patches)}
        out.append(entry)
    return out


# --- efficiency ------------------------------------------------------------------------

def efficiency_table(lvlm: Any, items: Sequence[tuple[ImageRecord, Question]], runs: Sequence[Run],
                     params: TokensParams, seed: int = 0, log=print) -> pd.DataFrame:
    """Measured prefill cost of every run on the same ``bench_batch`` requests: one question
    about each of ``bench_batch`` distinct images (no prefix shared between requests)."""
    E = params.eval
    first: dict[int, tuple[ImageRecord, Question]] = {}
    for r, q in items:
        first.setdefault(r.image_id, (r, q))
    one_each = list(first.values())[: E.bench_batch]
    batch = make_batches(one_each, lambda s: s[0], lambda s: s[1].question, E.bench_batch)[0]
    makers = {run.label: (lambda run=run: make_transform(lvlm, run.method, run.budget, params, seed=seed))
              for run in runs}
    costs = measure_prefills(lvlm, batch.images, batch.texts, makers, repeats=E.bench_repeats,
                             image_index=batch.index)
    rows = [{"method": run.method, "budget": run.key, "prefill_ms": round(c.prefill_ms, 2),
             "vision_ms": round(c.vision_ms, 2), "selection_ms": round(c.selection_ms, 3), "text_ms": round(c.text_ms, 3),
             "peak_mb": round(c.peak_mb, 2)} for run, c in zip(runs, costs.values())]
    df = pd.DataFrame(rows)
    full_ms = float(df.loc[df.method == "full", "prefill_ms"].iloc[0])
    df["speedup"] = (full_ms / df["prefill_ms"]).round(3)
    df["selection_pct"] = (100.0 * df["selection_ms"] / df["prefill_ms"]).round(3)
    df["text_pct"] = (100.0 * df["text_ms"] / df["prefill_ms"]).round(3)
    return df


# --- the stage -------------------------------------------------------------------------

class _Clock:
    """``with clock(name):`` adds the block's wall and process-CPU seconds under ``name``."""

    def __init__(self, wall: dict[str, float], cpu: dict[str, float]) -> None:
        self.wall, self.cpu = wall, cpu

    @contextlib.contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c


def _limit(seq: Sequence, n: int) -> list:
    return list(seq[:n]) if n > 0 else list(seq)


def run_tokens_stage(params: Params, splits: dict[str, list[ImageRecord]], log=print,
                     progress: bool = False) -> dict[str, Any]:
    """Evaluate every method x budget; write ``outputs/tokens/*``; return the metrics."""
    from vlmcompress.lvlm.stage import load_stage_lvlm

    T, E = params.tokens, params.tokens.eval
    out_dir = stage_dir()
    lvlm = load_stage_lvlm(params)
    lvlm.attn_layer = T.attention_layer            # the vision layer whose CLS attention scores tokens
    if "fastv" in T.methods and not 1 <= T.fastv.layer <= len(lvlm.language_model.layers):
        raise ValueError(f"tokens.fastv.layer: must be in [1, {len(lvlm.language_model.layers)}] "
                         f"for this LM, got {T.fastv.layer}")
    test = splits["test"]
    runs = plan_runs(T)
    sweeper = Sweeper(lvlm, T, seed=params.seed)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock = _Clock(seconds, cpu)

    candidates = [m for m in E.ours if m in T.methods]
    val_items = stratified_questions(splits.get("val", []), E.val_questions, seed=params.seed) \
        if len(candidates) > 1 else []
    if len(candidates) > 1 and not val_items:
        raise ValueError(f"tokens.eval.ours: choosing among {candidates} needs validation questions, "
                         f"and the val split has none")
    with clock("val"):      # our method is chosen on the validation split; the test split is reported once
        ours, val_acc = choose_ours(
            sweeper, make_batches(val_items, lambda s: s[0], lambda s: s[1].question, E.batch_images), candidates,
            T.budgets, answer_tokens(lvlm, [a for _, q in val_items for a in q.answers]) if val_items else 1)
    items = stratified_questions(test, E.max_questions, seed=params.seed)
    with clock("vqa"):
        batches = make_batches(items, lambda s: s[0], lambda s: s[1].question, E.batch_images)
        n_answer = answer_tokens(lvlm, [a for _, q in items for a in q.answers])
        vqa = sweeper.sweep(batches, runs, "vqa", n_answer, progress=progress)
    with clock("equal_cost"):   # runs of ours at the prefill cost of peers it has no run near
        extra = equal_cost_runs(vqa, ours, sweeper, E.cost_tolerance) if ours else []
        every = {**vqa, **sweeper.sweep(batches, extra, "vqa", n_answer, progress=progress)} \
            if extra else dict(vqa)
        equal = equal_cost_table(every, ours, E.cost_tolerance) if ours else equal_cost_table({}, "", 0.0)
    key = budget_key(E.task_budget)
    table = vqa_table(vqa)
    metrics = metrics_from(table, vqa)
    by_size = vqa_by_size(vqa)
    metrics[f"paired_{key}"] = paired_table(vqa, key)
    metrics[f"vqa_by_object_size_{key}"] = size_metrics(by_size, key)
    metrics["n_visual_tokens"] = sweeper.n_patches
    metrics["grid_positions"] = params.tokens.grid_positions
    metrics["vqa_seconds_by_method"] = {m: round(sum(o.seconds for r, o in vqa.items() if r.method == m), 1)
                                        for m in dict.fromkeys(r.method for r in runs)}
    metrics["vqa_cpu_seconds_by_method"] = {m: round(sum(o.cpu_seconds for r, o in vqa.items() if r.method == m), 1)
                                            for m in dict.fromkeys(r.method for r in runs)}
    metrics["ours"] = {"method": ours, "candidates": candidates, "val_acc": val_acc, "val_questions": len(val_items)}
    metrics["cost_tolerance"] = E.cost_tolerance
    metrics["equal_cost_runs"] = [r.label for r in extra]
    metrics["equal_cost"] = equal_cost_metrics(equal)
    log(f"VQA: {len(items)} questions, {len(runs)} runs in {seconds['vqa']:.0f} s (CPU {cpu['vqa']:.0f} s); "
        f"ours: {ours} (val accuracy {val_acc or 'not needed'}); {len(extra)} runs of it added for equal cost")

    task_runs = [Run("full", None)] + [Run(m, E.task_budget) for m in T.methods if m != "full"]
    with clock("captions"):
        cap_recs = _limit(test, E.max_captions)
        cap = sweeper.sweep(make_batches(cap_recs, lambda r: r, None, E.batch_images), task_runs, "caption",
                            answer_tokens(lvlm, [c for r in cap_recs for c in r.captions]), progress=progress)
        metrics[f"caption_cider_{key}"] = caption_scores(cap)
    with clock("grounding"):
        refs = _limit([(r, ref) for r in test for ref in r.refs], E.max_refs)
        ground = sweeper.sweep(make_batches(refs, lambda s: s[0], lambda s: s[1].sentence, E.batch_images),
                               task_runs, "ground", answer_tokens(lvlm, [BOX_ANSWER]), progress=progress)
        metrics[f"grounding_acc50_{key}"] = grounding_scores(ground, lvlm.image_aspect)
    log(f"captions and grounding: {len(task_runs)} runs in {seconds['captions'] + seconds['grounding']:.0f} s")

    with clock("efficiency"):
        eff = efficiency_table(lvlm, items, runs + extra, T, seed=params.seed, log=log)
    cost = cost_table(every, {f"{r.method}@{r.budget}": r.prefill_ms for r in eff.itertuples()}, ours)
    ref = eff[(eff.method == E.reference_method) & (eff.budget == key)]
    metrics[f"prefill_speedup_{key}"] = float(ref["speedup"].iloc[0]) if len(ref) else None
    metrics["selection_overhead_pct"] = float(ref["selection_pct"].iloc[0]) if len(ref) else None
    # The part of it that is CLIP's text tower: on a tiny LM it costs about as much as the LM
    # prefill of the kept tokens; on LLaVA-1.5-7B it is a rounding error.
    metrics["text_encoder_pct"] = float(ref["text_pct"].iloc[0]) if len(ref) else None
    # Selection and merging proper: the overhead without the text tower.
    metrics["selection_merge_pct"] = (round(metrics["selection_overhead_pct"] - metrics["text_encoder_pct"], 3)
                                      if len(ref) else None)
    metrics["reference_method"] = E.reference_method
    metrics["prefill_ms_full"] = float(eff.loc[eff.method == "full", "prefill_ms"].iloc[0])
    metrics["efficiency"] = {f"{r.method}@{r.budget}": {"prefill_ms": r.prefill_ms, "speedup": r.speedup,
                                                        "selection_pct": r.selection_pct, "text_pct": r.text_pct,
                                                        "peak_mb": r.peak_mb}
                             for r in eff.itertuples()}

    with clock("examples"):
        examples = token_examples(lvlm, items, T, seed=params.seed)
    # Wall and process CPU seconds per phase: CPU time stays meaningful on a shared machine.
    metrics["eval_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    metrics["eval_cpu_seconds"] = {k: round(v, 1) for k, v in cpu.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "accuracy.csv") as tmp:
        table.drop(columns="n").to_csv(tmp, index=False)
    with atomic_path(out_dir / "accuracy_by_size.csv") as tmp:
        by_size.to_csv(tmp, index=False)
    with atomic_path(out_dir / "efficiency.csv") as tmp:
        eff.to_csv(tmp, index=False)
    with atomic_path(out_dir / "cost.csv") as tmp:
        cost.to_csv(tmp, index=False)
    with atomic_path(out_dir / "equal_cost.csv") as tmp:
        equal.to_csv(tmp, index=False)
    write_json(out_dir / "examples.json", examples)
    write_json(out_dir / "metrics.json", metrics)
    log("VQA accuracy % (share of full %) · mean visual tokens\n" + summary_table(metrics).to_string())
    if len(equal):
        log(f"{ours} against each peer at equal prefill GFLOPs (diff ± se, points):\n"
            + equal[["peer", "peer_budget", "ours_budget", "gap_pct", "diff", "se", "z"]].to_string(index=False))
    log(f"prefill speedup at {key} ({E.reference_method}): {metrics[f'prefill_speedup_{key}']}, "
        f"selection overhead {metrics['selection_overhead_pct']} % of its prefill "
        f"(text encoder {metrics['text_encoder_pct']} %, selection and merging {metrics['selection_merge_pct']} %)")
    return metrics
