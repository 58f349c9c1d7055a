"""The 05_eval_tokens stage on a tiny random model and tiny scenes, in a throw-away project root."""
from __future__ import annotations

import csv
import math
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from lvlm_helpers import TINY, save_tiny_lvlm, with_lm
from vlmcompress.config import Params, from_dict, to_dict
from vlmcompress.data.records import ImageRecord, ObjectAnn, Question
from vlmcompress.tokens.compare import GROUNDING_COLUMNS, object_size, paired_difference, vqa_by_size
from vlmcompress.tokens.stage import grounding_runs, run_tokens_stage
from vlmcompress.tokens.sweep import FULL_KEY, Run, RunOutput, budget_key, plan_runs, stratified_questions
from vlmcompress.tokens.methods import ADAPTIVE
from vlmcompress.tokens.types import KIND_NAMES

# metrics.json: flat headline numbers (the tables are CSVs beside it).
HEADLINE = {"full_acc", "vqa_questions", "n_visual_tokens", "task_budget", "ours", "ours_val_acc", "val_questions",
            "ours_acc", "ours_rel_acc", "best_peer", "best_peer_acc", "ours_minus_best_peer",
            "ours_minus_best_peer_se", "cost_tolerance", "reference_method", "prefill_speedup_0.10",
            "selection_overhead_pct", "text_encoder_pct", "selection_merge_pct", "prefill_ms_full", "processes",
            "batches_per_process", "eval_seconds", "eval_cpu_seconds"}
