"""The 05_eval_tokens stage on a tiny random model and tiny scenes, in a throw-away project root."""
from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lvlm_helpers import TINY, save_tiny_lvlm, with_lm
from vlmcompress.config import Params, from_dict, to_dict
from vlmcompress.data.records import ImageRecord, ObjectAnn, Question
from vlmcompress.tokens.stage import (FULL_KEY, Run, RunOutput, budget_key, object_size, paired_difference, plan_runs,
                                      run_tokens_stage, stratified_questions, vqa_by_size)
from vlmcompress.tokens.types import KIND_NAMES

BUDGET_BLOCK = {"acc", "rel_acc", "mean_tokens", "prefill_gflops", "lm_prefill_gflops"}


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
                         budgets=[0.10], eval={"example_methods": ["full", "random", "recoverable"]})


def check_contract(P: Params, metrics: dict, root: Path, budgets: tuple[str, ...]) -> None:
    """Everything the figures stage and ``dvc metrics`` read from ``outputs/tokens``."""
    out = root / "outputs" / "tokens"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert isinstance(metrics["full_acc"], float) and metrics["vqa_questions"] == 12
    assert metrics["full_tokens"] == metrics["n_visual_tokens"] == 16
    methods = [m for m in P.tokens.methods if m != "full"]
    assert set(metrics["methods"]) == set(methods)
    for m in methods:
        keys = set(budgets) | ({"adaptive"} if m in ("prumerge", "prumerge_plus", "recoverable") else set())
        assert set(metrics["methods"][m]) == keys, m
        for block in metrics["methods"][m].values():
            assert set(block) == BUDGET_BLOCK
            assert 0 <= block["acc"] <= 100 and block["prefill_gflops"] > 0
        # 10% of 16 tokens = 2 (pooling: the largest grid with <= 2 cells, 1 x 2)
        assert metrics["methods"][m]["0.10"]["mean_tokens"] == 2, m
        assert metrics["methods"][m]["0.10"]["prefill_gflops"] < metrics["full_prefill_gflops"]
        lm10 = metrics["methods"][m]["0.10"]["lm_prefill_gflops"]
        assert 0 < lm10 < metrics["full_lm_prefill_gflops"] < metrics["full_prefill_gflops"]
    for key in ("prefill_speedup_0.10", "selection_overhead_pct"):
        assert isinstance(metrics[key], float) and metrics[key] > 0
    assert metrics["selection_merge_pct"] == pytest.approx(metrics["selection_overhead_pct"] - metrics["text_encoder_pct"],
                                                           abs=1e-3) and 0 < metrics["selection_merge_pct"]
    assert set(metrics["caption_cider_0.10"]) == {"full@1.00"} | {f"{m}@0.10" for m in methods}
    assert set(metrics["grounding_acc50_0.10"]) == set(metrics["caption_cider_0.10"])

    with open(out / "accuracy.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["method", "budget", "mean_tokens", "question_type", "acc"]
    overall = {(r["method"], r["budget"]): float(r["acc"]) for r in rows if r["question_type"] == "all"}
    assert overall[("full", "1.00")] == metrics["full_acc"]
    assert overall[("recoverable", "adaptive")] == metrics["methods"]["recoverable"]["adaptive"]["acc"]
    assert {r["question_type"] for r in rows} > {"all"}

    with open(out / "accuracy_by_size.csv") as fh:
        sized = list(csv.DictReader(fh))
    assert list(sized[0]) == ["method", "budget", "size", "acc", "n"]
    by_size = metrics["vqa_by_object_size_0.10"]
    n_full = sum(int(r["n"]) for r in sized if r["method"] == "full")
    assert n_full == metrics["vqa_questions"] and sum(by_size["n"].values()) == n_full
    assert set(by_size) == {"n"} | set(metrics["caption_cider_0.10"])
    assert set(by_size["n"]) <= {"small", "large", "none"}
    paired = metrics["paired_0.10"]
    assert "recoverable - random" in paired and "recoverable - recoverable" not in paired
    assert all(v["n"] == metrics["vqa_questions"] for v in paired.values())

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
    assert eff[0].split(",")[:3] == ["method", "budget", "prefill_ms"] and len(eff) == 1 + len(plan_runs(P.tokens))


def test_stage_writes_the_metrics_contract(tiny_project, project_root):
    from vlmcompress.data.stage import load_all

    logged: list[str] = []
    metrics = run_tokens_stage(tiny_project, load_all(), log=logged.append)
    check_contract(tiny_project, metrics, project_root, ("0.10",))
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
    from vlmcompress.data.stage import load_all

    P = dataclasses.replace(tiny_project, tokens=dataclasses.replace(
        tiny_project.tokens, fastv=dataclasses.replace(tiny_project.tokens.fastv, layer=9)))
    with pytest.raises(ValueError, match=r"tokens\.fastv\.layer: must be in \[1, 3\]"):
        run_tokens_stage(P, load_all())


def test_make_batches_groups_images_and_keeps_each_sample_with_its_image():
    import torch

    from vlmcompress.tokens.stage import make_batches

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
