"""Loading of ``params.yaml``: bounded YAML reading, profiles, and the whole :class:`Params`.

Section dataclasses live next to the code that reads them (``data/config.py`` …) together
with their value checks (``check_*_params``: ranges, orderings, known names), written in the
schema language of :mod:`vlmcompress.schema`; :func:`load_params` converts the file with
:func:`~vlmcompress.schema.from_dict` and runs every check, so a stage and
``vlmcompress check-params`` refuse the same files with the same one-line
:class:`~vlmcompress.schema.ConfigError`.

Reading is bounded: the file is capped at :data:`MAX_PARAMS_BYTES`, duplicate mapping
keys are refused, and so are YAML anchors and aliases (a params file needs none, and an
alias bomb could otherwise expand without limit).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode

from vlmcompress.io import read_capped
from vlmcompress.paths import project_root
from vlmcompress.schema import (  # noqa: F401  (re-exported: the params API in one place)
    MAX_PARAMS_BYTES, SEED_MAX, SHOW_CHARS, ConfigError, check_choice, check_min, check_names, check_range,
    check_unique, clip, from_dict, key_path, require, show, to_dict,
)
from vlmcompress.codec.config import CodecStageParams, check_stage_params
from vlmcompress.data.config import DataParams, check_data_params
from vlmcompress.eval.config import (AnchorsParams, BDRateParams, EvalCodecParams, check_anchors_params,
                                     check_bdrate_params, check_eval_codec_params)
from vlmcompress.figures.config import FiguresParams, check_figures_params
from vlmcompress.lvlm.config import LvlmParams, check_lvlm_params
from vlmcompress.tokens.config import TokensParams, check_tokens_params


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``: one section per pipeline stage."""

    profile: Literal["embedded", "paper"]
    seed: int
    data: DataParams
    lvlm: LvlmParams
    codec: CodecStageParams
    tokens: TokensParams
    anchors: AnchorsParams
    bdrate: BDRateParams
    eval_codec: EvalCodecParams
    figures: FiguresParams


def check_params(p: Params) -> None:
    """Every section's value checks, then the checks that tie sections together."""
    check_range("seed", p.seed, 0, SEED_MAX)
    check_data_params(p.data)
    check_lvlm_params(p.lvlm)
    check_stage_params(p.codec)
    check_tokens_params(p.tokens)
    check_anchors_params(p.anchors)
    check_bdrate_params(p.bdrate, p.anchors)
    check_eval_codec_params(p.eval_codec, levels=p.codec.model.levels)
    check_figures_params(p.figures)
    if p.lvlm.source == "train":   # the embedded model's sizes are known now; a hub model's only once loaded
        _check_against_arch(p)


def _check_against_arch(p: Params) -> None:
    """Layer indices, token counts and widths that must fit the embedded model (``lvlm.arch``)."""
    a = p.lvlm.arch
    layers = a.vision_layers
    require(-layers <= p.tokens.attention_layer < layers, "tokens.attention_layer",
            f"must index a layer of lvlm.arch.vision_layers ({show(layers)}): in [-{show(layers)}, "
            f"{show(layers - 1)}], got {show(p.tokens.attention_layer)}")
    n_patches = (a.image_size // a.patch_size) ** 2
    for i, b in enumerate(p.tokens.budgets):
        if isinstance(b, int):
            require(b <= n_patches, f"tokens.budgets[{i}]",
                    f"a token count must be <= the {show(n_patches)} visual tokens of lvlm.arch, got {show(b)}")
    pre = p.codec.model.preedit
    if pre.enabled and pre.use_tokens:
        require(pre.token_dim == a.vision_hidden, "codec.model.preedit.token_dim",
                f"must equal lvlm.arch.vision_hidden ({show(a.vision_hidden)}), the width of the tokens "
                f"it fuses, got {show(pre.token_dim)}")


class ParamsLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses duplicate mapping keys and any anchor or alias."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, "anchors and aliases are not allowed in a params file",
                                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: dict[Any, None] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:   # a list or mapping as a key
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           "found unhashable key", key_node.start_mark) from None
                if duplicate:
                    raise ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
                seen[key] = None
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).strip() or type(exc).__name__
    return f"invalid YAML{where} ({clip(str(problem), 2 * SHOW_CHARS)})"


def read_yaml(path: Path) -> Any:
    """Parse a params file with :class:`ParamsLoader`; every failure is a one-line :class:`ConfigError`."""
    try:
        raw = read_capped(path, MAX_PARAMS_BYTES, "params file")
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read params file (No such file or directory)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    except ValueError as exc:    # a folder, FIFO or device; or over the size cap
        raise ConfigError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: params file is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except ValueError as exc:   # e.g. an integer with more digits than Python converts
        raise ConfigError(f"{path}: invalid YAML ({clip(str(exc), 2 * SHOW_CHARS)})") from None


BASE_PROFILE = "embedded"      # params.yaml itself; any other profile is an overlay file


def profile_file(profile: str, params_path: Path) -> Path:
    """``configs/<profile>.yaml`` beside the params file, else in the project."""
    for root in (params_path.parent, project_root()):
        if (root / "configs" / f"{profile}.yaml").is_file():
            return root / "configs" / f"{profile}.yaml"
    raise ConfigError(f"profile: no configs/{profile}.yaml beside {params_path} or in the project")


def overlay(base: dict, over: dict) -> dict:
    """``over`` laid on ``base`` key by key: mappings merge, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_params(path: str | Path | None = None) -> Params:
    """Load a params file (default: the project's ``params.yaml``) and run every value check.

    With ``profile`` other than ``embedded``, ``configs/<profile>.yaml`` (only the values that
    differ) is laid over the file first. Every key must then be present: a missing one is an
    error naming its path, never a silent default.
    """
    path = Path(path) if path is not None else project_root() / "params.yaml"
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections, got {show(data)}")
    profile = data.get("profile")
    if isinstance(profile, str) and profile != BASE_PROFILE and profile.isidentifier():
        extra_path = profile_file(profile, path)
        extra = read_yaml(extra_path)
        if not isinstance(extra, dict) or "profile" in extra:
            raise ConfigError(f"{extra_path}: expected a mapping of params values (without 'profile')")
        data = overlay(data, extra)
    params = from_dict(Params, data, "", strict=True)
    check_params(params)
    return params