PHASES = {"val", "vqa", "equal_cost", "captions", "grounding", "efficiency", "examples"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def planned_runs(out: Path) -> dict[str, dict[str, dict[str, str]]]:
    """``method -> budget -> cost.csv row`` of the planned runs (the full model included)."""
    runs: dict[str, dict[str, dict[str, str]]] = {}
    for r in read_rows(out / "cost.csv"):
        if r["planned"] == "True":
            runs.setdefault(r["method"], {})[r["budget"]] = r
    return runs


def paired_names(out: Path) -> set[str]:
    """``"A - B"`` for each row of paired.csv."""
    return {f"{r['method']} - {r['other']}" for r in read_rows(out / "paired.csv")}


def test_budget_keys():
    assert [budget_key(b) for b in (0.05, 0.1, 0.25, 0.5, None, 64, 0.125)] == \
        ["0.05", "0.10", "0.25", "0.50", "adaptive", "64", "0.125"]
    assert Run("full", None).key == FULL_KEY and Run("recoverable", None).key == "adaptive"


def test_plan_runs_full_first_then_budgets_and_adaptive_modes(params):
    runs = plan_runs(params.tokens)
    assert runs[0] == Run("full", None)
    labels = {r.label for r in runs}
    for m in params.tokens.methods:
        if m != "full":
            assert {f"{m}@{k}" for k in ("0.05", "0.10", "0.25", "0.50")} <= labels
    assert {r.method for r in runs if r.budget is None and r.method != "full"} == \
        {"prumerge", "prumerge_plus", "recoverable", "recoverable_spread"}
    assert len(labels) == len(runs)


def _records(n_images: int, types=("color", "shape", "count")) -> list[ImageRecord]:
    recs = []
    for i in range(n_images):
        qs = tuple(Question(100 * i + j, f"q{j}", "a", ("a",), types[j % len(types)], "other")
                   for j in range(2 * len(types)))
        recs.append(ImageRecord(i, Path(f"{i}.png"), 8, 8, questions=qs))
    return recs


def test_grounding_runs_every_method_at_every_budget_and_the_task_budget():
    runs = grounding_runs(["full", "random", "fastv"], [0.05, 0.10, 1], 0.10)
    assert [r.label for r in runs] == ["full@1.00", "random@0.05", "random@0.10", "random@1", "fastv@0.05",
                                       "fastv@0.10", "fastv@1"]          # the task budget once; 1 token kept
    assert [r.label for r in grounding_runs(["random"], [0.5], 0.10)] == ["full@1.00", "random@0.50", "random@0.10"]


def test_stratified_questions_keep_type_shares_and_spread_over_images():
    recs = _records(20)
    items = stratified_questions(recs, 30, seed=1)
    assert len(items) == 30 and len({q.question_id for _, q in items}) == 30
    assert Counter(q.question_type for _, q in items) == {"color": 10, "shape": 10, "count": 10}
    per_image = Counter((r.image_id, q.question_type) for r, q in items)
    assert max(per_image.values()) == 1                       # one question per type per image
    ids = [r.image_id for r, _ in items]
    assert ids == sorted(ids, key=ids.index)                  # grouped by image
    assert stratified_questions(recs, 30, seed=1) == items    # seeded
    # More than one question per type per image once the images run out.
    many = stratified_questions(_records(3), 15, seed=0)
    assert Counter(q.question_type for _, q in many) == {"color": 5, "shape": 5, "count": 5}
    assert len(stratified_questions(recs, 0)) == 120


def _tiny_project(project_root: Path, params: Params, tiny_scenes, **tokens) -> Params:
    """Tiny scenes + a tiny random 3-layer LM in the places the stage reads them from."""
    from vlmcompress.data.stage import run_data_stage

    p = to_dict(params)
    p["data"]["scenes"] = to_dict(dataclasses.replace(tiny_scenes, n_train=2, n_val=2, n_test=4))
    p["tokens"]["fastv"]["layer"] = 2
    p["tokens"]["eval"].update(max_questions=12, batch_images=2, max_captions=1, max_refs=2, examples=1,
                               bench_repeats=1, bench_batch=2)
    for key, value in tokens.items():
        if isinstance(value, dict):
            p["tokens"][key].update(value)
        else:
            p["tokens"][key] = value
    P = from_dict(Params, p)
    run_data_stage(P)
    save_tiny_lvlm(project_root / "outputs" / "lvlm" / "model", with_lm(TINY, lm_layers=3))
    (project_root / "params.yaml").write_text(yaml.safe_dump(to_dict(P)))
    return P


@pytest.fixture
def tiny_project(project_root, params, tiny_scenes) -> Params:
    return _tiny_project(project_root, params, tiny_scenes, methods=["full", "random", "prumerge", "recoverable", "fastv"],
                         budgets=[0.10, 0.25], eval={"example_methods": ["full", "random", "recoverable"]})


def check_contract(P: Params, metrics: dict, root: Path, budgets: tuple[str, ...]) -> None:
    """Everything the figures stage, the README script and ``dvc metrics`` / ``dvc plots`` read
    from ``outputs/tokens``."""
    out = root / "outputs" / "tokens"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert set(metrics) == HEADLINE
    assert all(v is None or isinstance(v, (int, float, str)) for v in metrics.values())      # flat
    assert isinstance(metrics["full_acc"], float) and metrics["vqa_questions"] == 12
    assert metrics["n_visual_tokens"] == 16 and metrics["task_budget"] == "0.10"
    methods = [m for m in P.tokens.methods if m != "full"]
    runs = planned_runs(out)
    full = runs.pop("full")["1.00"]
    assert float(full["tokens"]) == 16 and float(full["accuracy"]) == metrics["full_acc"]
    assert set(runs) == set(methods)
    for m in methods:
        keys = set(budgets) | ({"adaptive"} if P.tokens.adaptive and m in ADAPTIVE else set())
        assert set(runs[m]) == keys, m
        for r in runs[m].values():
            assert 0 <= float(r["accuracy"]) <= 100 and float(r["gflops"]) > 0
            assert r["rel_acc"] == ("" if metrics["full_acc"] == 0 else
                                    str(round(100 * float(r["accuracy"]) / metrics["full_acc"], 2)))
        # 10% of 16 tokens = 2 (pooling: the largest grid with <= 2 cells, 1 x 2)
        at10 = runs[m]["0.10"]
        assert float(at10["tokens"]) == 2, m
        assert 0 < float(at10["lm_gflops"]) < float(full["lm_gflops"]) < float(full["gflops"])
        assert float(at10["gflops"]) < float(full["gflops"])
    for key in ("prefill_speedup_0.10", "selection_overhead_pct", "prefill_ms_full"):
        assert isinstance(metrics[key], float) and metrics[key] > 0
    assert metrics["selection_merge_pct"] == pytest.approx(metrics["selection_overhead_pct"] - metrics["text_encoder_pct"],
                                                           abs=1e-3) and 0 < metrics["selection_merge_pct"]
    assert metrics["processes"] == 1 and int(metrics["batches_per_process"]) > 0
    tasks = read_rows(out / "tasks.csv")
    assert list(tasks[0]) == ["method", "budget", "caption_cider", "grounding_acc50"]
    assert {(r["method"], r["budget"]) for r in tasks} == {("full", "1.00")} | {(m, "0.10") for m in methods}
    assert all(float(r["caption_cider"]) >= 0 for r in tasks)
    assert all(r["grounding_acc50"] == "" or 0 <= float(r["grounding_acc50"]) <= 100 for r in tasks)
    check_grounding(methods, budgets, out, tasks)

    rows = read_rows(out / "accuracy.csv")
    assert list(rows[0]) == ["method", "budget", "mean_tokens", "question_type", "acc"]
    overall = {(r["method"], r["budget"]): float(r["acc"]) for r in rows if r["question_type"] == "all"}
    assert overall[("full", "1.00")] == metrics["full_acc"]
    assert overall[("recoverable", "adaptive")] == float(runs["recoverable"]["adaptive"]["accuracy"])
    assert {r["question_type"] for r in rows} > {"all"}

    sized = read_rows(out / "accuracy_by_size.csv")
    assert list(sized[0]) == ["method", "budget", "size", "acc", "n"]
    assert sum(int(r["n"]) for r in sized if r["method"] == "full") == metrics["vqa_questions"]
    assert {r["size"] for r in sized} <= {"small", "large", "none"}
    paired = read_rows(out / "paired.csv")
    assert list(paired[0]) == ["method", "other", "budget", "diff", "se", "n"]
    assert "recoverable - random" in paired_names(out) and "recoverable - recoverable" not in paired_names(out)
    assert all(int(r["n"]) == metrics["vqa_questions"] and r["budget"] == "0.10" for r in paired)

    seconds = read_rows(out / "seconds.csv")
    assert list(seconds[0]) == ["kind", "name", "seconds", "cpu_seconds"]
    phases = {r["name"]: float(r["seconds"]) for r in seconds if r["kind"] == "phase"}
    assert set(phases) == PHASES and {r["name"] for r in seconds if r["kind"] == "method"} == {"full", *methods}
    assert metrics["eval_seconds"] == pytest.approx(sum(phases.values()), abs=0.1 * len(phases))

    examples = json.loads((out / "examples.json").read_text())
    assert len(examples) == P.tokens.eval.examples
    for ex in examples:
        # relative to the project root: the outputs stay valid when copied to another checkout
        assert not Path(ex["image"]).is_absolute() and (root / ex["image"]).is_file()
        assert ex["question"] and ex["answer"] and ex["grid"] == [4, 4]
        assert set(ex["methods"]) == set(P.tokens.eval.example_methods)
        for res in ex["methods"].values():
            assert len(res["cells"]) == 16 and set(res["cells"]) <= set(KIND_NAMES)
            assert isinstance(res["prediction"], str)
        assert ex["methods"]["full"]["cells"] == [1] * 16
        assert sum(c in (1, 2) for c in ex["methods"]["random"]["cells"]) == 2
    eff = (out / "efficiency.csv").read_text().splitlines()
    assert eff[0].split(",")[:3] == ["method", "budget", "prefill_ms"]
    assert len(eff) == 1 + len(read_rows(out / "cost.csv"))
    check_cost(P, metrics, out)


def check_grounding(methods: list[str], budgets: tuple[str, ...], out: Path, tasks: list[dict[str, str]]) -> None:
    """grounding.csv: every method at every budget and the full model, on the same referring
    expressions; its task-budget rows agree with tasks.csv."""
    ground = read_rows(out / "grounding.csv")
    assert list(ground[0]) == GROUNDING_COLUMNS
    assert [(r["method"], r["budget"]) for r in ground] == \
        [("full", "1.00")] + [(m, b) for m in methods for b in budgets]
    n = {int(r["n"]) for r in ground}
    assert len(n) == 1 and n.pop() > 0                                  # tiny scenes have referring expressions
    row = {(r["method"], r["budget"]): r for r in ground}
    assert float(row[("full", "1.00")]["tokens"]) == 16 and float(row[("full", "1.00")]["kept_fraction"]) == 1.0
    for m in methods:
        assert float(row[(m, "0.10")]["kept_fraction"]) == 2 / 16, m  # 10 % of 16 tokens = 2
    for r in ground:
        assert 0 <= float(r["grounding_acc50"]) <= 100 and 0 <= float(r["grounding_miou"]) <= 1
    for t in tasks:
        assert t["grounding_acc50"] == row[(t["method"], t["budget"])]["grounding_acc50"]


def check_cost(P: Params, metrics: dict, out: Path) -> None:
    """cost.csv: every run (planned and added for equal cost) with its GFLOPs, latency and
    accuracy; equal_cost.csv: ours against every peer run at the nearest prefill cost; the
    headline numbers at the task budget drawn from both."""
    cost = read_rows(out / "cost.csv")
    assert list(cost[0]) == ["method", "budget", "tokens", "gflops", "lm_gflops", "latency_ms", "accuracy", "rel_acc",
                             "ours", "planned"]
    ours = metrics["ours"]
    assert ours in P.tokens.eval.ours and ours in P.tokens.methods
    planned = {f"{r['method']}@{r['budget']}" for r in cost if r["planned"] == "True"}
    added = [f"{r['method']}@{r['budget']}" for r in cost if r["planned"] == "False"]
    assert planned == {r.label for r in plan_runs(P.tokens)} and not planned & set(added)
    assert all(e.startswith(f"{ours}@") and e.split("@")[1].isdigit() for e in added)
    row = {(r["method"], r["budget"]): r for r in cost}
    assert all(float(r["latency_ms"]) > 0 and float(r["gflops"]) > float(r["lm_gflops"]) > 0 for r in cost)
    assert {r["method"] for r in cost if r["ours"] == "True"} == {ours}
    # FastV keeps every token for its first K layers: dearer than a pre-LM method at the same count.
    fastv, rand = row[("fastv", "0.10")], row[("random", "0.10")]
    assert float(fastv["tokens"]) == float(rand["tokens"]) == 2
    assert float(fastv["gflops"]) > float(rand["gflops"])

    eq = read_rows(out / "equal_cost.csv")
    peers = [r for r in plan_runs(P.tokens) if r.method not in ("full", ours)]
    assert [(r["peer"], r["peer_budget"]) for r in eq] == [(r.method, r.key) for r in peers]
    mine = {b: float(r["gflops"]) for (m, b), r in row.items() if m == ours}
    for r in eq:
        target = float(r["peer_gflops"])
        assert float(row[(r["peer"], r["peer_budget"])]["gflops"]) == target
        # the run of ours nearest the peer's cost, and matched iff within the tolerance
        assert abs(mine[r["ours_budget"]] - target) == min(abs(g - target) for g in mine.values())
        assert (r["matched"] == "True") == (abs(float(r["gap_pct"])) <= 100 * P.tokens.eval.cost_tolerance)

    # The headline at the task budget: ours, the most accurate peer, ours minus it at equal cost.
    at = {m: float(r["accuracy"]) for (m, b), r in row.items() if b == "0.10" and r["planned"] == "True"}
    assert metrics["ours_acc"] == at[ours]
    assert metrics["ours_rel_acc"] == (float(row[(ours, "0.10")]["rel_acc"]) if metrics["full_acc"] else None)
    best = max((m for m in at if m != ours), key=lambda m: at[m])
    assert metrics["best_peer_acc"] == at[best] and at[metrics["best_peer"]] == at[best]
    pair = next(r for r in eq if r["peer"] == metrics["best_peer"] and r["peer_budget"] == "0.10")
    assert metrics["ours_minus_best_peer"] == float(pair["diff"])
    assert metrics["ours_minus_best_peer_se"] == float(pair["se"])
    chosen = read_rows(out / "candidates.csv")
    assert [r["method"] for r in chosen if r["chosen"] == "True"] == [ours]


def test_stage_writes_the_metrics_contract(tiny_project, project_root):
    from vlmcompress.data.dataset import load_all

    logged: list[str] = []
    metrics = run_tokens_stage(tiny_project, load_all(), log=logged.append)
    check_contract(tiny_project, metrics, project_root, ("0.10", "0.25"))
    assert any("VQA accuracy" in line and "recoverable" in line for line in logged)


@pytest.mark.slow
def test_notebook_runs_every_method_end_to_end(project_root, params, tiny_scenes):
    """05_eval_tokens through papermill, every method at two budgets, in a throw-away root."""
    import nbformat
    import papermill

    P = _tiny_project(project_root, params, tiny_scenes, budgets=[0.10, 0.5])
    out = project_root / "outputs" / "notebooks" / "05_eval_tokens.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    papermill.execute_notebook(str(repo / "notebooks" / "05_eval_tokens.ipynb"), str(out),
                               parameters={"params_path": str(project_root / "params.yaml")},
                               kernel_name="python3", cwd=str(project_root), progress_bar=False)
    metrics = json.loads((project_root / "outputs" / "tokens" / "metrics.json").read_text())
    check_contract(P, metrics, project_root, ("0.10", "0.50"))
    images = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])
              if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 2                                     # accuracy curves and token maps


