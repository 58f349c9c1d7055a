"""Checks of one pipeline stage's outputs in a project folder, shared by the paper-profile tests
(the stage functions in-process, and ``dvc repro`` of the notebooks)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml


def finite(tree) -> bool:
    """No NaN / inf anywhere in a JSON document (json writes them as bare NaN/Infinity)."""
    if isinstance(tree, dict):
        return all(finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(finite(v) for v in tree)
    return not (isinstance(tree, float) and not math.isfinite(tree))


def stage_metrics(root: Path, stage: str) -> dict:
    """``outputs/<stage>/metrics.json`` of the project at ``root``, asserted free of NaN / inf."""
    metrics = json.loads((root / "outputs" / stage / "metrics.json").read_text())
    assert finite(metrics), f"{stage}: NaN or inf in metrics.json"
    return metrics


def stage_spec(proj: Path, stage: str) -> dict:
    """``stage``'s entry of the project's dvc.yaml."""
    return yaml.safe_load((proj / "dvc.yaml").read_text())["stages"][stage]


def declared_outs(proj: Path, stage: str) -> list[Path]:
    """Every out and metric of ``stage`` in the project's dvc.yaml."""
    spec = stage_spec(proj, stage)
    names = [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", []) + spec.get("metrics", [])]
    return [proj / n for n in names]


def rendered_notebook(proj: Path, stage: str) -> Path:
    """The notebook ``stage``'s papermill command writes (its last argument)."""
    cmd = stage_spec(proj, stage)["cmd"]
    cmds = cmd if isinstance(cmd, list) else [cmd]
    return proj / next(c for c in cmds if c.startswith("papermill")).split()[-1]


def assert_notebook_ran(proj: Path, stage: str) -> None:
    """The rendered notebook has its HTML report, ran every code cell and shows no error."""
    rendered = rendered_notebook(proj, stage)
    assert (proj / "outputs" / "reports" / f"{rendered.stem}.html").is_file(), f"{stage}: no HTML report"
    nb = json.loads(rendered.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{stage}: a cell of {rendered.name} did not run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))


def record_writes(under: Path, log: list) -> None:
    """Audit hook: append ``(event, path)`` for every file operation under ``under`` (opens for
    writing, renames, folders made or removed, deletions) this process makes."""
    import os
    import sys

    prefix = str(Path(under).resolve())
    events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkdtemp"}

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
            if not writing:
                return
        elif event not in events:
            return
        for a in args[:2]:
            if isinstance(a, (str, Path)) and os.path.abspath(a).startswith(prefix):
                log.append((event, str(a)))
                return

    sys.addaudithook(hook)
