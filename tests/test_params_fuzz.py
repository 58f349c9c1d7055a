"""Property: ``vlmcompress check-params`` on a randomly mutated params.yaml either accepts it or
answers with exactly one stderr line that names a key path or the file; it never raises."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmcompress.cli import main
from vlmcompress.config import Params

REPO = Path(__file__).resolve().parents[1]
BASE_TEXT = (REPO / "params.yaml").read_text()
BASE = yaml.safe_load(BASE_TEXT)
PREFIX = "vlmcompress check-params: error: "
SECTIONS = {f.name for f in dataclasses.fields(Params)}   # a missing key is named by the schema
# A `key: value` line of block YAML whose value is on the same line.
SCALAR_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*): (\S.*)$")

KEY_NAMES = st.one_of(st.integers(-10, 10**6), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
LEAVES = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-2**80, 2**80), st.sampled_from([0, -1, 1, 2**31, 2**64, 10**30]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 0.5]),
    st.text(max_size=30), st.sampled_from(["", "full", "vvc", "{question}", "<image>", "x" * 300]),
)
VALUES = st.one_of(
    LEAVES,
    st.lists(LEAVES, max_size=6),
    st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6), LEAVES, max_size=3),
)


def _strings(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_strings(v) for v in node.values()), {k for k in node if isinstance(k, str)})
    if isinstance(node, list):
        return set().union(*(_strings(v) for v in node))
    return {node} if isinstance(node, str) else set()


NAMES = sorted(_strings(BASE))   # method, codec and metric names etc. of the file, to swap around


def _like(old: Any) -> st.SearchStrategy:
    """Values of ``old``'s type: what reaches the value checks rather than the type check."""
    if isinstance(old, bool):
        return st.booleans()
    if isinstance(old, int):
        return st.one_of(st.integers(-3, 2 * abs(old) + 3), st.integers())
    if isinstance(old, float):
        near = 2 * abs(old) + 1 if abs(old) < 1e6 else 1.0   # nan and inf compare False
        return st.one_of(st.floats(-near, near), st.floats())
    if isinstance(old, str):
        return st.one_of(st.sampled_from(NAMES), st.text(max_size=20))
    if isinstance(old, list):
        return st.lists(_like(old[0]) if old else LEAVES, max_size=len(old) + 2)
    return VALUES


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a repeated object twice instead of as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (mapping keys and list indices) below ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


@st.composite
def mutated_params(draw: st.DrawFn) -> tuple[str, set[str]]:
    """(file text, names of its top-level keys) after 0-3 structural and 0-1 textual mutations."""
    data = copy.deepcopy(BASE)
    n_structural = draw(st.integers(0, 3))
    for _ in range(n_structural):
        kind = draw(st.sampled_from(["perturb", "perturb", "replace", "delete", "add"]))
        if kind == "add":
            mappings = [()] + [p for p in _paths(data) if isinstance(_get(data, p), dict)]
            _get(data, draw(st.sampled_from(mappings)))[draw(KEY_NAMES)] = draw(VALUES)
            continue
        paths = _paths(data)
        if not paths:
            continue
        *parent, last = draw(st.sampled_from(paths))
        node = _get(data, tuple(parent))
        if kind == "perturb":
            node[last] = draw(_like(node[last]))
        elif kind == "replace":
            node[last] = draw(VALUES)
        else:
            del node[last]
    text = yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False) if n_structural else BASE_TEXT
    lines = text.splitlines()
    scalar = [i for i, line in enumerate(lines) if SCALAR_LINE.match(line)]
    kind = draw(st.sampled_from(["none", "none", "none", "duplicate", "alias", "bomb"]))
    if kind == "duplicate" and scalar:
        i = draw(st.sampled_from(scalar))
        lines.insert(i + 1, lines[i])
    elif kind == "alias" and len(scalar) >= 2:
        i, j = sorted(draw(st.lists(st.sampled_from(scalar), min_size=2, max_size=2, unique=True)))
        indent, key, value = SCALAR_LINE.match(lines[i]).groups()
        lines[i] = f"{indent}{key}: &v {value}"
        indent, key, _ = SCALAR_LINE.match(lines[j]).groups()
        lines[j] = f"{indent}{key}: *v"
    elif kind == "bomb":
        lines += ["lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"lol{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 9)}]" for i in range(9)]
    return "\n".join(lines) + "\n", {str(k) for k in data} if isinstance(data, dict) else set()


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "params.yaml"


def _check_params(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check-params", str(path)])
    return rc, out.getvalue(), err.getvalue()


def test_unmutated_params_pass(params_file):
    params_file.write_text(BASE_TEXT)
    assert _check_params(params_file) == (0, f"{params_file}: ok\n", "")


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated_params())
def test_check_params_answers_a_mutated_file_with_ok_or_one_line(params_file, mutated):
    text, top_keys = mutated
    params_file.write_text(text)
    rc, out, err = _check_params(params_file)
    if rc == 0:
        assert err == "" and out == f"{params_file}: ok\n"
        return
    assert rc == 1 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(PREFIX), err
    msg = err[len(PREFIX):-1]
    assert len(msg) < 400, msg
    head = msg.split(": ", 1)[0]
    root = re.split(r"[.\[]", head)[0]
    assert head == str(params_file) or root in top_keys | SECTIONS, msg