def test_stage_rejects_a_fastv_layer_deeper_than_the_lm(tiny_project):
    from vlmcompress.data.dataset import load_all

    P = dataclasses.replace(tiny_project, tokens=dataclasses.replace(
        tiny_project.tokens, fastv=dataclasses.replace(tiny_project.tokens.fastv, layer=9)))
    with pytest.raises(ValueError, match=r"tokens\.fastv\.layer: must be in \[1, 3\]"):
        run_tokens_stage(P, load_all())


def test_make_batches_groups_images_and_keeps_each_sample_with_its_image():
    import torch

    from vlmcompress.tokens.sweep import make_batches

    recs = _records(5)
    samples = [(recs[i], f"s{k}") for k, i in enumerate([0, 0, 1, 2, 1, 3, 4, 0])]
    batches = make_batches(samples, lambda s: s[0], lambda s: s[1], 2,
                           load=lambda r: torch.full((3, 2, 2), float(r.image_id)))
    assert [[r.image_id for r in b.records] for b in batches] == [[0, 1], [2, 3], [4]]
    for b in batches:
        assert b.texts == [s[1] for s in b.samples]
        for s, i in zip(b.samples, b.index):
            assert b.records[i] is s[0] and float(b.images[i][0, 0, 0]) == s[0].image_id
    assert sorted(s[1] for b in batches for s in b.samples) == sorted(s[1] for s in samples)


