"""Train the LVLM recipe over a matrix of seeds x CPU code paths and tabulate it against the floors.

    python scripts/lvlm_matrix.py                          # seeds 0 1 2 x avx2, default (+ avx512 if the CPU has it)
    python scripts/lvlm_matrix.py --seeds 0 --caps avx2 default --set lvlm.train.lm_steps=1500
    python scripts/lvlm_matrix.py --dry-run                # the cells, nothing run
    python scripts/lvlm_matrix.py --summarize              # only the table, from the cells' metrics.json

Each cell is one ``lvlm`` stage run (train + test-split scores, as ``run_lvlm_stage``) in its own
subprocess with ``ATEN_CPU_CAPABILITY`` set (PyTorch's choice of CPU kernels: the same recipe on
another SIMD width differs only in floating-point details) and ``VLMCOMPRESS_ROOT`` pointing at
the cell's own project root ``<work-dir>/seed<s>-<cap>/``: a copy of ``params.yaml`` with ``seed``
and the ``--set`` overrides changed, ``dvc.yaml`` as root marker, and ``outputs/data/dataset``
linked to the project's data set (generated first if missing; ``--set data.*`` does not
regenerate it). Cells import the package from a snapshot of ``src/`` taken once per work dir
(``<work-dir>/src``, from git ``HEAD`` by default, ``--src tree`` for the working tree), so edits
made while the matrix runs never mix recipes between cells. A cell writes ``metrics.json`` (the
stage's metrics plus the cell's seed, capability, CPU and code) and ``train.log``; a cell whose
``metrics.json`` exists is skipped, and an interrupted cell resumes from its training
checkpoints, so the matrix is resumable. The work dir holds one recipe: a cell whose
``params.yaml`` differs from the planned one is an error.

A matrix outlives its work dir through a **record** (``--record FILE.json``, small, tracked in
git): the recipe (commit, overrides, base params) and each finished cell's metrics. Cells in the
record are skipped, a record of another recipe is refused, and ``--src COMMIT`` (with that
commit's ``params.yaml`` as the base unless ``--params`` is given) runs the recorded recipe's code
again, so a matrix longer than one sitting is finished later, on any checkout, cell by cell:

    python scripts/lvlm_matrix.py --src 1a2b3c4 --record docs/experiments/lvlm-matrix-X.json --set ...
    python scripts/lvlm_matrix.py --summarize --record docs/experiments/lvlm-matrix-X.json

``--jobs N`` runs N cells at once (each in its own process; give each its share of the cores
with ``--set lvlm.train.threads=...``). A cell records how many ran beside it
(``cells_at_once``); the training-time floor is only judged on cells that had the CPU alone.

At the end (or with ``--summarize``) prints a markdown table, one row per finished cell and
mean / min / max rows, with a pass/fail per floor, and writes it to ``<work-dir>/summary.csv``
and ``summary.md``; further columns are diagnostics from each cell's training curves (the last
logged value of a phase: the tower's patch shape accuracy, the text phase's hit@1, the LM's
token and val accuracy), to see in which phase two cells part. Runs under ``nice`` (``--nice``,
default 19) so it only takes idle CPU; ``train_seconds`` is wall time, so with other work on
the cores it overstates the recipe's cost and its floor is only meaningful on idle cores.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = (0, 1, 2)
BASE_CAPS = ("avx2", "default")
QUESTION_TYPES = ("color", "count", "exists", "shape", "spatial")
# Diagnostics from the training curves (last logged row of a phase): where two cells part.
CURVE_COLUMNS = {("clip", "shape"): "clip_shape", ("clip", "i2t"): "clip_i2t", ("text", "hit1"): "text_hit1",
                 ("align", "loss"): "align_loss", ("lm", "tok_acc"): "lm_tok_acc", ("lm", "val_acc"): "val_acc"}


# --- floors ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Floor:
    """One requirement on a cell's metrics: ``column`` compared with ``limit``."""

    name: str
    column: str          # a column of :func:`cell_row`
    limit: float
    higher_is_better: bool = True

    def passes(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value >= self.limit if self.higher_is_better else value <= self.limit


FLOORS = (
    Floor("vqa", "vqa", 90.0),
    Floor("margins", "margin_min", 30.0),           # every type >= 30 points over its majority answer
    Floor("r1", "r1_min", 50.0),                    # R@1 both ways
    Floor("grounding", "grounding", 50.0),
    Floor("time", "train_seconds", 1800.0, higher_is_better=False),
)


# --- planning --------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    seed: int
    capability: str

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.capability}"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags (empty when unreadable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return set(value.split())
    except OSError:
        pass
    return set()


