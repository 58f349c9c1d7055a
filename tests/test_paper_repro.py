"""The paper profile as users run it: the README's ``dvc exp run -S profile=paper`` of the project's
``dvc.yaml`` (each stage a papermill-run notebook) on the miniature paper world (tests/paper_world.py).

A throw-away git + DVC project (one commit) gets what a clone has: ``dvc.yaml``, ``params.yaml``
(``profile: embedded``), ``configs/``, ``notebooks/``, ``src/`` (the stages' code dependencies) and
the tracked ``outputs/*/.gitignore``. The user's overrides go where a user puts them, into
``configs/paper.yaml``: the archives' URLs on a
127.0.0.1 server in the official COCO 2017 / VQAv2 / RefCOCO layouts (plus a ``train2017.zip``
the data stage takes its first training images from by HTTP range requests), the tiny random
llava-1.5 / CLIP folders, float32 on the CPU and small sizes. ``dvc repro`` runs as a subprocess
with ``VLMCOMPRESS_ROOT`` set to the project (the package is imported from this checkout).

The fast test runs the whole pipeline with the README's command, prints each stage's notebook
time, then checks that a second ``dvc repro`` changes nothing; the slow one reproduces ``lvlm``
(data + lvlm) alone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fixtures_http import FileServer
from paper_world import TINY, build_llava15_pair, official_archives, train2017_archive
from stage_checks import assert_notebook_ran, declared_outs, rendered_notebook, stage_metrics

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IMAGE_SIZE, PATCH = 98, 14                    # a 7 x 7 grid: 49 visual tokens
N_TRAIN = 6                                   # train2017 images the data stage fetches
TIMEOUT_S = 1500                              # one `dvc repro` of the whole pipeline on two cores


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` laid on ``base``: mappings merge, anything else replaces (as the profile overlay)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def user_overrides(base_url: str, llava: Path, clip: Path) -> dict:
    """What a user changes in configs/paper.yaml to run the paper profile here, in minutes."""
    def src(name: str) -> dict:
        return {"url": f"{base_url}/{name}", "sha256": None, "size": None}

    return {
        "data": {"download": {
            "timeout_s": 10.0, "retries": 1, "subset": None, "val_images": 2, "train_images": N_TRAIN,
            "sources": {"coco_val_images": src("zips/val2017.zip"),
                        "coco_train_images": src("zips/train2017.zip"),
                        "coco_annotations": src("annotations/annotations_trainval2017.zip"),
                        "vqa_questions": src("vqa/v2_Questions_Val_mscoco.zip"),
                        "vqa_annotations": src("vqa/v2_Annotations_Val_mscoco.zip"),
                        "refcoco": src("referit/refcoco.zip")}}},
        "lvlm": {"llava": str(llava), "clip": str(clip), "dtype": "float32", "device": "cpu",
                 "eval": {"batch_size": 4, "max_questions": 6, "max_captions": 2, "max_refs": 4, "gallery": 4,
                          "text_probe_images": 0}},
        "codec": {
            "model": {"N": 8, "M": 12, "levels": 3, "gain_init": [0.5, 3.0],
                      "preedit": {"channels": 4, "depth": 2, "token_dim": TINY.vision_hidden, "token_channels": 4}},
            "loss": {"lambdas": [0.5, 2.0, 8.0]},
            "train": {"steps": 2, "batch_size": 2, "patch_size": 64, "checkpoint_every": 2, "log_every": 1},
            "baseline": {"lambdas": [0.0018, 0.0067, 0.025], "steps": 2, "patch_size": 64},
            "eval": {"n_test_images": 2, "n_rates": 2, "example_rates": [0.0, 2.0], "timing_repeats": 1,
                     "timing_threads": 1}},
        "tokens": {"budgets": [0.10, 0.25], "fastv": {"layer": 1},   # the tiny LM has 2 decoder layers
                   "eval": {"max_questions": 6, "batch_images": 2, "max_captions": 1, "max_refs": 2, "examples": 1,
                            "bench_repeats": 1, "bench_batch": 2}},
        "anchors": {"codecs": [{"name": "jpeg"}, {"name": "vvc", "options": {"preset": "faster", "qpa": False}}],
                    "n_points": 2, "n_calibration": 1, "qualities": {"vvc": [45, 33]}},
        "eval_codec": {"n_images": 2, "max_questions": 4, "max_captions": 1, "max_refs": 2, "batch_size": 4,
                       "workers": 0, "n_examples": 1},
        "figures": {"dpi": 40, "token_examples": 1},   # formats as declared: dvc.yaml lists png and svg outs
    }


def served_files(n_train: int = N_TRAIN + 4) -> dict[str, bytes]:
    """The official archives at their official paths (hosts folded onto one server)."""
    arc = official_archives()
    return {"/zips/val2017.zip": arc["val2017.zip"], "/zips/train2017.zip": train2017_archive(n_train),
            "/annotations/annotations_trainval2017.zip": arc["annotations_trainval2017.zip"],
            "/vqa/v2_Questions_Val_mscoco.zip": arc["v2_Questions_Val_mscoco.zip"],
            "/vqa/v2_Annotations_Val_mscoco.zip": arc["v2_Annotations_Val_mscoco.zip"],
            "/referit/refcoco.zip": arc["refcoco.zip"]}


def make_project(root: Path, base_url: str) -> Path:
    """A project checkout under ``root/proj`` set to the paper profile with the user's overrides."""
    proj = root / "proj"
    proj.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, proj / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in ("configs", "notebooks", "src"):
        shutil.copytree(REPO / name, proj / name, ignore=ignore)
    # What a clone has of outputs/: the folders DVC's .gitignore files keep (papermill writes
    # its rendered notebook into outputs/notebooks/, which it does not create).
    tracked = subprocess.run(["git", "ls-files", "outputs/*/.gitignore"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, proj / name)
    assert "\nprofile: embedded\n" in (proj / "params.yaml").read_text()
    llava, clip = build_llava15_pair(root / "models", image_size=IMAGE_SIZE, patch_size=PATCH)
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    merged = deep_merge(paper, user_overrides(base_url, llava, clip))
    (proj / "configs" / "paper.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return proj


def run_env(proj: Path) -> dict[str, str]:
    return {**os.environ, "VLMCOMPRESS_ROOT": str(proj), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore",
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(proj / ".dvc-site"),
            **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
               for what, value in (("NAME", "user"), ("EMAIL", "user@example.org"))}}


def dvc(proj: Path, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``dvc <args>`` in the project; a failure shows the end of its output."""
    res = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=proj, env=run_env(proj), capture_output=True,
                         text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        pytest.fail(f"dvc {' '.join(args)} exited {res.returncode}:\n{(res.stdout + res.stderr)[-6000:]}",
                    pytrace=False)
    return res


def check_stage(proj: Path, stage: str) -> dict:
    """Declared outs exist, the rendered notebook ran every cell, metrics are finite; the metrics."""
    missing = [p.relative_to(proj).as_posix() for p in declared_outs(proj, stage) if not p.exists()]
    assert not missing, f"{stage}: declared outs missing: {missing}"
    assert_notebook_ran(proj, stage)
    metrics = stage_metrics(proj, stage)
    assert metrics, f"{stage}: empty metrics.json"
    return metrics


def check_data(proj: Path) -> None:
    m = check_stage(proj, "data")
    assert m["train_images"] == N_TRAIN and m["val_images"] == 2 and m["test_images"] == 6
    assert m["val_questions"] > 0 and m["test_questions"] > 0 and m["test_refs"] > 0
    from vlmcompress.data.records import load_split
    root = proj / "outputs/data/dataset"
    test = load_split(root, "val") + load_split(root, "test")
    train = load_split(root, "train")
    assert len({(r.width, r.height) for r in test}) > 2                     # COCO's mixed sizes
    assert [r.path.name for r in train] == [f"{i:012d}.jpg" for i in sorted(r.image_id for r in train)]
    assert not {r.image_id for r in train} & {r.image_id for r in test}
    assert all(r.path.is_file() and not r.questions for r in train)


def check_lvlm(proj: Path) -> None:
    m = check_stage(proj, "lvlm")
    out = proj / "outputs/lvlm"
    source = json.loads((out / "model/source.json").read_text())
    assert source["source"] == "pretrained" and source["llava"].endswith("llava")
    assert not any((out / "checkpoints").iterdir())
    assert len(pd.read_csv(out / "curves.csv")) == 0
    assert m["vqa_questions"] == 6 and m["train_seconds"] == 0.0
    # One row per question and caption, whatever control characters a random model generates.
    examples = pd.read_csv(out / "examples.csv", keep_default_na=False)
    assert len(examples) == 6 + 2 and set(examples["type"]) > {"caption"}
    assert 0 <= m["vqa_acc"] <= 100 and m["grounding_acc50"] is not None


def check_codec(proj: Path) -> None:
    m = check_stage(proj, "codec")
    assert 0 < m["bpp_min"] <= m["bpp_max"]
    rendered = (proj / "outputs/notebooks/03_codec.ipynb").read_text()
    assert f"training on {N_TRAIN} images (the train split)" in rendered     # train2017, via the data stage
    models = proj / "outputs/codec/models"
    assert {p.name for p in models.iterdir()} == {"ours", "pixel_baseline", "ours-no_rank", "ours-no_token",
                                                  "ours-no_preedit"}


def stages_ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def paper_project(tmp_path: Path) -> Iterator[Path]:
    with FileServer(served_files()) as srv:
        proj = make_project(tmp_path, srv.base_url)
        env = run_env(proj)
        subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
        subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=proj, env=env, check=True)
        subprocess.run(["git", "add", "-A"], cwd=proj, env=env, check=True)
        subprocess.run(["git", "commit", "-qm", "clone"], cwd=proj, env=env, check=True)   # experiments need one
        yield proj


def set_paper_profile(proj: Path) -> None:
    """``profile: paper`` in params.yaml, as ``dvc exp run -S profile=paper`` sets it."""
    params = (proj / "params.yaml").read_text()
    (proj / "params.yaml").write_text(params.replace("\nprofile: embedded\n", "\nprofile: paper\n", 1))


def notebook_seconds(proj: Path, stage: str) -> float:
    """Papermill's record of how long the stage's notebook ran."""
    return float(json.loads(rendered_notebook(proj, stage).read_text())["metadata"]["papermill"]["duration"])


@pytest.mark.slow   # the first two stages alone (the test below runs them and the rest)
def test_dvc_repro_data_and_lvlm_on_the_paper_profile(paper_project):
    proj = paper_project
    set_paper_profile(proj)
    res = dvc(proj, "repro", "lvlm", timeout=600)
    assert stages_ran(res.stdout) == {"data", "lvlm"}
    check_data(proj)
    check_lvlm(proj)
    again = dvc(proj, "repro", "lvlm", timeout=300)
    assert not stages_ran(again.stdout), again.stdout
    assert "Stage 'lvlm' didn't change" in again.stdout


def test_dvc_repro_every_stage_on_the_paper_profile(paper_project):
    proj = paper_project
    stages = list(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])
    res = dvc(proj, "exp", "run", "-S", "profile=paper")          # the README's command
    assert stages_ran(res.stdout) == set(stages), res.stdout
    assert "\nprofile: paper\n" in (proj / "params.yaml").read_text()
    print("notebook seconds per stage: " + ", ".join(f"{s} {notebook_seconds(proj, s):.0f}" for s in stages))
    check_data(proj)
    check_lvlm(proj)
    check_codec(proj)
    for stage in stages:
        check_stage(proj, stage)
    again = dvc(proj, "repro", timeout=600)
    assert not stages_ran(again.stdout), again.stdout
    assert all(f"Stage '{s}' didn't change" in again.stdout for s in stages), again.stdout
    status = dvc(proj, "status", timeout=300)
    assert "up to date" in status.stdout, status.stdout