def _obj(i: int, color: str, shape: str, size: str) -> ObjectAnn:
    return ObjectAnn(i, shape, (0.0, 0.0, 1.0, 1.0), {"color": color, "shape": shape, "size": size})


def _q(text: str, answer: str, qtype: str) -> Question:
    return Question(1, text, answer, (answer,) * 10, qtype, "other")


def test_object_size_classes_the_objects_a_question_names():
    rec = ImageRecord(1, Path("x.png"), 8, 8, objects=(_obj(1, "red", "circle", "small"),
                                                       _obj(2, "blue", "circle", "large"),
                                                       _obj(3, "green", "cross", "large")))
    assert object_size(rec, _q("how many circles are there?", "2", "count")) == "small"   # one of them small
    assert object_size(rec, _q("what shape is the green object?", "cross", "shape")) == "large"
    assert object_size(rec, _q("is there a red cross?", "no", "exists")) == "none"
    assert object_size(dataclasses.replace(rec, objects=(ObjectAnn(1, "dog", (0, 0, 1, 1)),)),
                       _q("what color is the dog?", "brown", "color")) is None            # VQAv2: no sizes


def test_vqa_by_size_scores_each_size_class():
    small = ImageRecord(1, Path("a.png"), 8, 8, objects=(_obj(1, "red", "circle", "small"),))
    large = ImageRecord(2, Path("b.png"), 8, 8, objects=(_obj(2, "red", "circle", "large"),))
    q = _q("what color is the circle?", "red", "color")
    out = RunOutput()
    out.samples, out.answers = [(small, q), (large, q), (large, q)], ["red", "blue", "red"]
    table = vqa_by_size({Run("full", None): out})
    got = {r.size: (r.acc, r.n) for r in table.itertuples()}
    assert got == {"small": (100.0, 1), "large": (50.0, 2)}