def default_capabilities(flags: set[str]) -> list[str]:
    """``avx2`` and ``default`` always, ``avx512`` when the CPU has ``avx512f``."""
    return list(BASE_CAPS) + (["avx512"] if "avx512f" in flags else [])


def plan_cells(seeds: Sequence[int], caps: Sequence[str]) -> list[Cell]:
    """Seed-major order, capabilities in the given order: the first seed's pair across code
    paths (the most informative comparison) comes first. Duplicates are dropped."""
    out: list[Cell] = []
    for s in seeds:
        for c in caps:
            cell = Cell(int(s), c)
            if cell not in out:
                out.append(cell)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lvlm.train.lm_steps=1500"`` -> (``["lvlm", "train", "lm_steps"]``, 1500); the value is
    read as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected key=value (dotted key, e.g. lvlm.train.lm_steps=1500)")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(params: Mapping[str, Any], seed: int, overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of the params mapping with ``seed`` and every ``key=value`` set. A key must
    already exist (a typo would otherwise be a silently ignored experiment)."""
    out = json.loads(json.dumps(params))
    out["seed"] = seed
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"--set {text!r}: no key {'.'.join(path[:i + 1])!r} in params.yaml")
            if i == len(path) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def params_text(params: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(params), sort_keys=False, default_flow_style=None, width=120)


def prepare_cell(cell_dir: Path, params: Mapping[str, Any], project: Path, dataset: Path) -> None:
    """Make ``cell_dir`` a project root: its params, ``dvc.yaml`` and a link to ``dataset``.

    Raises ``RuntimeError`` when the folder already holds a cell of other params."""
    text = params_text(params)
    cell_dir.mkdir(parents=True, exist_ok=True)
    target = cell_dir / "params.yaml"
    if target.is_file() and target.read_text() != text:
        raise RuntimeError(f"{target} holds other params than this matrix: use another --work-dir")
    target.write_text(text)
    if (project / "dvc.yaml").is_file():
        shutil.copyfile(project / "dvc.yaml", cell_dir / "dvc.yaml")
    link = cell_dir / "outputs" / "data" / "dataset"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) != dataset.resolve():
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(dataset.resolve(), target_is_directory=True)


def cell_env(cell_dir: Path, capability: str, src: Path | None = None,
             base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The cell's environment: its code path, its project root and (``src``) the package
    snapshot first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env.update(ATEN_CPU_CAPABILITY=capability, VLMCOMPRESS_ROOT=str(cell_dir.resolve()))
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve())] + [p for p in [env.get("PYTHONPATH", "")] if p])
    return env


def snapshot_source(project: Path, dest: Path, mode: str = "head") -> str:
    """Copy the package to ``dest/vlmcompress`` once (kept when it exists) and return what it
    is: the git commit (``mode="head"``, or a commit: ``git archive``) or ``"tree"`` (the working
    tree)."""
    stamp = dest / "SOURCE"
    if stamp.is_file():
        return stamp.read_text().strip()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if mode != "tree":
        commit = resolve_commit(project, "HEAD" if mode == "head" else mode)
        archive = subprocess.run(["git", "archive", commit, "src/vlmcompress"], cwd=project, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(tmp)], input=archive, check=True)
        label = commit
    else:
        shutil.copytree(project / "src" / "vlmcompress", tmp / "vlmcompress",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        label = "tree"
    (tmp / "SOURCE").write_text(label + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return label


# --- summary ---------------------------------------------------------------------------

def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")


def cell_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from a cell's metrics: headline numbers, each question type's margin over
    its most-common-answer baseline, and a pass/fail per floor."""
    by_type, maj = metrics.get("vqa_acc_by_type", {}), metrics.get("vqa_majority_acc_by_type", {})
    types = sorted(set(by_type) | set(QUESTION_TYPES))
    row: dict[str, Any] = {"seed": metrics.get("seed"), "capability": metrics.get("capability"),
                           "vqa": _num(metrics.get("vqa_acc"))}
    for t in types:
        row[f"margin_{t}"] = round(_num(by_type.get(t)) - _num(maj.get(t)), 2)
    margins = [row[f"margin_{t}"] for t in types]
    row["margin_min"] = min(margins) if margins and not any(math.isnan(m) for m in margins) else float("nan")
    row["i2t_r1"], row["t2i_r1"] = _num(metrics.get("retrieval_i2t_r1")), _num(metrics.get("retrieval_t2i_r1"))
    row["r1_min"] = min(row["i2t_r1"], row["t2i_r1"])
    row["grounding"] = _num(metrics.get("grounding_acc50"))
    row["train_seconds"] = _num(metrics.get("train_seconds"))
    row["cells_at_once"] = int(metrics.get("cells_at_once", 1))
    for col in CURVE_COLUMNS.values():
        if col in metrics:
            row[col] = _num(metrics[col])
    row["code"] = str(metrics.get("source", ""))[:10]
    for f in FLOORS:
        # Wall time shared with other cells says nothing about the recipe's cost.
        shared = f.name == "time" and row["cells_at_once"] > 1
        row[f"pass_{f.name}"] = "n/a" if shared else "pass" if f.passes(row[f.column]) else "FAIL"
    row["pass_all"] = "pass" if all(row[f"pass_{f.name}"] in ("pass", "n/a") for f in FLOORS) else "FAIL"
    return row


