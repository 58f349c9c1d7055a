from __future__ import annotations

import re
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


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_shipped_params_validate_and_round_trip(profile, tmp_path):
    from conftest import paper_params_path
    p = load_params(REPO / "params.yaml" if profile == "embedded" else paper_params_path(tmp_path))
    assert isinstance(p, Params) and p.profile == profile
    assert from_dict(Params, to_dict(p)) == p


def test_the_paper_profile_is_an_overlay_of_only_what_differs(tmp_path):
    """configs/paper.yaml holds values that differ from params.yaml, each at a key params.yaml has."""
    from conftest import paper_params_path

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    over = yaml.safe_load((REPO / "configs/paper.yaml").read_text())

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and k != "sources":
                yield from leaves(v, prefix + k + ".")
            else:
                yield prefix + k, v

    flat_base = dict(leaves(base))
    for key, value in leaves(over):
        assert key in flat_base or key.startswith("data.download.sources"), key
        assert flat_base.get(key) != value, f"{key} repeats params.yaml"
    p = load_params(paper_params_path(tmp_path))
    assert (p.data.source, p.lvlm.source, p.lvlm.image_aspect, p.codec.model.N) == ("coco", "pretrained", "pad", 128)
    assert p.seed == base["seed"] and p.figures == load_params(REPO / "params.yaml").figures


def test_a_missing_key_is_an_error_never_a_silent_default(tmp_path):
    text = (REPO / "params.yaml").read_text()
    gone = "\n".join(line for line in text.splitlines() if not line.strip().startswith("gain_lr_scale:")) + "\n"
    with pytest.raises(ConfigError, match=r"^codec\.train\.gain_lr_scale: missing key$"):
        load_params(_write(tmp_path, gone))