def test_paired_difference_is_the_mean_per_question_gap_with_its_standard_error():
    rec = ImageRecord(1, Path("a.png"), 8, 8)
    qs = [_q(f"q{i}", "yes", "exists") for i in range(4)]
    a, b = RunOutput(), RunOutput()
    a.samples = b.samples = [(rec, q) for q in qs]
    a.answers, b.answers = ["yes", "yes", "yes", "no"], ["yes", "no", "no", "no"]
    got = paired_difference(a, b)          # per-question gaps 0, 100, 100, 0
    assert got == {"diff": 50.0, "se": round(57.735 / 2, 2), "n": 4}
    c = RunOutput()
    c.samples, c.answers = [(rec, q) for q in reversed(qs)], a.answers
    with pytest.raises(ValueError, match="different questions"):
        paired_difference(a, c)



def test_caption_and_grounding_scores_are_the_eval_task_metrics_per_run():
    from vlmcompress.data.records import RefExpr
    from vlmcompress.eval.tasks import caption_cider, cider, grounding_accuracy, grounding_ious
    from vlmcompress.tokens.compare import caption_scores, grounding_scores, grounding_table

    recs = [ImageRecord(i, Path(f"{i}.png"), 10, 10, captions=(f"a {c} circle on grey", f"one {c} circle"))
            for i, c in enumerate(("red", "blue", "green"))]
    good, bad = RunOutput(), RunOutput()
    good.samples = bad.samples = recs
    good.answers, bad.answers = ["a red circle on grey", "one blue circle", "a green circle"], ["x", "y", "z"]
    got = caption_scores({Run("full", None): good, Run("random", 0.1): bad})
    want = cider({r.image_id: a for r, a in zip(recs, good.answers)}, {r.image_id: r.captions for r in recs})
    assert got == {"full@1.00": round(want, 2), "random@0.10": 0.0} and want > 0
    assert caption_cider(recs, good.answers) == want
    with pytest.raises(ValueError, match="2 captions for 3 records"):
        caption_cider(recs, good.answers[:2])

    rec = ImageRecord(7, Path("g.png"), 10, 10)
    refs = [(rec, RefExpr(i, "the circle", (0.0, 0.0, 5.0, 5.0), i)) for i in range(4)]   # [0, 0, .5, .5]
    texts = ["[0.00, 0.00, 0.50, 0.50]", "[0, 0, 0.5, 0.25]", "[0.25, 0.25, 0.75, 0.75]", "no box"]
    ious = grounding_ious(texts, refs)
    assert ious == pytest.approx([1.0, 0.5, 0.0625 / 0.4375, 0.0])
    assert grounding_accuracy(ious) == 50.0 and grounding_accuracy(ious, threshold=0.1) == 75.0
    ground = RunOutput()
    ground.samples, ground.answers = refs, texts
    assert grounding_scores({Run("full", None): ground, Run("random", 0.1): RunOutput()}) == \
        {"full@1.00": 50.0, "random@0.10": None}                  # no referring expressions: absent
    ground.tokens = [16, 16, 16, 16]
    table = grounding_table({Run("full", None): ground, Run("random", 0.1): RunOutput()}, 16)
    assert list(table.columns) == GROUNDING_COLUMNS
    full, rand = table.iloc[0], table.iloc[1]
    assert (full["method"], full["budget"], full["tokens"], full["kept_fraction"], full["n"]) == \
        ("full", "1.00", 16.0, 1.0, 4)
    assert full["grounding_acc50"] == 50.0 and full["grounding_miou"] == round(float(np.mean(ious)), 4)
    assert rand["n"] == 0 and math.isnan(rand["grounding_acc50"]) and math.isnan(rand["grounding_miou"])
    with pytest.raises(ValueError, match="no IoUs"):
        grounding_accuracy([])

