"""The token-compression stage (``05_eval_tokens``): every method at every budget on the test split.

One pass over the test images does all the work: each batch of images goes through the vision
tower once, and then through every (method, budget) run — full, the fixed budgets, the adaptive
modes, FastV inside the LM. Questions are a type-stratified subset (``tokens.eval.max_questions``),
at most one question of each type per image, so several questions share an image (one tower
pass, and for methods that ignore the question one compression and one prefill of the image
prefix). Grounding runs for every method at every budget (and the task budget): a box answer
is a few tokens, so it is cheap. Captions (CIDEr) run at ``tokens.eval.task_budget`` only (and
full): their long generations are costly. Prefill latency, selection overhead and peak memory
are measured for every run on a small fixed batch.

Our method is chosen on the validation split (``tokens.eval.ours``: the candidate with the best
mean accuracy over the budgets on ``val_questions`` questions); the test split is then reported
once. Methods are compared at equal prefill cost as well as at equal token count: each peer
run is paired with the run of ours whose prefill GFLOPs per question is nearest, and where none
is within ``cost_tolerance`` a run of ours at the token count the FLOPs formula solves for is
added; the paired per-question difference and its standard error judge the gap.

Writes ``outputs/tokens/``:

* ``metrics.json``: flat headline numbers, each a number, a string or null — ``full_acc``,
  ``vqa_questions``, ``n_visual_tokens``, ``task_budget``; ``ours``, ``ours_val_acc``,
  ``val_questions``; at the task budget ``ours_acc``, ``ours_rel_acc``, ``best_peer``,
  ``best_peer_acc``, ``ours_minus_best_peer`` and ``ours_minus_best_peer_se`` (paired, at equal
  prefill cost); ``cost_tolerance``; for ``reference_method`` at the task budget
  ``prefill_speedup_<task budget>``, ``selection_overhead_pct`` (CLIP text tower included),
  ``text_encoder_pct`` and ``selection_merge_pct`` (without it); ``prefill_ms_full``;
  ``processes`` and ``batches_per_process`` (a string: the batch count of each process, by
  rank, comma-separated); ``eval_seconds`` and ``eval_cpu_seconds`` (every phase, main process);
* ``accuracy.csv``: method, budget, mean_tokens, question_type (``all`` for overall), acc;
* ``accuracy_by_size.csv``: method, budget, size of the objects a question names, acc, n;
* ``cost.csv``: every run, the added ones too — method, budget, tokens, gflops, lm_gflops,
  latency_ms, accuracy, rel_acc (share of the full model's), ours, planned (False: added for
  equal cost);
* ``equal_cost.csv``: ours against each peer run at equal cost — budgets, tokens, GFLOPs,
  gap_pct, matched, diff, se, z, n;
* ``paired.csv``: each text-guided method minus every other at the task budget — method,
  other, budget, diff, se, n;
* ``tasks.csv``: captions and grounding at the task budget — method, budget, caption_cider,
  grounding_acc50;
* ``grounding.csv``: grounding at every budget — method, budget, tokens (mean kept),
  kept_fraction, grounding_acc50, grounding_miou, n (NaN scores without referring expressions);
* ``candidates.csv``: the candidates for ours — method, val_acc, chosen;
* ``efficiency.csv``: measured prefill per run — prefill_ms, speedup, selection_pct, text_pct,
  peak_mb;
* ``seconds.csv``: wall and process-CPU seconds (main process) — kind (``phase``, or
  ``method``: its VQA generation), name, seconds, cpu_seconds;
* ``examples.json``: token maps of a few test questions, for figures.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from vlmcompress.config import Params
from vlmcompress.data.records import ImageRecord
from vlmcompress.distributed import Processes
from vlmcompress.distributed import current as current_processes
from vlmcompress.eval.tasks import BOX_ANSWER, answer_tokens
from vlmcompress.io import atomic_path, write_json
from vlmcompress.paths import outputs_dir
from vlmcompress.tokens.compare import (candidates_table, choose_ours, cost_table, equal_cost_runs, equal_cost_table,
                                        grounding_table, headline_at, paired_table, task_table, vqa_by_size,
                                        vqa_table)
from vlmcompress.tokens.examples import token_examples
from vlmcompress.tokens.sweep import (FULL_KEY, Run, RunOutput, Sweeper, budget_key, efficiency_table, make_batches,
                                      plan_runs, stratified_questions)


def stage_dir():
    return outputs_dir("tokens")


def summary_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Method x budget from ``cost.csv`` (its planned runs; ``budget`` as strings):
    ``acc (rel %) · tokens`` cells, the full model in column ``1.00``."""
    planned = cost[cost["planned"].astype(str) == "True"]
    keys = list(dict.fromkeys(planned["budget"]))
    numeric = sorted((k for k in keys if k not in ("adaptive", FULL_KEY)), key=float)
    cols = numeric + (["adaptive"] if "adaptive" in keys else []) + [FULL_KEY]

    def cell(r: pd.Series) -> str:
        rel = "–" if pd.isna(r["rel_acc"]) else f"{r['rel_acc']:.0f}"
        return f"{r['accuracy']:.1f} ({rel}) · {r['tokens']:.0f}"

    rows: dict[str, dict[str, str]] = {}
    for _, r in planned.iterrows():
        rows.setdefault(r["method"], {c: "" for c in cols})[r["budget"]] = cell(r)
    return pd.DataFrame(rows).T[cols]


