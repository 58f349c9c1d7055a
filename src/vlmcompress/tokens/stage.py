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
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import Processes
from vlmcompress.distributed import current as current_processes
from vlmcompress.eval.tasks import BOX_ANSWER, answer_tokens
from vlmcompress.io import atomic_path, write_json
from vlmcompress.paths import outputs_dir
from vlmcompress.tokens.compare import (caption_scores, choose_ours, cost_table, equal_cost_metrics, equal_cost_runs,
                                        equal_cost_table, grounding_scores, paired_table, size_metrics, vqa_by_size,
                                        vqa_table)
from vlmcompress.tokens.examples import token_examples
from vlmcompress.tokens.sweep import (FULL_KEY, Run, RunOutput, Sweeper, budget_key, efficiency_table, make_batches,
                                      plan_runs, stratified_questions)


def stage_dir():
    return outputs_dir("tokens")


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


def _quiet(*args: Any) -> None:
    """The log of a process other than the main one: the main process speaks for all."""


def _limit(seq: Sequence, n: int) -> list:
    return list(seq[:n]) if n > 0 else list(seq)


def run_tokens_stage(params: Params, splits: dict[str, list[ImageRecord]], log=print,
                     progress: bool = False, procs: Processes | None = None) -> dict[str, Any]:
    """Evaluate every method x budget; write ``outputs/tokens/*``; return the metrics.

    ``procs``: the processes sharing the work (default: this one, or those ``accelerate
    launch`` started). Each evaluates every ``world``-th batch on its own device; prefill
    latency and the token maps are measured by the main process alone, which writes."""
    from vlmcompress.lvlm.load import lvlm_from_params

    procs = procs or current_processes()
    if not procs.is_main:
        log = _quiet
    T, E = params.tokens, params.tokens.eval
    out_dir = stage_dir()
    device = procs.device(params.lvlm.device)
    lvlm = lvlm_from_params(dataclasses.replace(params, lvlm=dataclasses.replace(params.lvlm, device=device)))
    lvlm.attn_layer = T.attention_layer            # the vision layer whose CLS attention scores tokens
    if "fastv" in T.methods and not 1 <= T.fastv.layer <= len(lvlm.language_model.layers):
        raise ValueError(f"tokens.fastv.layer: must be in [1, {len(lvlm.language_model.layers)}] "
                         f"for this LM, got {T.fastv.layer}")
    test = splits["test"]
    runs = plan_runs(T)
    sweeper = Sweeper(lvlm, T, seed=params.seed, procs=procs)
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

    with clock("efficiency"):     # one process times the prefills: concurrent ones would share its cores
        eff = procs.from_main(efficiency_table(lvlm, items, runs + extra, T, seed=params.seed, log=log)
                              if procs.is_main else None)
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

    metrics["processes"] = procs.world
    metrics["batches_per_process"] = procs.gather(sweeper.batches_run)
    if not procs.is_main:
        return procs.from_main(None)     # the main process's metrics, once it has written them
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
    return procs.from_main(metrics)