# --- the stage measures what a user's attach() call runs -----------------------------------

def _stage_and_attach(tmp_path, T, method: str, budget, **attach_kw):
    """Prefill logits ``[B, V]`` and answers of one run, through the stage's sweep and through
    ``attach`` + the stock model's ``generate``, on the same tiny model, images and questions."""
    import torch

    from vlmcompress.lvlm.load import load_lvlm
    from vlmcompress.tokens import attach
    from vlmcompress.tokens.patch import TEXT_GUIDED
    from vlmcompress.tokens.sweep import Sweeper, make_batches

    root = save_tiny_lvlm(tmp_path / "model", with_lm(TINY, lm_layers=3), seed=1)
    lvlm = load_lvlm(str(root / "llava"), str(root / "clip"))
    lvlm.attn_layer = T.attention_layer
    recs = [ImageRecord(i, Path(f"{i}.png"), 56, 56) for i in range(2)]
    texts = ["what color is the circle ?", "how many red square are there ?", "is there a blue square ?"]
    samples = [(recs[0], texts[0]), (recs[0], texts[1]), (recs[1], texts[2])]
    g = torch.Generator().manual_seed(5)
    images = {r.image_id: torch.rand(3, 56, 56, generator=g) for r in recs}
    batch = make_batches(samples, lambda s: s[0], lambda s: s[1], 2, load=lambda r: images[r.image_id])

    calls: list[torch.Tensor] = []
    hook = lvlm.llava.lm_head.register_forward_hook(lambda m, a, out: calls.append(out.detach().clone()))
    try:
        out = Sweeper(lvlm, T).sweep(batch, [Run(method, budget)], "vqa", max_new_tokens=3)
    finally:
        hook.remove()
    shared = method not in TEXT_GUIDED          # one prefix per image, then each question's suffix
    stage_logits = calls[1 if shared else 0]
    stage_answers = next(iter(out.values())).answers

    b = batch[0]
    image_id = lvlm.llava.config.image_token_id
    seqs = [pre + [image_id] * 16 + post for pre, post in lvlm._prompt_ids("vqa", b.texts)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), lvlm.tokenizer.pad_token_id)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, L - len(s):], mask[r, L - len(s):] = torch.tensor(s), 1
    pixels = lvlm.preprocess(b.images)[b.index]
    kw = dict(tokenizer=lvlm.tokenizer, questions=b.texts, attention=T.attention, attn_layer=T.attention_layer,
              grid_positions=T.grid_positions, clip=lvlm.clip, clip_tokenizer=lvlm.clip_tokenizer)
    kw.update(attach_kw)
    with attach(lvlm.llava, method, budget, **kw, **T.method_params(method)):
        gen = lvlm.llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=lvlm.tokenizer.pad_token_id)
    answers = [lvlm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in gen.sequences[:, L:]]
    return stage_logits, stage_answers, gen.logits[0], answers


