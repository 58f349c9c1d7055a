"""DVC dependencies that cannot go stale.

For every stage of ``dvc.yaml`` the test computes the import closure of its notebook (every
``vlmcompress`` module the notebook imports, and what those import, including imports inside
functions: statically, from the source) and fails when a module of it is not covered by a
``deps`` entry (the file or a folder above it): a change to that file would otherwise leave
DVC serving the old results. It also fails on a params key the closure reads as
``<params>.<section>.<key>`` that the stage's ``params`` do not cover. Reads through a local
alias of a section (``lp = params.lvlm; lp.attn_layer``) are not seen; the sections they come
from are, so listing whole sections stays safe.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from import_names import from_module

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SECTIONS = ("data", "lvlm", "codec", "tokens", "anchors", "bdrate", "eval_codec", "figures")


def module_file(name: str) -> Path | None:
    """The source file of module ``vlmcompress....`` (a package's ``__init__.py``), if any."""
    base = SRC / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def lazy_exports(path: Path) -> dict[str, str]:
    """``name -> submodule`` of a package ``__init__`` that exports names lazily (``_EXPORTS``)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def imported_modules(tree: ast.AST, current: str) -> set[str]:
    """Every ``vlmcompress`` module ``tree`` imports, inside functions too (they run when called).

    ``from pkg import name`` counts ``pkg.name`` when it is a submodule, and the submodule a
    lazily exporting package (``_EXPORTS``) takes ``name`` from."""
    out: set[str] = set()
    cur = module_file(current)
    package = current if cur is not None and cur.name == "__init__.py" else current.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vlmcompress")}
        elif isinstance(node, ast.ImportFrom):
            mod = from_module(node, package)
            if not mod.startswith("vlmcompress"):
                continue
            out.add(mod)
            init = module_file(mod)
            lazy = lazy_exports(init) if init is not None and init.name == "__init__.py" else {}
            for a in node.names:
                if module_file(f"{mod}.{a.name}"):
                    out.add(f"{mod}.{a.name}")
                elif a.name in lazy:
                    out.add(f"{mod}.{lazy[a.name]}")
    return {m for m in out if module_file(m)}


def closure(roots: set[str]) -> set[str]:
    """Every module reachable from ``roots``, with the packages that contain them."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or not module_file(name):
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]       # importing a.b.c runs a and a.b
        todo += sorted(imported_modules(ast.parse(module_file(name).read_text()), name))
    return seen


def notebook_imports(path: Path) -> set[str]:
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    return imported_modules(ast.parse(code), "vlmcompress")


def params_reads(files: set[Path]) -> set[str]:
    """``section`` or ``section.key`` paths read as ``<x>.params.<section>.<key>`` / ``P.<section>.<key>``."""
    reads: set[str] = set()
    for f in files:
        tree = ast.parse(f.read_text())
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:     # the whole chain only
                continue
            chain = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                chain.append(cur.id)
            chain.reverse()          # e.g. ['params', 'lvlm', 'attn_layer']
            for i, part in enumerate(chain[:-1]):
                if part in ("params", "P") and chain[i + 1] in SECTIONS:
                    reads.add(".".join(chain[i + 1:i + 3]))
    return reads


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_notebook(stage: dict) -> Path:
    nbs = [d for d in stage["deps"] if str(d).startswith("notebooks/")]
    assert len(nbs) == 1, f"a stage runs one notebook, found {nbs}"
    return ROOT / nbs[0]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def params_listed(stage: dict) -> set[str]:
    """The stage's params keys from params.yaml (the overlay file lists the same sections)."""
    return {p for p in stage.get("params", []) if isinstance(p, str)}


def key_covered(key: str, listed: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1))


def test_the_closure_follows_imports_inside_functions_and_lazy_exports(tmp_path):
    tree = ast.parse("def f():\n    from vlmcompress.codec.stage import run_codec_stage\n")
    assert "vlmcompress.codec.stage" in imported_modules(tree, "vlmcompress")
    tree = ast.parse("from vlmcompress.codec import build_codec\n")
    assert "vlmcompress.codec.model" in imported_modules(tree, "vlmcompress")     # a lazy export
    assert "vlmcompress" in closure({"vlmcompress.codec.model"})


def test_params_reads_are_found_through_attribute_chains(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("def g(params, self):\n    x = params.lvlm.attn_layer\n    y = self.params.codec\n    z = other.lvlm.x\n")
    assert params_reads({f}) == {"lvlm.attn_layer", "codec"}


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_imports_is_a_dvc_dependency(name):
    stage = stages()[name]
    mods = closure(notebook_imports(stage_notebook(stage)))
    files = {module_file(m) for m in mods}
    missing = sorted(str(f.relative_to(ROOT)) for f in files if not covered(f, stage["deps"]))
    assert not missing, f"dvc.yaml stage {name!r} lacks deps on modules its notebook imports: {missing}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_params_key_a_stage_reads_is_a_dvc_param(name):
    stage = stages()[name]
    # Schemas validate every section whichever stage loads them: not reads of the stage.
    files = {module_file(m) for m in closure(notebook_imports(stage_notebook(stage)))
             if not m.endswith(".config") and m not in ("vlmcompress.schema",)}
    listed = params_listed(stage)
    missing = sorted(k for k in params_reads(files) if not key_covered(k, listed))
    assert not missing, f"dvc.yaml stage {name!r} lacks params its code reads: {missing}"
