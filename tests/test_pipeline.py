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
        assert _lookup(PARAMS, key), f"stage {name}: params key {key!r} not in params.yaml"
    argv = shlex.split(stage["cmd"])
    assert argv[:3] == ["papermill", "-k", "python3"]
    src_nb, out_nb = [a for a in argv if a.endswith(".ipynb")]
    assert src_nb in stage["deps"], "the clean notebook is a dependency"
    assert out_nb.startswith("outputs/notebooks/") and out_nb in stage["outs"]
    for dep in stage["deps"]:
        assert (REPO / dep).exists(), f"stage {name}: missing dep {dep}"
    metrics = [m for m in stage.get("metrics", [])]
    assert metrics and all(list(m.values())[0]["cache"] is False for m in metrics)


def test_executed_notebooks_are_never_dependencies():
    outs = {o for s in DVC["stages"].values() for o in s.get("outs", []) if isinstance(o, str)}
    for name, stage in DVC["stages"].items():
        for dep in stage["deps"]:
            assert not dep.startswith("outputs/notebooks/"), f"{name} depends on an executed notebook"
    assert all(o.startswith("outputs/") for o in outs)


def test_data_notebook_runs_end_to_end(project_root):
    """01_data through papermill on a tiny params file, in a throw-away project root."""
    import papermill

    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["data"]["scenes"].update(n_train=8, n_val=4, n_test=8)
    (project_root / "params.yaml").write_text(yaml.safe_dump(params))
    out = project_root / "outputs" / "notebooks" / "01_data.ipynb"
    out.parent.mkdir(parents=True)
    papermill.execute_notebook(str(REPO / "notebooks" / "01_data.ipynb"), str(out),
                               parameters={"params_path": str(project_root / "params.yaml")},
                               kernel_name="python3", cwd=str(project_root), progress_bar=False)
    metrics = json.loads((project_root / "outputs" / "data" / "metrics.json").read_text())
    assert metrics["images.test"] == 8 and metrics["questions.test"] > 0
    executed = nbformat.read(out, as_version=4)
    assert any(o.get("output_type") == "display_data" for c in executed.cells for o in c.get("outputs", []))