def summary_rows(metrics: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Cell rows, then ``mean`` / ``min`` / ``max`` rows over them (their pass columns count the
    cells that pass, ``k/n``, on the mean row)."""
    cells = [cell_row(m) for m in metrics]
    rows = list(cells)
    if not cells:
        return rows
    keys = list(dict.fromkeys(k for r in cells for k in r))
    numeric = [k for k in keys if k not in ("seed", "capability", "code", "cells_at_once") and not k.startswith("pass_")]
    aggs: list[tuple[str, Callable[[list[float]], float]]] = [
        ("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)]
    for label, fn in aggs:
        agg: dict[str, Any] = {}
        for k in keys:
            if k in numeric:
                vals = [r[k] for r in cells if isinstance(r.get(k), float) and not math.isnan(r[k])]
                agg[k] = round(fn(vals), 2) if vals else float("nan")
            elif k.startswith("pass_") and label == "mean":
                judged = [r for r in cells if r.get(k) != "n/a"]
                agg[k] = f"{sum(r.get(k) == 'pass' for r in judged)}/{len(judged)}"
            else:
                agg[k] = ""
        agg["seed"] = label
        rows.append(agg)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.2f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_no finished cell yet_\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows({k: _fmt(r.get(k)) for k in keys} for r in rows)


def floors_note() -> str:
    return "floors: " + ", ".join(f"{f.column} {'>=' if f.higher_is_better else '<='} {f.limit:g}" for f in FLOORS)


def phase_finals(rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """:data:`CURVE_COLUMNS` from curve rows (``curves.csv`` as dicts): each phase's last step."""
    last: dict[str, Mapping[str, str]] = {}
    for r in rows:
        if r.get("phase") and (r["phase"] not in last or int(r["step"]) >= int(last[r["phase"]]["step"])):
            last[r["phase"]] = r
    out = {}
    for (phase, key), col in CURVE_COLUMNS.items():
        value = last.get(phase, {}).get(key, "")
        if value not in ("", None):
            out[col] = round(float(value), 4)
    return out


def load_cell_metrics(work: Path, cells: Sequence[Cell] | None = None) -> list[dict[str, Any]]:
    """Metrics of the finished cells (plus their :func:`phase_finals`): those of ``cells`` in
    order, else every cell folder."""
    dirs = [work / c.name for c in cells] if cells is not None else sorted(p for p in work.iterdir() if p.is_dir())
    out = []
    for d in dirs:
        f = d / "metrics.json"
        if f.is_file():
            m = json.loads(f.read_text())
            curves = d / "outputs" / "lvlm" / "curves.csv"
            if curves.is_file():
                with open(curves, newline="") as fh:
                    m = {**phase_finals(list(csv.DictReader(fh))), **m}
            out.append(m)
    return out


def summarize(work: Path, cells: Sequence[Cell] | None = None) -> str:
    """Print and write (``summary.csv``, ``summary.md``) the table of the finished cells."""
    rows = summary_rows(load_cell_metrics(work, cells) if work.is_dir() else [])
    table = markdown_table(rows) + "\n" + floors_note() + "\n"
    print(table, flush=True)
    if rows:
        write_csv(rows, work / "summary.csv")
        (work / "summary.md").write_text(table)
    return table


# --- record ----------------------------------------------------------------------------

def recipe_of(source: str, overrides: Sequence[str], base: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two cells of one seed and code path the same run: the code's commit, the
    overrides and the base params (a hash of their canonical JSON)."""
    blob = json.dumps(base, sort_keys=True).encode()
    return {"source": source, "overrides": list(overrides), "base_params_sha256": hashlib.sha256(blob).hexdigest()}


def read_record(path: Path) -> dict[str, Any]:
    """``{"recipe": ..., "cells": {name: metrics}}``; an empty record when the file is missing.
    Raises ``ValueError`` (one line) on a file that is not such a record."""
    if not path.is_file():
        return {"recipe": None, "cells": {}}
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a matrix record ({exc.__class__.__name__})") from None
    if not (isinstance(rec, dict) and isinstance(rec.get("cells"), dict) and isinstance(rec.get("recipe"), (dict, type(None)))
            and all(isinstance(m, dict) for m in rec["cells"].values())):
        raise ValueError(f"{path}: not a matrix record (expected an object with 'recipe' and 'cells')")
    return rec


def check_recipe(rec: Mapping[str, Any], recipe: Mapping[str, Any], path: Path) -> None:
    """Raises ``ValueError`` when ``rec`` holds cells of another recipe."""
    have = rec.get("recipe")
    if have is not None and dict(have) != dict(recipe):
        diff = sorted(k for k in set(have) | set(recipe) if have.get(k) != recipe.get(k))
        raise ValueError(f"{path} records another recipe (differs in {', '.join(diff)}): "
                         f"use --src {have.get('source', '?')[:12]} and its overrides, or another --record")


def record_cell(path: Path, recipe: Mapping[str, Any], name: str, metrics: Mapping[str, Any]) -> None:
    """Add a finished cell to the record at ``path`` (written atomically)."""
    rec = read_record(path)
    check_recipe(rec, recipe, path)
    rec["recipe"] = dict(recipe)
    rec["cells"][name] = dict(metrics)
    rec["cells"] = dict(sorted(rec["cells"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def resolve_commit(project: Path, ref: str) -> str:
    """The full hash of ``ref`` in the project's git; ``ValueError`` when it names no commit."""
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=project,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"--src {ref!r}: not a commit of {project}")
    return done.stdout.strip()


# --- running ---------------------------------------------------------------------------

def _use_checkout_src() -> None:
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def ensure_dataset(project: Path, work: Path) -> Path:
    """The project's data set, generated by the data stage when missing (metrics to ``work``,
    so the project's tracked ``outputs/data/metrics.json`` is left alone)."""
    dataset = project / "outputs" / "data" / "dataset"
    if (dataset / "annotations").is_dir():
        return dataset
    _use_checkout_src()
    from vlmcompress.config import load_params
    from vlmcompress.data.stage import run_data_stage

    print(f"data set missing: generating {dataset}", flush=True)
    t0 = time.perf_counter()
    run_data_stage(load_params(project / "params.yaml"), root=dataset, metrics_path=work / "data_metrics.json")
    print(f"data set generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return dataset


def run_cell_here(cell_dir: Path, at_once: int = 1) -> int:
    """The body of one cell (in its subprocess, environment already set): the lvlm stage on
    the cell's root, then ``<cell>/metrics.json`` = its metrics + who ran it."""
    import torch
    import transformers

    import vlmcompress
    from vlmcompress.config import load_params
    from vlmcompress.data.dataset import load_all
    from vlmcompress.io import write_json
    from vlmcompress.lvlm.stage import run_lvlm_stage
    from vlmcompress.machine import cpu_model
    from vlmcompress.paths import project_root

    if project_root().resolve() != cell_dir.resolve():
        raise RuntimeError(f"VLMCOMPRESS_ROOT must point at the cell {cell_dir}, got {project_root()}")
    capability = torch.backends.cpu.get_cpu_capability()
    stamp = Path(vlmcompress.__file__).resolve().parents[1] / "SOURCE"
    source = stamp.read_text().strip() if stamp.is_file() else "live"
    print(f"cell {cell_dir.name}: ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')} "
          f"-> torch kernels {capability}; vlmcompress from {vlmcompress.__file__} ({source})", flush=True)
    params = load_params(cell_dir / "params.yaml")
    t0 = time.perf_counter()
    metrics = run_lvlm_stage(params, load_all(), log=lambda s: print(s, flush=True))
    metrics.update(seed=params.seed, capability=os.environ.get("ATEN_CPU_CAPABILITY", ""),
                   torch_capability=capability, cpu_model=cpu_model(), torch=torch.__version__,
                   transformers=transformers.__version__, source=source,
                   cell_wall_seconds=round(time.perf_counter() - t0, 1), cells_at_once=at_once)
    write_json(cell_dir / "metrics.json", metrics)
    return 0


def run_cell(cell: Cell, cell_dir: Path, src: Path | None, at_once: int = 1) -> int:
    """One cell in a subprocess (this script with ``--run-cell``); output to ``train.log``.
    ``at_once``: how many cells share the CPU with it (recorded beside its wall time)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-cell", str(cell_dir), "--cells-at-once", str(at_once)]
    with open(cell_dir / "train.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {cell.name}\n")
        log.flush()
        return subprocess.run(cmd, env=cell_env(cell_dir, cell.capability, src), stdout=log,
                              stderr=subprocess.STDOUT).returncode


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:6]))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="values of params `seed`")
    ap.add_argument("--caps", nargs="+", default=None,
                    help="ATEN_CPU_CAPABILITY values (default: avx2 default, + avx512 when the CPU has avx512f)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override for every cell, dotted key, YAML value (repeatable)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "lvlm_matrix",
                    help="where the cells live (default: outputs/lvlm_matrix)")
    ap.add_argument("--params", type=Path, default=None,
                    help="base params file (default: params.yaml of the cells' commit; with --src tree/live, the checkout's)")
    ap.add_argument("--src", default="head",
                    help="code the cells run: a snapshot of git HEAD (default), of a COMMIT (its params.yaml is "
                         "then the base), 'tree' (the working tree) or 'live' (the checkout itself)")
    ap.add_argument("--record", type=Path, default=None,
                    help="JSON record of the recipe and its finished cells (tracked; resumes the matrix later)")
    ap.add_argument("--dry-run", action="store_true", help="print the cells and exit")
    ap.add_argument("--summarize", action="store_true", help="only print / write the table of finished cells")
    ap.add_argument("--nice", type=int, default=19, help="niceness to run at (default 19: idle CPU only)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="cells run at once (default 1). Give each its share of the cores with --set "
                         "lvlm.train.threads=...; their training time is then not judged against the floor")
    ap.add_argument("--run-cell", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cells-at-once", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def base_params(args: argparse.Namespace, commit: str | None) -> dict[str, Any]:
    """The params every cell starts from: ``--params``, else ``params.yaml`` of the cells' commit
    (so an older recipe keeps its own schema), else the checkout's."""
    if args.params is not None:
        return yaml.safe_load(args.params.read_text())
    if commit is not None:
        shown = subprocess.run(["git", "show", f"{commit}:params.yaml"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode != 0:
            raise ValueError(f"--src {commit[:12]}: the commit has no params.yaml")
        return yaml.safe_load(shown.stdout)
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def summarize_record(path: Path, cells: Sequence[Cell] | None = None) -> str:
    """The table of the cells in a record (all of them, or those of ``cells`` in order)."""
    rec = read_record(path)
    names = [c.name for c in cells] if cells is not None else list(rec["cells"])
    rows = summary_rows([rec["cells"][n] for n in names if n in rec["cells"]])
    table = markdown_table(rows) + "\n" + floors_note() + "\n"
    print(table, flush=True)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_cell is not None:
        return run_cell_here(args.run_cell, args.cells_at_once)
    work = args.work_dir.resolve()
    caps = args.caps or default_capabilities(cpu_flags())
    cells = plan_cells(args.seeds, caps)
    try:
        if args.summarize:
            if args.record is not None:
                summarize_record(args.record)
            else:
                summarize(work)
            return 0
        commit = None
        if args.src not in ("tree", "live"):
            commit = resolve_commit(ROOT, "HEAD" if args.src == "head" else args.src)
        if args.record is not None and commit is None:
            raise ValueError(f"--record needs cells that run a commit (--src head or COMMIT), not --src {args.src}")
        base = base_params(args, commit)
        planned = {c: apply_overrides(base, c.seed, args.overrides) for c in cells}
        recipe = recipe_of(commit or args.src, args.overrides, base)
        recorded = {}
        if args.record is not None:
            rec = read_record(args.record)
            check_recipe(rec, recipe, args.record)
            recorded = rec["cells"]
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except (KeyError, ValueError) as exc:
        print(f"lvlm_matrix: {exc.args[0]}", file=sys.stderr)
        return 2

    def finished(c: Cell) -> bool:
        return c.name in recorded or (work / c.name / "metrics.json").is_file()

    if args.dry_run:
        for c in cells:
            state = "done" if finished(c) else "to run"
            print(f"{c.name}: seed={c.seed} ATEN_CPU_CAPABILITY={c.capability} -> {work / c.name} ({state})")
        return 0
    if args.nice > 0:
        os.nice(max(0, args.nice - os.nice(0)))
    work.mkdir(parents=True, exist_ok=True)
    dataset = ensure_dataset(ROOT, work)
    src = None if args.src == "live" else work / "src"
    if src is not None:
        got = snapshot_source(ROOT, src, "tree" if args.src == "tree" else commit)
        if commit is not None and got != commit:
            print(f"lvlm_matrix: {src} holds a snapshot of {got[:12]}, not {commit[:12]}: use another --work-dir",
                  file=sys.stderr)
            return 2
        print(f"cells run vlmcompress from {src} ({got})", flush=True)
    failed = []
    todo = []
    for i, c in enumerate(cells, 1):
        if finished(c):
            print(f"[{i}/{len(cells)}] {c.name}: done, skipped", flush=True)
        else:
            prepare_cell(work / c.name, planned[c], ROOT, dataset)
            todo.append((i, c))
    at_once = min(args.jobs, len(todo)) if todo else 1

    def run(i: int, c: Cell) -> tuple[Cell, int]:
        print(f"[{i}/{len(cells)}] {c.name}: running (log {work / c.name / 'train.log'})", flush=True)
        t0 = time.perf_counter()
        code = run_cell(c, work / c.name, src, at_once)
        print(f"[{i}/{len(cells)}] {c.name}: exit {code} after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        return c, code

    with ThreadPoolExecutor(max_workers=at_once) as pool:      # threads only wait on subprocesses
        for c, code in (f.result() for f in as_completed([pool.submit(run, i, c) for i, c in todo])):
            if code != 0:
                failed.append(c.name)
            if args.record is not None and (work / c.name / "metrics.json").is_file():
                record_cell(args.record, recipe, c.name, load_cell_metrics(work, [c])[0])
                recorded[c.name] = True
    for c in cells:     # cells finished in the work dir by an earlier run, not yet in the record
        if args.record is not None and c.name not in recorded and (work / c.name / "metrics.json").is_file():
            record_cell(args.record, recipe, c.name, load_cell_metrics(work, [c])[0])
    if args.record is not None:
        summarize_record(args.record, cells)
    else:
        summarize(work, cells)
    if failed:
        print(f"failed cells: {', '.join(failed)} (see their train.log)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
