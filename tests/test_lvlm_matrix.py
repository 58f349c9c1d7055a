"""scripts/lvlm_matrix.py: cell planning, params overrides, cell folders and the floor table (no training)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up while the script runs
    spec.loader.exec_module(mod)
    return mod


matrix = _script("lvlm_matrix")


def _metrics(seed: int, cap: str, vqa: float = 92.0, spatial: float = 85.0, i2t: float = 55.0,
             ground: float = 1.0, seconds: float = 1500.0) -> dict:
    return {"seed": seed, "capability": cap, "vqa_acc": vqa,
            "vqa_acc_by_type": {"color": 96.0, "count": 80.0, "exists": 95.0, "shape": 88.0, "spatial": spatial},
            "vqa_majority_acc_by_type": {"color": 16.0, "count": 43.0, "exists": 50.0, "shape": 24.0, "spatial": 50.0},
            "retrieval_i2t_r1": i2t, "retrieval_t2i_r1": 60.0, "grounding_acc50": ground,
            "train_seconds": seconds, "source": "0123456789abcdef"}


def test_plan_is_seed_major_with_the_first_pair_first():
    cells = matrix.plan_cells([0, 1, 2], ["avx2", "default", "avx2"])
    assert [c.name for c in cells] == ["seed0-avx2", "seed0-default", "seed1-avx2", "seed1-default",
                                       "seed2-avx2", "seed2-default"]


def test_capabilities_follow_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2\n")
    assert matrix.default_capabilities(matrix.cpu_flags(info)) == ["avx2", "default"]
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert matrix.default_capabilities(matrix.cpu_flags(info)) == ["avx2", "default", "avx512"]
    assert matrix.cpu_flags(tmp_path / "missing") == set()


def test_overrides_set_seed_and_keys_and_reject_unknown_keys():
    base = {"seed": 0, "lvlm": {"train": {"lm_steps": 2000, "lm_lr": 0.001}, "eval": {"gallery": 1000}}}
    out = matrix.apply_overrides(base, 2, ["lvlm.train.lm_steps=1500", "lvlm.eval.gallery=[1, 2]"])
    assert out["seed"] == 2 and out["lvlm"]["train"] == {"lm_steps": 1500, "lm_lr": 0.001}
    assert out["lvlm"]["eval"]["gallery"] == [1, 2]
    assert base["seed"] == 0 and base["lvlm"]["train"]["lm_steps"] == 2000          # input untouched
    with pytest.raises(KeyError, match="lvlm.train.nope"):
        matrix.apply_overrides(base, 0, ["lvlm.train.nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        matrix.apply_overrides(base, 0, ["lvlm.train.lm_steps"])


def test_prepare_cell_writes_a_project_root(tmp_path):
    project, dataset = tmp_path / "proj", tmp_path / "proj/outputs/data/dataset"
    (dataset / "annotations").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = matrix.apply_overrides(base, 1, ["lvlm.train.lm_steps=10"])
    cell = tmp_path / "work" / "seed1-avx2"
    matrix.prepare_cell(cell, params, project, dataset)
    written = yaml.safe_load((cell / "params.yaml").read_text())
    assert written["seed"] == 1 and written["lvlm"]["train"]["lm_steps"] == 10
    assert written["data"] == base["data"]
    assert (cell / "dvc.yaml").is_file()
    link = cell / "outputs/data/dataset"
    assert link.is_symlink() and (link / "annotations").is_dir()
    matrix.prepare_cell(cell, params, project, dataset)                 # same recipe: resumable
    with pytest.raises(RuntimeError, match="other params"):
        matrix.prepare_cell(cell, matrix.apply_overrides(base, 1, []), project, dataset)
    env = matrix.cell_env(cell, "default", tmp_path / "src", base={"PYTHONPATH": "/x"})
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["VLMCOMPRESS_ROOT"] == str(cell.resolve())
    assert env["PYTHONPATH"].split(":") == [str((tmp_path / "src").resolve()), "/x"]


def test_cell_row_margins_and_floors():
    row = matrix.cell_row(_metrics(0, "avx2"))
    assert row["margin_spatial"] == 35.0 and row["margin_count"] == 37.0 and row["margin_min"] == 35.0
    assert row["r1_min"] == 55.0 and row["code"] == "0123456789"
    assert (row["pass_vqa"], row["pass_margins"], row["pass_r1"], row["pass_time"]) == ("pass",) * 4
    assert row["pass_grounding"] == "FAIL" and row["pass_all"] == "FAIL"
    bad = matrix.cell_row(_metrics(0, "default", vqa=80.1, spatial=70.0, i2t=49.9, seconds=1801.0))
    assert bad["margin_min"] == 20.0
    assert [bad[f"pass_{f}"] for f in ("vqa", "margins", "r1", "time")] == ["FAIL"] * 4
    missing = matrix.cell_row({"seed": 0, "capability": "avx2"})
    assert math.isnan(missing["vqa"]) and missing["pass_vqa"] == "FAIL"


def test_summary_rows_table_and_csv(tmp_path):
    rows = matrix.summary_rows([_metrics(0, "avx2"), _metrics(0, "default", vqa=80.0, seconds=1900.0)])
    assert [r["seed"] for r in rows] == [0, 0, "mean", "min", "max"]
    mean, lo, hi = rows[2:]
    assert mean["vqa"] == 86.0 and lo["vqa"] == 80.0 and hi["vqa"] == 92.0
    assert mean["pass_vqa"] == "1/2" and mean["pass_time"] == "1/2" and mean["pass_grounding"] == "0/2"
    assert lo["pass_vqa"] == "" and mean["code"] == ""
    table = matrix.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| seed | capability | vqa | margin_color |") and len(lines) == 7
    assert "| 0 | default | 80.00 |" in table and "| mean |  | 86.00 |" in table
    matrix.write_csv(rows, tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().splitlines()[1].startswith("0,avx2,92.00,")
    assert matrix.summary_rows([]) == [] and "no finished cell" in matrix.markdown_table([])


CURVES = ("phase,step,loss,shape,hit1,tok_acc,val_acc\n"
          "clip,1,16.5,0.15,,,\nclip,300,2.0,0.87,,,\ntext,200,3.0,,0.91,,\n"
          "lm,1900,0.3,,,0.95,\nlm,2000,0.2,,,0.96,90.5\n")


def test_phase_finals_take_each_phase_last_row():
    import csv
    import io
    rows = list(csv.DictReader(io.StringIO(CURVES)))
    assert matrix.phase_finals(rows) == {"clip_shape": 0.87, "text_hit1": 0.91, "lm_tok_acc": 0.96, "val_acc": 90.5}
    assert matrix.phase_finals([]) == {}


def test_summarize_reads_finished_cells(tmp_path, capsys):
    import json
    for name, m in (("seed0-avx2", _metrics(0, "avx2")), ("seed0-default", None)):
        (tmp_path / name / "outputs/lvlm").mkdir(parents=True)
        (tmp_path / name / "outputs/lvlm/curves.csv").write_text(CURVES)
        if m is not None:
            (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    cells = matrix.plan_cells([0], ["avx2", "default"])
    table = matrix.summarize(tmp_path, cells)
    assert "| 0 | avx2 | 92.00 |" in capsys.readouterr().out and "default" not in table
    assert "| clip_shape |" in table and "| 0.87 |" in table
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "summary.md").read_text() == table
    assert matrix.summarize(tmp_path / "missing").startswith("_no finished cell yet_")


def test_help_and_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        matrix.main(["--help"])
    assert exc.value.code == 0 and "--dry-run" in capsys.readouterr().out
    assert matrix.main(["--dry-run", "--seeds", "0", "1", "--caps", "avx2", "default",
                        "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seed0-avx2: seed=0 ATEN_CPU_CAPABILITY=avx2") and out[1].startswith("seed0-default")
    assert len(out) == 4 and not any(tmp_path.iterdir())
    assert matrix.main(["--dry-run", "--work-dir", str(tmp_path), "--set", "nope=1"]) == 2


def test_record_keeps_cells_of_one_recipe_and_refuses_another(tmp_path):
    rec = tmp_path / "rec.json"
    base = {"seed": 0, "lvlm": {"train": {"lm_steps": 2000}}}
    recipe = matrix.recipe_of("a" * 40, ["lvlm.train.lm_steps=3000"], base)
    assert matrix.read_record(rec) == {"recipe": None, "cells": {}}
    matrix.record_cell(rec, recipe, "seed1-avx2", _metrics(1, "avx2"))
    matrix.record_cell(rec, recipe, "seed0-avx2", _metrics(0, "avx2", vqa=91.0))
    got = matrix.read_record(rec)
    assert got["recipe"] == recipe and list(got["cells"]) == ["seed0-avx2", "seed1-avx2"]
    assert got["cells"]["seed0-avx2"]["vqa_acc"] == 91.0
    other = matrix.recipe_of("a" * 40, ["lvlm.train.lm_steps=2500"], base)
    with pytest.raises(ValueError, match="differs in overrides"):
        matrix.record_cell(rec, other, "seed2-avx2", _metrics(2, "avx2"))
    assert list(matrix.read_record(rec)["cells"]) == ["seed0-avx2", "seed1-avx2"]     # nothing lost
    assert matrix.recipe_of("a" * 40, [], {**base, "seed": 1}) != matrix.recipe_of("a" * 40, [], base)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '{"cells": []}', '{"recipe": null, "cells": {"a": 3}}', "\udcff"])
def test_a_file_that_is_not_a_record_is_a_one_line_error(tmp_path, text):
    bad = tmp_path / "rec.json"
    bad.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match="not a matrix record") as exc:
        matrix.read_record(bad)
    assert "\n" not in str(exc.value)


def test_a_record_resumes_the_matrix_from_a_commit_and_its_params(tmp_path, capsys):
    import json
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    commit = head.stdout.strip()
    rec = tmp_path / "rec.json"
    args = ["--src", commit[:10], "--record", str(rec), "--seeds", "0", "1", "--caps", "avx2",
            "--work-dir", str(tmp_path / "work"), "--set", "lvlm.train.lm_steps=7"]
    base = yaml.safe_load(subprocess.run(["git", "show", f"{commit}:params.yaml"], cwd=REPO, capture_output=True,
                                         text=True, check=True).stdout)
    recipe = matrix.recipe_of(commit, ["lvlm.train.lm_steps=7"], base)
    matrix.record_cell(rec, recipe, "seed0-avx2", _metrics(0, "avx2"))
    assert matrix.main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(done)") and out[1].endswith("(to run)")
    # Another recipe on the same record: refused before anything runs.
    assert matrix.main(["--dry-run", *args[:-1], "lvlm.train.lm_steps=8"]) == 2
    assert "records another recipe" in capsys.readouterr().err
    assert matrix.main(["--dry-run", "--src", "tree", *args[2:]]) == 2       # a record needs a commit
    assert "--record needs cells that run a commit" in capsys.readouterr().err
    assert matrix.main(["--dry-run", "--src", "no-such-commit", "--work-dir", str(tmp_path)]) == 2
    assert "not a commit" in capsys.readouterr().err
    assert matrix.main(["--summarize", "--record", str(rec)]) == 0
    assert "| 0 | avx2 | 92.00 |" in capsys.readouterr().out
    assert json.loads(rec.read_text())["recipe"]["source"] == commit


def test_a_cell_body_imports_what_it_runs_and_refuses_another_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOMPRESS_ROOT", str(tmp_path / "elsewhere"))
    (tmp_path / "cell").mkdir()
    with pytest.raises(RuntimeError, match="VLMCOMPRESS_ROOT must point at the cell"):
        matrix.run_cell_here(tmp_path / "cell")


def test_cells_run_several_at_once_and_their_shared_wall_time_is_not_judged(tmp_path, monkeypatch, capsys):
    import json
    import threading

    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Barrier(2, timeout=10)        # both cells must be running at the same time

    def fake_cell(cell, cell_dir, src, at_once=1):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait()
        m = _metrics(cell.seed, cell.capability, ground=60.0, seconds=2500.0)
        (cell_dir / "metrics.json").write_text(json.dumps({**m, "cells_at_once": at_once}))
        with lock:
            running[0] -= 1
        return 0

    monkeypatch.setattr(matrix, "run_cell", fake_cell)
    monkeypatch.setattr(matrix, "ensure_dataset", lambda project, work: tmp_path)
    work = tmp_path / "work"
    assert matrix.main(["--src", "live", "--jobs", "2", "--nice", "0", "--seeds", "0", "1", "--caps", "avx2",
                        "--work-dir", str(work)]) == 0
    assert peak[0] == 2
    rows = {r["seed"]: r for r in matrix.summary_rows(matrix.load_cell_metrics(work))}
    assert rows[0]["pass_time"] == "n/a" and rows[0]["pass_all"] == "pass" and rows["mean"]["pass_time"] == "0/0"
    assert "| n/a |" in (work / "summary.md").read_text()
    capsys.readouterr()
    assert matrix.main(["--dry-run", "--jobs", "0", "--work-dir", str(work)]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