def seconds_table(wall: dict[str, float], cpu: dict[str, float], outputs: dict[Run, RunOutput]) -> pd.DataFrame:
    """Wall and process-CPU seconds of each phase, then of each method's VQA generation
    (summed over its runs in ``outputs``)."""
    rows = [{"kind": "phase", "name": k, "seconds": round(v, 1), "cpu_seconds": round(cpu.get(k, 0.0), 1)}
            for k, v in wall.items()]
    for m in dict.fromkeys(r.method for r in outputs):
        mine = [o for r, o in outputs.items() if r.method == m]
        rows.append({"kind": "method", "name": m, "seconds": round(sum(o.seconds for o in mine), 1),
                     "cpu_seconds": round(sum(o.cpu_seconds for o in mine), 1)})
    return pd.DataFrame(rows, columns=["kind", "name", "seconds", "cpu_seconds"])


def prefill_headline(eff: pd.DataFrame, method: str, key: str) -> dict[str, float | None]:
    """Measured prefill of ``method`` at budget ``key`` (from the efficiency table): its speedup
    over all tokens, its selection overhead (% of its prefill, CLIP text tower included), the
    text tower's part and the rest (selection and merging proper); the full model's prefill ms.
    None where that run was not measured."""
    ref = eff[(eff["method"] == method) & (eff["budget"] == key)]
    full = eff.loc[eff["method"] == "full", "prefill_ms"]
    if not len(ref):
        return {f"prefill_speedup_{key}": None, "selection_overhead_pct": None, "text_encoder_pct": None,
                "selection_merge_pct": None, "prefill_ms_full": float(full.iloc[0]) if len(full) else None}
    r = ref.iloc[0]
    # On a tiny LM CLIP's text tower costs about as much as the LM prefill of the kept tokens;
    # on LLaVA-1.5-7B it is a rounding error: the two parts are reported apart.
    return {f"prefill_speedup_{key}": float(r["speedup"]), "selection_overhead_pct": float(r["selection_pct"]),
            "text_encoder_pct": float(r["text_pct"]),
            "selection_merge_pct": round(float(r["selection_pct"]) - float(r["text_pct"]), 3),
            "prefill_ms_full": float(full.iloc[0]) if len(full) else None}


def grounding_runs(methods: Sequence[str], budgets: Sequence[int | float], task_budget: float) -> list[Run]:
    """``full``, then each method at each budget and at ``task_budget`` (once if it is one of
    them; a count 1 and the fraction 1.0 are different budgets)."""
    keys = list(dict.fromkeys((type(b), b) for b in [*budgets, task_budget]))
    return [Run("full", None)] + [Run(m, b) for m in methods if m != "full" for _, b in keys]


