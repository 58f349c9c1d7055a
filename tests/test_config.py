from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from vlmcompress.config import ConfigError, Params, from_dict, load_params, to_dict

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    lambda_rate: float
    mode: Literal["a", "b"]
    sizes: tuple[int, int]
    opt: int | None = None


@dataclass(frozen=True)
class Outer:
    codec: Inner
    names: list[str]


GOOD = {"codec": {"lambda_rate": 1, "mode": "a", "sizes": [1, 2]}, "names": ["x"]}


def _with(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


def test_valid_converts_types():
    out = from_dict(Outer, GOOD)
    assert out.codec.lambda_rate == 1.0 and isinstance(out.codec.lambda_rate, float)
    assert out.codec.sizes == (1, 2) and out.codec.opt is None


@pytest.mark.parametrize("path,value,message", [
    ("codec.lambda_rate", "abc", "codec.lambda_rate: expected float, got 'abc'"),
    ("codec.lambda_rate", True, "codec.lambda_rate: expected float, got True"),
    ("codec.mode", "c", "codec.mode: expected 'a' | 'b', got 'c'"),
    ("codec.sizes", [1, 2, 3], "codec.sizes: expected tuple[int, int], got [1, 2, 3]"),
    ("codec.opt", 1.5, "codec.opt: expected int | null, got 1.5"),
    ("names", "x", "names: expected list[str], got 'x'"),
])
def test_wrong_type_names_the_key_path(path, value, message):
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, _with(path, value))
    assert str(exc.value) == message


def test_unknown_and_missing_keys_name_the_path():
    bad = _with("codec.lamda_rate", 1.0)
    with pytest.raises(ConfigError, match=r"^codec\.lamda_rate: unknown key"):
        from_dict(Outer, bad)
    missing = yaml.safe_load(yaml.safe_dump(GOOD))
    del missing["codec"]["mode"]
    with pytest.raises(ConfigError, match=r"^codec\.mode: missing key$"):
        from_dict(Outer, missing)


@pytest.mark.parametrize("name", ["params.yaml", "configs/paper.yaml"])
def test_shipped_params_validate_and_round_trip(name):
    p = load_params(REPO / name)
    assert isinstance(p, Params)
    assert from_dict(Params, to_dict(p)) == p


def test_both_profiles_have_the_same_keys():
    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k != "sources":
                out |= keys(v, prefix + k + ".")
        return out
    a = yaml.safe_load((REPO / "params.yaml").read_text())
    b = yaml.safe_load((REPO / "configs/paper.yaml").read_text())
    assert keys(a) == keys(b)


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+") as exc:
        load_params(bad)
    assert "\n" not in str(exc.value)
    typo = tmp_path / "typo.yaml"
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["data"]["scenes"]["n_test"] = "many"
    typo.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"^data\.scenes\.n_test: expected int, got 'many'$"):
        load_params(typo)
