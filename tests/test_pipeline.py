"""The DVC + papermill wiring: stages, params they name, notebooks they run."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _out_path(out) -> str:
    return out if isinstance(out, str) else next(iter(out))


def _lookup(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_stripped_and_parameterised(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{nb_path.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{nb_path.name}: exactly one 'parameters' cell"
    assert "params_path" in tagged[0].source


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_stage_wiring(name):
    stage = DVC["stages"][name]
    for key in stage.get("params", []):
        if isinstance(key, dict):            # keys of another params file (the paper overlay)
            (file, keys), = key.items()
            other = yaml.safe_load((REPO / file).read_text())
            assert all(_lookup(other, k) and _lookup(PARAMS, k) for k in keys), f"stage {name}: {file} {keys}"
            continue
        assert _lookup(PARAMS, key), f"stage {name}: params key {key!r} not in params.yaml"
    cmds = [shlex.split(c) for c in (stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]])]
    runs = [argv for argv in cmds if argv[:1] == ["papermill"]]
    assert len(runs) == 1, "a stage runs one notebook"
    argv = runs[0]
    assert argv[:3] == ["papermill", "-k", "python3"]
    src_nb, out_nb = [a for a in argv if a.endswith(".ipynb")]
    assert src_nb in stage["deps"], "the clean notebook is a dependency"
    assert out_nb.startswith("outputs/notebooks/") and out_nb in stage["outs"]
    report = f"outputs/reports/{Path(out_nb).stem}.html"      # the executed notebook as HTML, an out too
    assert report in stage["outs"] and any(argv[:2] == ["jupyter", "nbconvert"] and out_nb in argv for argv in cmds)
    earlier = {_out_path(o) for s in list(DVC["stages"])[:list(DVC["stages"]).index(name)]
               for o in DVC["stages"][s].get("outs", [])}
    for dep in stage["deps"]:
        # A dep is committed code/notebook, or the output of an earlier stage.
        assert dep in earlier or (REPO / dep).exists(), f"stage {name}: missing dep {dep}"
    metrics = [m for m in stage.get("metrics", [])]
    assert metrics and all(list(m.values())[0]["cache"] is False for m in metrics)


def test_executed_notebooks_are_never_dependencies():
    outs = {o for s in DVC["stages"].values() for o in s.get("outs", []) if isinstance(o, str)}
    for name, stage in DVC["stages"].items():
        for dep in stage["deps"]:
            assert not dep.startswith("outputs/notebooks/"), f"{name} depends on an executed notebook"
    assert all(o.startswith("outputs/") for o in outs)


def _run_notebook(name: str, root: Path) -> dict:
    import papermill

    out = root / "outputs" / "notebooks" / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(out),
                               parameters={"params_path": str(root / "params.yaml")},
                               kernel_name="python3", cwd=str(root), progress_bar=False)
    return nbformat.read(out, as_version=4)


def _write_tiny_params(project_root: Path) -> dict:
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["data"]["scenes"].update(n_train=8, n_val=4, n_test=8)
    params["lvlm"]["arch"].update(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1,
                                  text_heads=2, projection_dim=16, lm_hidden=32, lm_layers=1, lm_heads=2,
                                  lm_intermediate=64, stem_context=0)
    params["lvlm"]["train"].update(pool_scenes=16, clip_steps=2, clip_batch=4, text_steps=2, text_batch=4,
                                   text_questions=2, align_steps=2, align_batch=4,
                                   lm_steps=2, lm_batch=2, lm_turns=2, lm_bg_start=4, lm_bg_ramp=0.5, lm_look_weight=1.0,
                                   lm_look_layer=0, lm_hop_layer=0, lm_phrase_weight=0.0, lm_where_layer=0,
                                   warmup_steps=1, checkpoint_every=1,
                                   eval_every=1)
    params["lvlm"]["eval"].update(batch_size=8, max_questions=16, max_captions=2, max_refs=4, gallery=8)
    codec = params["codec"]
    codec["model"].update(N=8, M=12, levels=3, gain_init=[1.0, 50.0])
    codec["model"]["preedit"].update(channels=4, depth=2, token_dim=32, token_channels=4)
    codec["loss"]["lambdas"] = [0.5, 1.0, 2.0]
    codec["baseline"]["lambdas"] = [0.001, 0.005, 0.02]
    codec["train"].update(steps=2, batch_size=2, checkpoint_every=2, log_every=1, quantile_update=False)
    codec["eval"].update(n_test_images=2, n_rates=2, example_rates=[0.0, 1.0, 2.0], timing_repeats=1)
    (project_root / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def test_data_and_lvlm_notebooks_run_end_to_end(project_root):
    """01_data then 02_lvlm through papermill on tiny params, in a throw-away project root."""
    _write_tiny_params(project_root)

    executed = _run_notebook("01_data", project_root)
    metrics = json.loads((project_root / "outputs" / "data" / "metrics.json").read_text())
    assert metrics["images.test"] == 8 and metrics["questions.test"] > 0
    assert any(o.get("output_type") == "display_data" for c in executed.cells for o in c.get("outputs", []))

    _run_notebook("02_lvlm", project_root)
    lv = json.loads((project_root / "outputs" / "lvlm" / "metrics.json").read_text())
    for key in ("vqa_acc", "vqa_majority_acc", "vqa_acc_by_type", "vqa_majority_acc_by_type", "retrieval_i2t_r1",
                "retrieval_t2i_r1", "caption_cider", "grounding_acc50", "train_seconds"):
        assert key in lv, key
    assert lv["vqa_questions"] == 16 and lv["train_seconds"] > 0
    model = project_root / "outputs" / "lvlm" / "model"
    assert (model / "llava" / "model.safetensors").is_file() and (model / "clip" / "model.safetensors").is_file()


@pytest.mark.slow
def test_codec_notebook_runs_end_to_end(project_root):
    """01_data, 02_lvlm and 03_codec through papermill on tiny params (the codec's figures included)."""
    _write_tiny_params(project_root)
    for name in ("01_data", "02_lvlm"):
        _run_notebook(name, project_root)
    executed = _run_notebook("03_codec", project_root)
    metrics = json.loads((project_root / "outputs" / "codec" / "metrics.json").read_text())
    for key in ("train_seconds", "bpp_min", "bpp_max", "roundtrip_max_abs_err", "encode_ms_512", "decode_ms_512",
                "vvc_encode_ms_512", "vvc_decode_ms_512"):
        assert key in metrics, key
    figures = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) >= 3  # curves, reconstructions, token distortion vs bpp