def test_profile_errors_name_the_file(tmp_path):
    text = (REPO / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"^profile: expected 'embedded' \| 'paper'|no configs/gpu.yaml"):
        load_params(_write(tmp_path, text.replace("profile: embedded", "profile: gpu", 1)))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "paper.yaml").write_text("lvlm:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"^lvlm\.nope: unknown key"):
        load_params(_write(tmp_path, text.replace("profile: embedded", "profile: paper", 1)))


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


# --- value checks of every section, run by load_params ------------------------------------

def _load_with(tmp_path: Path, changes: dict[str, object]) -> Params:
    """Load params.yaml with ``{"a.b.c": value}`` changes applied (written back as a file)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_params(path)


@pytest.mark.parametrize("changes,message", [
    ({"data.scenes.n_test": -3}, r"^data\.scenes\.n_test: must be in \[1, 999999\], got -3$"),
    ({"data.scenes.min_objects": 7},
     r"^data\.scenes\.min_objects: must be <= data\.scenes\.max_objects \(5\), got 7$"),
    ({"data.scenes.large_size": [40, 30]}, r"^data\.scenes\.large_size: needs \[min, max\] with min <= max"),
    ({"data.download.sources": {"coco_zip": {"url": "http://x/a.zip"}}},
     r"^data\.download\.sources\.coco_zip: unknown source 'coco_zip'"),
    ({"lvlm.train.lm_steps": -1}, r"^lvlm\.train\.lm_steps: must be >= 0, got -1$"),
    ({"lvlm.train.lm_batch": 7000}, r"^lvlm\.train\.lm_batch: must be <= lvlm\.train\.pool_scenes \(6000\)"),
    ({"lvlm.arch.patch_size": 0}, r"^lvlm\.arch\.patch_size: must be >= 1, got 0$"),
    ({"lvlm.arch.stem_layers": 2},
     r"^lvlm\.arch\.stem_layers: gives stride 2\*\*2 = 4, but lvlm\.arch\.patch_size is 8"),
    ({"lvlm.arch.vision_heads": 3},
     r"^lvlm\.arch\.vision_hidden: must be a multiple of lvlm\.arch\.vision_heads \(3\)"),
    ({"lvlm.prompts.template": "USER: {instruction}"}, r"^lvlm\.prompts\.template: needs exactly one <image>"),
    ({"lvlm.prompts.vqa": "{q}"}, r"^lvlm\.prompts\.vqa: needs the placeholder \{question\} and no other"),
    ({"codec.loss.lambdas": [16.0, 4.0, 1.0, 0.25, 0.0625, 0.015625, 0.002]},   # one per level, falling
     r"^codec\.loss\.lambdas: must increase with the rate level"),
    ({"codec.train.lr": float("inf")}, r"^codec\.train\.lr: must be a finite number, got inf$"),
    ({"codec.model.preedit.token_dim": 64},
     r"^codec\.model\.preedit\.token_dim: must equal lvlm\.arch\.vision_hidden \(128\)"),
    ({"tokens.methods": []}, r"^tokens\.methods: needs at least one method$"),
    ({"tokens.methods": ["full", "random", "full"]}, r"^tokens\.methods: 'full' is listed twice$"),
    ({"tokens.budgets": [0.1, 0.1]}, r"^tokens\.budgets: 0\.1 is listed twice$"),
    ({"tokens.eval.reference_method": "visionzip", "tokens.methods": ["full", "recoverable"]},
     r"^tokens\.eval\.reference_method: must be one of tokens\.methods"),
    ({"tokens.budgets": [1000]}, r"^tokens\.budgets\[0\]: a token count must be <= the 256 visual tokens"),
    ({"anchors.n_points": 1}, r"^anchors\.n_points: must be >= 2, got 1$"),
    ({"anchors.codecs": [{"name": "jpeg"}, {"name": "jpeg"}]}, r"^anchors\.codecs: 'jpeg' is listed twice$"),
    ({"bdrate.anchor": "h266"}, r"^bdrate\.anchor: 'h266' is not among anchors\.codecs"),
    ({"eval_codec.workers": -1}, r"^eval_codec\.workers: must be >= 0, got -1$"),
    ({"eval_codec.learned_rates": [0.0, 7.0]},
     r"^eval_codec\.learned_rates: rates must be <= codec\.model\.levels - 1 \(6\)"),
    ({"figures.dpi": 10}, r"^figures\.dpi: must be in \[30, 1200\], got 10$"),
    ({"figures.formats": ["png", "png"]}, r"^figures\.formats: 'png' is listed twice$"),
    ({"figures.formats": ["png"]}, r"^figures\.formats: must include png and svg .*got \['png'\]$"),
    ({"seed": -1}, r"^seed: must be in \[0, 4294967295\], got -1$"),
])
def test_every_section_is_value_checked_on_load(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _load_with(tmp_path, changes)


@pytest.mark.parametrize("key,value", [
    ("data.scenes.p_small", float("nan")), ("lvlm.train.lm_lr", float("-inf")),
    ("tokens.budgets", [float("nan")]), ("anchors.codecs", [{"name": "vvc", "options": {"qpa": float("nan")}}]),
    ("codec.train.lr", 10 ** 400),   # an int beyond the float range
])
def test_non_finite_floats_are_refused_everywhere(tmp_path, key, value):
    with pytest.raises(ConfigError, match=r": must be a finite number, got "):
        _load_with(tmp_path, {key: value})


def test_from_dict_prefers_the_finiteness_error_inside_unions():
    @dataclass(frozen=True)
    class Opt:
        x: float | None
        y: int | float

    assert from_dict(Opt, {"x": None, "y": 2}) == Opt(None, 2)
    with pytest.raises(ConfigError, match=r"^x: must be a finite number, got nan$"):
        from_dict(Opt, {"x": float("nan"), "y": 1})
    with pytest.raises(ConfigError, match=r"^y: must be a finite number, got inf$"):
        from_dict(Opt, {"x": 1.0, "y": float("inf")})


def test_unknown_keys_of_mixed_types_name_the_first_one():
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    bad["codec"].update({1: "a", "zzz": "b"})
    with pytest.raises(ConfigError, match=r"^codec\.1: unknown key \(known: lambda_rate, mode, sizes, opt\)$"):
        from_dict(Outer, bad)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_duplicate_keys_are_refused_at_any_level(tmp_path):
    base = (REPO / "params.yaml").read_text()
    nested = re.sub(r"(?m)^(    lm_steps: .*)$", r"\1\n    lm_steps: 3", base, count=1)
    for text, key in ((base + "seed: 1\n", "'seed'"), (nested, "'lm_steps'"),
                      (base.replace("qualities: {}", "qualities: {vvc: [1, 2], vvc: [3, 4]}"), "'vvc'")):
        path = _write(tmp_path, text)
        where = re.escape(str(path))
        with pytest.raises(ConfigError, match=rf"^{where}: invalid YAML at line \d+ \(duplicate key {key}\)$"):
            load_params(path)


def test_anchors_and_aliases_are_refused_so_an_alias_bomb_cannot_expand(tmp_path):
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(9)]
    bomb = _write(tmp_path, "\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 1 \(anchors and aliases are not allowed"):
        load_params(bomb)
    plain = (REPO / "params.yaml").read_text().replace("seed: 0\n", "seed: &s 0\n", 1)
    with pytest.raises(ConfigError, match=r"anchors and aliases are not allowed"):
        load_params(_write(tmp_path, plain))


def test_shipped_profiles_use_no_anchors_or_aliases():
    for name in ("params.yaml", "configs/paper.yaml"):
        events = yaml.parse((REPO / name).read_text(), Loader=yaml.SafeLoader)   # the overlay too
        assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events), name


def test_errors_quote_only_a_short_prefix_of_a_value(tmp_path):
    long = "x" * 200_000
    nested = [[[[[[i]]]]] for i in range(1000)]
    for changes in ({"tokens.methods": [long]}, {"lvlm.arch.patch_size": long}, {"figures.dpi": nested}):
        with pytest.raises(ConfigError) as exc:
            _load_with(tmp_path, changes)
        msg = str(exc.value)
        assert len(msg) < 200 and "\n" not in msg and "..." in msg, msg


def test_show_is_short_one_line_and_never_fails():
    from vlmcompress.config import show
    assert show("a\nb") == "'a\\nb'"
    for value in ("x\n" * 10_000, 10 ** 4000, 2 ** 100_000, [[[[[[[[1]]]]]]]] * 50, dict.fromkeys(range(1000), "v")):
        text = show(value)
        assert len(text) <= 60 and "\n" not in text


def test_reading_is_bounded(tmp_path):
    big = _write(tmp_path, "seed: 0\n" + "#" * (1 << 20))
    with pytest.raises(ConfigError, match=r"params file larger than 1048576 bytes$"):
        load_params(big)
    deep = _write(tmp_path, "seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(nested too deeply\)$"):
        load_params(deep)
    digits = _write(tmp_path, "seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r": invalid YAML \(Exceeds the limit"):
        load_params(digits)


@pytest.mark.parametrize("content,message", [
    (b"", r"expected a mapping of params sections, got None$"),
    (b"- 1\n- 2\n", r"expected a mapping of params sections, got \[1, 2\]$"),
    (b"\xff\xfe\x00", r"params file is not UTF-8 text$"),
    (b"seed: 0\x00\n", r"invalid YAML \(unacceptable character #x0000"),
])
def test_files_that_are_not_params_mappings_name_the_file(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_params(path)
