"""Runs of the token-compression evaluation: what is run and how.

A :class:`Run` is a method at a budget; :func:`plan_runs` lists them from the params.
:func:`stratified_questions` picks the questions, :func:`make_batches` groups samples by image,
and :class:`Sweeper` runs every configuration over the batches with one vision-tower pass per
batch, recording answers, visual tokens and prefill GFLOPs per sample (:class:`RunOutput`).
:func:`efficiency_table` measures the prefill latency and memory of the runs.
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlmcompress.data.records import ImageRecord, Question
from vlmcompress.distributed import Processes, merge_shards
from vlmcompress.eval.tasks import load_image
from vlmcompress.tokens.config import TokensParams
from vlmcompress.tokens.flops import model_dims, prefill_gflops
from vlmcompress.tokens.methods import ADAPTIVE
from vlmcompress.tokens.patch import TEXT_GUIDED, TextEmbeddingCache, make_transform
from vlmcompress.tokens.timing import measure_prefills

# The budget key of the run that keeps every token.
FULL_KEY = "1.00"


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
    """Samples about a few images: ``records`` (U images), ``index [B]`` (image of each sample),
    ``texts`` (question of each sample, None for captions). ``images`` reads the U images
    (``[3, H, W]``, sizes may differ) when asked, so a sweep holds one batch of pixels at a time."""

    records: list[ImageRecord]
    index: list[int]
    texts: list[str] | None
    samples: list[Any]
    load: Callable[[ImageRecord], torch.Tensor] = field(default=lambda r: load_image(r.path), repr=False)

    @property
    def images(self) -> list[torch.Tensor]:
        return [self.load(r) for r in self.records]


def make_batches(samples: Sequence[Any], record_of: Callable[[Any], ImageRecord], text_of, n_images: int,
                 load: Callable[[ImageRecord], torch.Tensor] = lambda r: load_image(r.path)) -> list[Batch]:
    """Consecutive samples grouped so each batch holds ``n_images`` distinct images (read
    by ``load`` when the batch is run)."""
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
        out.append(Batch(recs, [first[record_of(s).image_id] for s in g],
                         None if text_of is None else [text_of(s) for s in g], list(g), load))
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
    seconds: float = 0.0          # wall time in generate (tower pass excluded: shared by all runs),
    cpu_seconds: float = 0.0      # and process CPU time of the same, summed over processes

    def extend(self, other: RunOutput) -> None:
        """Append ``other``'s samples (the next batches) to this output."""
        for name in ("samples", "answers", "tokens", "gflops", "lm_gflops", "n_text", "n_clip"):
            getattr(self, name).extend(getattr(other, name))
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds


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
    """Runs every configuration over batches, sharing the tower pass and text embeddings.

    With several processes (``procs``) each runs every ``world``-th batch and the outputs are
    gathered in batch order: every process returns what one process would (a batch's result
    depends only on the batch and its index, which seeds the random methods)."""

    def __init__(self, lvlm: Any, params: TokensParams, seed: int = 0, procs: Processes = Processes()) -> None:
        self.lvlm, self.params, self.seed, self.procs = lvlm, params, seed, procs
        self.batches_run = 0          # by this process, over every sweep
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

        mine = self.procs.shard(len(batches))
        self.batches_run += len(mine)
        parts = [(bi, self._run_batch(bi, batches[bi], runs, task, max_new_tokens))
                 for bi in tqdm(mine, disable=not progress or not self.procs.is_main, desc=task)]
        out = {r: RunOutput() for r in runs}
        for part in merge_shards(self.procs.gather(parts)):
            for run in runs:
                out[run].extend(part[run])
        return out

    def _run_batch(self, bi: int, batch: Batch, runs: Sequence[Run], task: str, max_new_tokens: int
                   ) -> dict[Run, RunOutput]:
        """Every run on batch ``bi``: one tower pass, then each run's generation."""
        lv = self.lvlm
        n = len(batch.index)
        texts = batch.texts if batch.texts is not None else [""] * n
        n_text = lv.prompt_lengths(task, texts)
        guide = lv.transform_texts(task, texts)
        n_clip = [len(ids) for ids in lv.clip_tokenizer(guide, truncation=True).input_ids]
        with torch.inference_mode():
            feats = lv.visual_features(batch.images)
        out = {}
        for run in runs:
            tr = make_transform(lv, run.method, run.budget, self.params, seed=self.seed * 100_003 + bi,
                                text_encoder=self.text_cache)
            t0, c0 = time.perf_counter(), time.process_time()
            answers = lv.generate_from_features(feats, batch.texts, task=task, transform=tr,
                                                max_new_tokens=max_new_tokens, image_index=batch.index)
            counts = _visual_counts(tr, n, batch.index, self.n_patches)
            g = [self.gflops(run, k, t, c) for k, t, c in zip(counts, n_text, n_clip)]
            out[run] = RunOutput(samples=list(batch.samples), answers=list(answers), tokens=list(counts),
                                 gflops=[x["total"] for x in g], lm_gflops=[x["lm"] for x in g],
                                 n_text=list(n_text), n_clip=list(n_clip),
                                 seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
        return out

    def mean_gflops(self, run: Run, n_visual: int, n_text: Sequence[int], n_clip: Sequence[int]) -> float:
        """Mean prefill GFLOPs of ``run`` keeping ``n_visual`` tokens on questions with these prompt
        lengths (what a fixed-count run of a pre-LM method will cost, before running it)."""
        return float(np.mean([self.gflops(run, n_visual, t, c)["total"] for t, c in zip(n_text, n_clip)]))


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
