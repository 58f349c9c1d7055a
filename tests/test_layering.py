"""Imports run one way: schemas → library → stages. Checked statically and in a fresh process."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from import_names import from_module

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "vlmcompress"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def top_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that importing ``name`` imports at once (module body, not functions)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in known:
                out.add(t)
                parts = t.split(".")
                out |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known}
    out.discard(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_module_level_imports():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        # A package's own submodules import the package first; that edge is not a cycle.
        graph[name] = {m for m in top_level_imports(path, name, set(mods)) if not name.startswith(m + ".")}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("module", ["vlmcompress.config", "vlmcompress.cli", "vlmcompress.tokens",
                                    "vlmcompress.lvlm", "vlmcompress.codec", "vlmcompress.registry",
                                    "vlmcompress.api"])
def test_params_and_package_imports_load_no_torch(module):
    code = (f"import sys, importlib; importlib.import_module({module!r})\n"
            "from vlmcompress.config import load_params; load_params()\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'accelerate', 'compressai') if m in sys.modules)\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]


def test_a_builtin_declaration_and_its_decorator_cannot_drift():
    from vlmcompress.tokens.config import FullParams, MethodSpec, add_method_spec, method_spec

    import vlmcompress.tokens.methods  # noqa: F401  (binds the built-ins)
    full = method_spec("full")
    with pytest.raises(ValueError, match="registered twice"):
        add_method_spec(MethodSpec("full", FullParams, full.fn))
    from vlmcompress.tokens.config import _SPECS, _declare
    saved = dict(_SPECS)
    try:
        _declare("full", FullParams, "vlmcompress.tokens.methods:full", adaptive=True)     # the code says otherwise
        with pytest.raises(ValueError, match="is a built-in declared as"):
            add_method_spec(MethodSpec("full", FullParams, full.fn))
    finally:
        _SPECS.clear()
        _SPECS.update(saved)


# --- stages are leaves ------------------------------------------------------------------------

def stage_modules() -> set[str]:
    """The modules that orchestrate one DVC stage each: ``<pkg>.stage`` and ``<pkg>.*_stage``."""
    return {m for m in modules() if m.rpartition(".")[2] == "stage" or m.endswith("_stage")}


def all_imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` (module ``name``) names in an import, inside functions too:
    ``import a.b``, ``from a import b`` (``a`` and ``a.b``), relative imports resolved."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = from_module(node, package)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def caller_files() -> dict[str, Path]:
    """Library modules (by name) plus scripts and benchmarks (by path from the project root)."""
    files: dict[str, Path] = dict(modules())
    for folder in ("scripts", "benchmarks"):
        files |= {str(p.relative_to(ROOT)): p for p in sorted((ROOT / folder).glob("*.py"))}
    return files


# The command line's ``run`` starts stages; a script that runs a whole stage per cell of a matrix
# (each cell one ``lvlm`` stage run in its own project root) is a runner of stages as well.
STAGE_RUNNERS = {"vlmcompress.cli", "scripts/lvlm_matrix.py"}


def test_the_stage_modules_are_found():
    assert {"vlmcompress.data.stage", "vlmcompress.lvlm.stage", "vlmcompress.codec.stage",
            "vlmcompress.eval.codec_stage", "vlmcompress.tokens.stage", "vlmcompress.figures.stage"} <= stage_modules()


def test_all_imports_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from vlmcompress.data import stage\n    from . import timing\n")
    assert {"vlmcompress.data.stage", "vlmcompress.codec.timing"} <= all_imports(f, "vlmcompress.codec.probe")


def test_nothing_but_the_stage_runners_imports_a_stage():
    stages, mods = stage_modules(), modules()
    bad = {who: sorted(all_imports(path, who if who in mods else "") & stages)
           for who, path in caller_files().items() if who not in STAGE_RUNNERS}
    bad = {who: mods for who, mods in bad.items() if mods}
    assert not bad, ("stage modules are leaves; import the library or vlmcompress.api instead: "
                     + "; ".join(f"{who} imports {', '.join(mods)}" for who, mods in sorted(bad.items())))


# --- the LVLM seam ----------------------------------------------------------------------------

# Code that works on a stock Hugging Face model (or the trainer's own LLaVA), not on the adapter.
STOCK_MODEL_CODE = ("src/vlmcompress/lvlm/", "src/vlmcompress/integrations/", "src/vlmcompress/tokens/hf.py",
                    "src/vlmcompress/tokens/hf_")


def test_nothing_reaches_past_the_lvlm_adapter():
    """Outside the LVLM package the projector is ``LVLM.projector``, never the model's attribute."""
    files = [p for p in sorted(PKG.rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
             + sorted((ROOT / "benchmarks").glob("*.py"))
             if not str(p.relative_to(ROOT)).startswith(STOCK_MODEL_CODE)]
    bad = sorted(str(p.relative_to(ROOT)) for p in files
                 if "multi_modal_projector" in (text := p.read_text()) or ".llava.model" in text)
    assert not bad, f"reach into LVLM.llava (use the adapter's vision_tower / projector / language_model): {bad}"


def test_the_api_offers_what_its_docstring_lists():
    from vlmcompress import api

    for name in api.__all__:
        assert callable(getattr(api, name)), name
        assert f"``{name}(" in api.__doc__, f"vlmcompress.api's docstring does not list {name}"
    with pytest.raises(AttributeError):
        api.no_such_name  # noqa: B018