@pytest.mark.parametrize("method,budget", [("full", None), ("recoverable", 0.25), ("visionzip", 0.25),
                                           ("recoverable_spread", 0.25)])
def test_the_stage_measures_what_attach_runs(tmp_path, params, method, budget):
    """Same model, images and questions: the stage's prefill logits and answers equal those of
    ``attach(model, method, budget, clip=..., grid_positions=...)`` + the stock ``generate``."""
    import torch

    stage_logits, stage_answers, logits, answers = _stage_and_attach(tmp_path, params.tokens, method, budget)
    torch.testing.assert_close(logits, stage_logits, rtol=1e-4, atol=1e-5)
    assert answers == stage_answers


def test_the_stage_attach_comparison_sees_a_different_guidance_or_layout(tmp_path, params):
    """The comparison above can fail: attach with the LM's embeddings as text guidance, or with
    packed positions, gives other prefill logits than the stage."""
    import torch

    stage_logits, _, lm_guided, _ = _stage_and_attach(tmp_path / "a", params.tokens, "recoverable", 0.25,
                                                      clip=None, clip_tokenizer=None)
    assert not torch.allclose(lm_guided, stage_logits, rtol=1e-4, atol=1e-5)
    stage_logits, _, packed, _ = _stage_and_attach(tmp_path / "b", params.tokens, "visionzip", 0.25,
                                                   grid_positions=False)
    assert not torch.allclose(packed, stage_logits, rtol=1e-4, atol=1e-5)


# --- equal cost on hand-made runs ----------------------------------------------------------------

def _run_output(answers: list[str], gflops: float, tokens: int) -> RunOutput:
    rec = ImageRecord(1, Path("a.png"), 8, 8)
    o = RunOutput()
    o.samples = [(rec, Question(i, f"q{i}", "yes", ("yes",) * 10, "exists", "yes/no")) for i in range(len(answers))]
    o.answers, o.tokens = answers, [tokens] * len(answers)
    o.gflops, o.lm_gflops = [gflops] * len(answers), [gflops / 2] * len(answers)
    o.n_text, o.n_clip = [10] * len(answers), [5] * len(answers)
    return o


class _LinearCost:
    """A sweeper whose prefill costs 1 GFLOP plus 0.1 per kept token (0.2 for the text tower)."""

    n_patches = 100

    def mean_gflops(self, run, n_visual, n_text, n_clip):
        return 1.2 + 0.1 * n_visual


def test_count_for_cost_finds_the_nearest_count():
    from vlmcompress.tokens.compare import count_for_cost

    cost = lambda k: 1.2 + 0.1 * k             # noqa: E731
    assert count_for_cost(cost, 2.2, 100) == 10
    assert count_for_cost(cost, 2.24, 100) == 10 and count_for_cost(cost, 2.26, 100) == 11
    assert count_for_cost(cost, 0.0, 100) == 1 and count_for_cost(cost, 99.0, 100) == 100
    with pytest.raises(ValueError, match="n_max"):
        count_for_cost(cost, 1.0, 0)


