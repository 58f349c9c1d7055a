"""The paper profile end to end, offline: every stage FUNCTION (no DVC, no papermill) in one
throw-away project root, on the miniature paper world (tests/paper_world.py).

The params are the paper profile's (configs/paper.yaml laid over params.yaml) with only what
must change to run here: the data from a local folder in the official COCO/VQAv2/RefCOCO
formats, the pretrained LVLM from tiny random llava-1.5 / CLIP folders (7x7 = 49 visual
tokens), float32 on the CPU, and tiny evaluation and codec sizes.

The stages run once, in the pipeline's order, in a module fixture that records each stage's
wall time and exception; each test then checks one stage's outputs.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import paper_params_path
from paper_world import TINY, archive_world, build_llava15_pair, jpeg, pickle_py2
from stage_checks import stage_metrics

STAGES = ("data", "lvlm", "codec", "eval_codec", "tokens", "figures")
IMAGE_SIZE, PATCH = 98, 14                    # a 7 x 7 grid: 49 visual tokens


def _local_world(folder: Path) -> dict[str, str]:
    """The miniature COCO 2017 val / VQAv2 / RefCOCO world as a user's folder (data.local)."""
    world = archive_world()
    boxes: dict[int, list] = {}
    for a in world.instances["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    (folder / "images").mkdir(parents=True)
    for im in world.images:
        (folder / "images" / im["file_name"]).write_bytes(
            jpeg(im["width"], im["height"], im["id"], boxes=boxes.get(im["id"], ())))
    files = {"instances": world.instances, "captions": world.captions, "vqa_questions": world.questions,
             "vqa_annotations": world.annotations}
    local = {"images": str(folder / "images")}
    for key, doc in files.items():
        (folder / f"{key}.json").write_text(json.dumps(doc))
        local[key] = str(folder / f"{key}.json")
    (folder / "refs(unc).p").write_bytes(pickle_py2(world.refs))
    local["refs"] = str(folder / "refs(unc).p")
    return local


def _train_images(folder: Path) -> str:
    """A few extra JPEGs (mixed sizes, not in the evaluated set) for codec.train_images."""
    folder.mkdir(parents=True)
    for k, (w, h) in enumerate([(160, 120), (120, 160), (144, 144), (200, 130)]):
        (folder / f"train_{k}.jpg").write_bytes(jpeg(w, h, 9000 + k, boxes=[[w * 0.2, h * 0.3, w * 0.4, h * 0.3]]))
    return str(folder)


def paper_params(root: Path, llava: Path, clip: Path) -> Path:
    """``root/params.yaml``: the paper profile resolved, then shrunk to run in minutes on a CPU."""
    from vlmcompress.config import load_params, to_dict

    p = to_dict(load_params(paper_params_path(root)))
    assert p["profile"] == "paper" and p["lvlm"]["image_aspect"] == "pad"
    p["profile"] = "embedded"                 # values already resolved: no second overlay
    p["data"]["source"] = "local"
    p["data"]["local"] = _local_world(root / "mine")
    p["data"]["download"]["val_images"] = 2  # of 8 images: val picks tokens.eval.ours, 6 are tested
    p["lvlm"].update(source="pretrained", llava=str(llava), clip=str(clip), dtype="float32", device="cpu")
    p["lvlm"]["eval"].update(batch_size=4, max_questions=6, max_captions=2, max_refs=4, gallery=4,
                             text_probe_images=0)
    c = p["codec"]
    c["model"].update(N=8, M=12, levels=3, gain_init=[0.5, 3.0])
    c["model"]["preedit"].update(channels=4, depth=2, token_dim=TINY.vision_hidden, token_channels=4)
    c["loss"]["lambdas"] = [0.5, 2.0, 8.0]
    c["train"].update(steps=2, batch_size=2, patch_size=64, checkpoint_every=2, log_every=1)
    c["baseline"].update(lambdas=[0.0018, 0.0067, 0.025], steps=2, patch_size=64)
    c["eval"].update(n_test_images=2, n_rates=2, example_rates=[0.0, 2.0], timing_repeats=1, timing_threads=1)
    c["train_images"] = _train_images(root / "codec_train")
    p["anchors"].update(codecs=[{"name": "jpeg"}, {"name": "vvc", "options": {"preset": "faster", "qpa": False}}],
                        n_points=2, n_calibration=1, qualities={"vvc": [45, 33]})
    p["eval_codec"].update(n_images=2, max_questions=4, max_captions=1, max_refs=2, batch_size=4,
                           workers=0, n_examples=1)
    t = p["tokens"]
    t["budgets"] = [0.10, 0.25]
    t["fastv"]["layer"] = 1                   # the tiny LM has 2 decoder layers
    t["eval"].update(max_questions=6, batch_images=2, max_captions=1, max_refs=2, examples=1,
                     bench_repeats=1, bench_batch=2)
    p["figures"].update(formats=["png", "svg"], dpi=40, token_examples=1)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """Build the world, then run every stage in order; record (seconds, error) per stage."""
    import torch

    from vlmcompress.config import load_params

    root = tmp_path_factory.mktemp("paper_profile") / "proj"
    root.mkdir()
    t0 = time.perf_counter()
    llava, clip = build_llava15_pair(root / "models", image_size=IMAGE_SIZE, patch_size=PATCH)
    build_s = time.perf_counter() - t0
    results: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMCOMPRESS_ROOT", str(root))
        torch.set_num_threads(2)
        P = load_params(paper_params(root, llava, clip))

        from vlmcompress.codec.stage import run_codec_stage
        from vlmcompress.data.dataset import load_all
        from vlmcompress.data.stage import run_data_stage
        from vlmcompress.eval.codec_stage import run_eval_codec_stage
        from vlmcompress.figures.stage import run_figures_stage
        from vlmcompress.lvlm.stage import run_lvlm_stage
        from vlmcompress.tokens.stage import run_tokens_stage

        quiet = lambda s: None  # noqa: E731
        calls = {
            "data": lambda: run_data_stage(P),
            "lvlm": lambda: run_lvlm_stage(P, load_all(), log=quiet),
            "codec": lambda: run_codec_stage(P, load_all(), log=quiet),
            "eval_codec": lambda: run_eval_codec_stage(P, load_all(), log=quiet, progress=False),
            "tokens": lambda: run_tokens_stage(P, load_all(), log=quiet),
            "figures": lambda: run_figures_stage(P),
        }
        for name in STAGES:
            t = time.perf_counter()
            try:
                metrics, error = calls[name](), None
            except Exception as exc:      # recorded: later stages still run, each test reports its own
                metrics, error = None, "".join(traceback.format_exception(exc)[-6:])
            results[name] = {"seconds": round(time.perf_counter() - t, 1), "metrics": metrics, "error": error}
        torch.set_num_threads(1)
    report = {"build_models_s": round(build_s, 1),
              **{k: (v["seconds"], v["error"] is None) for k, v in results.items()}}
    print("\npaper profile stages (seconds, ok):", report)
    (root / "stage_report.json").write_text(json.dumps(
        {k: {"seconds": v["seconds"], "error": v["error"]} for k, v in results.items()}, indent=1))
    return {"root": root, "params": P, "results": results}


def _ok(run: dict, stage: str) -> dict:
    r = run["results"][stage]
    if r["error"] is not None:
        pytest.fail(f"stage {stage} raised after {r['seconds']} s:\n{r['error']}", pytrace=False)
    return stage_metrics(run["root"], stage)


def test_params_are_the_paper_profile_shrunk(paper_run):
    P = paper_run["params"]
    assert P.data.source == "local" and P.lvlm.source == "pretrained" and P.lvlm.image_aspect == "pad"
    assert P.lvlm.prompts.system.startswith("A chat between")
    assert P.codec.ablations == ["no_rank", "no_token", "no_preedit"]
    assert P.tokens.grid_positions is False


def test_data_stage(paper_run):
    m = _ok(paper_run, "data")
    from vlmcompress.data.dataset import load_all

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMCOMPRESS_ROOT", str(paper_run["root"]))
        splits = load_all()
    assert m and splits
    test = splits[list(splits)[-1]]
    assert any(r.refs for r in test) and any(r.questions for r in test)
    assert len({(r.width, r.height) for r in test}) > 2               # COCO's mixed sizes


def test_lvlm_stage(paper_run):
    m = _ok(paper_run, "lvlm")
    root = paper_run["root"]
    source = json.loads((root / "outputs/lvlm/model/source.json").read_text())
    assert source["source"] == "pretrained"
    assert {"vqa_acc", "caption_cider", "retrieval_i2t_r1", "grounding_acc50", "grounding_miou"} <= set(m)
    assert m["vqa_questions"] == 6 and m["retrieval_gallery"] == 4      # refs exist: grounding measured


def test_codec_stage(paper_run):
    m = _ok(paper_run, "codec")
    for key in ("train_seconds", "bpp_min", "bpp_max", "roundtrip_max_abs_err"):
        assert key in m, key
    assert 0 < m["bpp_min"] <= m["bpp_max"]
    models = paper_run["root"] / "outputs/codec/models"
    assert {p.name for p in models.iterdir()} == {"ours", "pixel_baseline", "ours-no_rank", "ours-no_token",
                                                  "ours-no_preedit"}


def test_eval_codec_stage(paper_run):
    m = _ok(paper_run, "eval_codec")
    assert "ours_bd_rate_grounding_acc50" in m and m["n_images"] == 2
    bd = pd.read_csv(paper_run["root"] / "outputs/eval_codec/bd_table.csv")
    assert {"ours", "pixel_baseline", "jpeg"} <= set(bd.loc[bd["anchor"] == m["anchor"], "codec"])
    assert "grounding_acc50" in set(bd.loc[bd["codec"] == "ours", "metric"])
    curves = pd.read_csv(paper_run["root"] / "outputs/eval_codec/curves.csv")
    assert set(curves["codec"]) >= {"ours", "pixel_baseline", "ours-no_rank", "jpeg", "vvc"}
    assert curves["grounding_acc50"].notna().all() and curves["vqa_acc"].notna().all()
    assert (curves["bpp"].dropna() > 0).all()


def test_tokens_stage(paper_run):
    m = _ok(paper_run, "tokens")
    assert m["n_visual_tokens"] == (IMAGE_SIZE // PATCH) ** 2
    out = paper_run["root"] / "outputs/tokens"
    cost = pd.read_csv(out / "cost.csv", dtype={"budget": str})
    assert set(cost["method"]) == set(paper_run["params"].tokens.methods) | {"full"}
    tasks = pd.read_csv(out / "tasks.csv", dtype={"budget": str})
    assert "grounding_acc50" in tasks and set(tasks["budget"]) == {"0.10", "1.00"}
    ground = pd.read_csv(out / "grounding.csv", dtype={"budget": str})       # grounding at every budget
    assert set(ground["budget"]) == {"0.10", "0.25", "1.00"} and ground["grounding_acc50"].notna().all()


def test_figures_stage(paper_run):
    m = _ok(paper_run, "figures")
    assert m["n_figures"] > 0
    out = paper_run["root"] / "outputs/figures"
    assert all((out / f"{name}.png").is_file() for name in m["rows"])
    assert m["rows"]["token_grounding"] == len(pd.read_csv(paper_run["root"] / "outputs/tokens/grounding.csv")) > 0