def _write_csv(table: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


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
                     progress: bool = False, procs: Processes | None = None) -> dict[str, Any]:
    """Evaluate every method x budget; write ``outputs/tokens/*``; return the metrics.

    ``procs``: the processes sharing the work (default: this one, or those ``accelerate
    launch`` started). Each evaluates every ``world``-th batch on its own device; prefill
    latency and the token maps are measured by the main process alone, which writes."""
    from vlmcompress.lvlm.load import lvlm_from_params

    procs = procs or current_processes()
    log = procs.main_log(log)
    T, E = params.tokens, params.tokens.eval
    out_dir = stage_dir()
    device = procs.device(params.lvlm.device)
    lvlm = lvlm_from_params(params, device=device)
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
    by_size = vqa_by_size(vqa)
    paired = paired_table(vqa, key)
    log(f"VQA: {len(items)} questions, {len(runs)} runs in {seconds['vqa']:.0f} s (CPU {cpu['vqa']:.0f} s); "
        f"ours: {ours} (val accuracy {val_acc or 'not needed'}); {len(extra)} runs of it added for equal cost")

    task_runs = [Run("full", None)] + [Run(m, E.task_budget) for m in T.methods if m != "full"]
    with clock("captions"):
        cap_recs = _limit(test, E.max_captions)
        cap = sweeper.sweep(make_batches(cap_recs, lambda r: r, None, E.batch_images), task_runs, "caption",
                            answer_tokens(lvlm, [c for r in cap_recs for c in r.captions]), progress=progress)
    ground_runs = grounding_runs(T.methods, T.budgets, E.task_budget)
    with clock("grounding"):
        refs = _limit([(r, ref) for r in test for ref in r.refs], E.max_refs)
        ground = sweeper.sweep(make_batches(refs, lambda s: s[0], lambda s: s[1].sentence, E.batch_images),
                               ground_runs, "ground", answer_tokens(lvlm, [BOX_ANSWER]), progress=progress)
        tasks = task_table(cap, ground, lvlm.image_aspect)
        grounding = grounding_table(ground, sweeper.n_patches, lvlm.image_aspect)
    log(f"captions: {len(task_runs)} runs in {seconds['captions']:.0f} s; grounding: {len(refs)} referring "
        f"expressions, {len(ground_runs)} runs in {seconds['grounding']:.0f} s")

    with clock("efficiency"):     # one process times the prefills: concurrent ones would share its cores
        eff = procs.from_main(efficiency_table(lvlm, items, runs + extra, T, seed=params.seed, log=log)
                              if procs.is_main else None)
    cost = cost_table(every, {f"{r.method}@{r.budget}": r.prefill_ms for r in eff.itertuples()}, ours, extra)
    full = cost[cost["method"] == "full"].iloc[0]
    metrics: dict[str, Any] = {
        "full_acc": float(full["accuracy"]), "vqa_questions": len(vqa[Run("full", None)].answers),
        "n_visual_tokens": sweeper.n_patches, "task_budget": key,
        "ours": ours, "ours_val_acc": val_acc.get(ours) if ours else None, "val_questions": len(val_items),
        **headline_at(cost, equal, ours, key), "cost_tolerance": E.cost_tolerance,
        "reference_method": E.reference_method, **prefill_headline(eff, E.reference_method, key),
        "processes": procs.world,
        "batches_per_process": ",".join(map(str, procs.gather(sweeper.batches_run))),
    }
    if not procs.is_main:
        return procs.from_main(None)     # the main process's metrics, once it has written them
    with clock("examples"):
        examples = token_examples(lvlm, items, T, seed=params.seed)
    # Wall and process CPU seconds: CPU time stays meaningful on a shared machine.
    metrics["eval_seconds"] = round(sum(seconds.values()), 1)
    metrics["eval_cpu_seconds"] = round(sum(cpu.values()), 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, t in (("accuracy", table.drop(columns="n")), ("accuracy_by_size", by_size), ("efficiency", eff),
                    ("cost", cost), ("equal_cost", equal), ("paired", paired), ("tasks", tasks),
                    ("grounding", grounding),
                    ("candidates", candidates_table(candidates, val_acc, ours)),
                    ("seconds", seconds_table(seconds, cpu, vqa))):
        _write_csv(t, out_dir / f"{name}.csv")
    write_json(out_dir / "examples.json", examples)
    write_json(out_dir / "metrics.json", metrics)
    log("VQA accuracy % (share of full %) · mean visual tokens\n" + summary_table(cost).to_string())
    if len(equal):
        log(f"{ours} against each peer at equal prefill GFLOPs (diff ± se, points):\n"
            + equal[["peer", "peer_budget", "ours_budget", "gap_pct", "diff", "se", "z"]].to_string(index=False))
    log(f"prefill speedup at {key} ({E.reference_method}): {metrics[f'prefill_speedup_{key}']}, "
        f"selection overhead {metrics['selection_overhead_pct']} % of its prefill "
        f"(text encoder {metrics['text_encoder_pct']} %, selection and merging {metrics['selection_merge_pct']} %)")
    return procs.from_main(metrics)