def test_equal_cost_pairs_each_peer_with_ours_at_its_cost():
    from vlmcompress.tokens.compare import equal_cost_runs, equal_cost_table

    yes4 = ["yes"] * 4
    outputs = {Run("ours", 0.1): _run_output(yes4, 2.2, 10),            # 10 tokens + text tower
               Run("ours", 0.25): _run_output(yes4, 3.7, 25),
               Run("pre", 0.1): _run_output(["yes", "no", "no", "yes"], 2.0, 10),     # same count, cheaper
               Run("fastv", 0.1): _run_output(["no"] * 4, 2.6, 10),     # same count, dearer
               Run("close", 0.25): _run_output(yes4, 3.75, 25),          # within 2 % of ours@0.25
               Run("full", None): _run_output(yes4, 11.2, 100)}
    extra = equal_cost_runs(outputs, "ours", _LinearCost(), tolerance=0.02)
    assert extra == [Run("ours", 8), Run("ours", 14)]                   # 2.0 and 2.6 GFLOPs
    outputs[Run("ours", 8)] = _run_output(["yes", "yes", "yes", "no"], 2.0, 8)
    outputs[Run("ours", 14)] = _run_output(yes4, 2.6, 14)
    eq = equal_cost_table(outputs, "ours", 0.02).set_index(["peer", "peer_budget"])
    assert list(eq.index) == [("pre", "0.10"), ("fastv", "0.10"), ("close", "0.25")]
    assert eq.loc[("pre", "0.10"), "ours_budget"] == "8" and eq.loc[("fastv", "0.10"), "ours_budget"] == "14"
    assert eq.loc[("close", "0.25"), "ours_budget"] == "0.25"
    assert eq["matched"].all() and eq.loc[("close", "0.25"), "gap_pct"] == round(100 * (3.7 - 3.75) / 3.75, 2)
    # ours@8 vs pre: per-question gaps 0, 100, 100, -100 -> mean 25, sd 95.74, se 95.74 / 2
    pre = eq.loc[("pre", "0.10")]
    assert (pre["diff"], pre["se"], pre["z"], pre["n"]) == (25.0, 47.87, round(25.0 / 47.87, 2), 4)
    fastv = eq.loc[("fastv", "0.10")]                                   # +100 on every question: se 0
    assert (fastv["diff"], fastv["se"]) == (100.0, 0.0) and math.isnan(fastv["z"])      # no z without spread
    assert equal_cost_runs(outputs, "ours", _LinearCost(), tolerance=0.02) == []    # every peer matched now


def test_ours_is_the_candidate_best_on_the_batches_it_is_given():
    from vlmcompress.tokens.compare import choose_ours

    class Fixed:
        """Answers ``yes`` to a share of the questions that depends on the method."""

        share = {"a": 0.5, "b": 0.75, "c": 0.75}

        def sweep(self, batches, runs, task, max_new_tokens):
            self.seen = (batches, runs, task)
            return {r: _run_output(["yes" if i < 4 * self.share[r.method] else "no" for i in range(4)], 1.0, 2)
                    for r in runs}

    s = Fixed()
    assert choose_ours(s, ["val batch"], ["a", "b", "c"], [0.1, 0.5], 3) == ("b", {"a": 50.0, "b": 75.0, "c": 75.0})
    assert s.seen == (["val batch"], [Run(m, b) for m in "abc" for b in (0.1, 0.5)], "vqa")
    assert choose_ours(s, [], ["c"], [0.1], 3) == ("c", {}) and choose_ours(s, [], [], [0.1], 3) == (None, {})


def test_stage_chooses_ours_on_val(project_root, params, tiny_scenes):
    from vlmcompress.data.dataset import load_all

    P = _tiny_project(project_root, params, tiny_scenes, methods=["full", "random", "recoverable", "recoverable_spread"],
                      budgets=[0.10], adaptive=False, eval={"example_methods": ["full"], "val_questions": 6})
    metrics = run_tokens_stage(P, load_all(), log=lambda *_: None)
    out = project_root / "outputs" / "tokens"
    cands = read_rows(out / "candidates.csv")
    assert [r["method"] for r in cands] == ["recoverable", "recoverable_spread"] and metrics["val_questions"] == 6
    val = {r["method"]: float(r["val_acc"]) for r in cands}
    ours = max(val, key=lambda m: (val[m], -list(val).index(m)))
    assert metrics["ours"] == ours and metrics["ours_val_acc"] == val[ours]
    assert [r["method"] for r in cands if r["chosen"] == "True"] == [ours]
    assert {r["peer"] for r in read_rows(out / "equal_cost.csv")} == {"random", "recoverable", "recoverable_spread"} - {ours}
