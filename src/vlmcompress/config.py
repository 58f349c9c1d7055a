"""Typed, strict loading of ``params.yaml``.

Every section of ``params.yaml`` is a frozen dataclass. :func:`from_dict` converts
plain YAML data into those dataclasses and fails *before any work* on an unknown
key, a missing key or a wrong type, with a message that names the key path::

    codec.lambda_rate: expected float, got 'abc'

Section dataclasses live next to the code that reads them (``data/config.py`` …)
and are assembled into :class:`Params` here, so adding a section touches one place.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from vlmcompress.paths import project_root

T = TypeVar("T")


class ConfigError(ValueError):
    """A params file that does not match its schema; the message names the key path."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(path: str, tp: Any, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def from_dict(tp: type[T] | Any, value: Any, path: str = "") -> T:
    """Convert YAML data ``value`` to type ``tp``, raising :class:`ConfigError` on mismatch.

    Supports dataclasses, ``bool``/``int``/``float``/``str``, ``Optional``/unions,
    ``Literal``, ``list[X]``, ``tuple[X, ...]`` and ``dict[str, X]``. An ``int`` is
    accepted where a ``float`` is expected; a ``bool`` is never accepted as a number.
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(path or "params", tp, value)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else str(unknown[0])
            raise ConfigError(f"{where}: unknown key (known: {', '.join(fields)})")
        kwargs = {}
        for name, field in fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in value:
                has_default = (field.default is not dataclasses.MISSING
                               or field.default_factory is not dataclasses.MISSING)
                if has_default:
                    continue
                raise ConfigError(f"{sub}: missing key")
            kwargs[name] = from_dict(hints[name], value[name], sub)
        return tp(**kwargs)
    if origin is Literal:
        # Compare type too, so `1` does not match `True` and `1.0` does not match `1`.
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        _fail(path, tp, value)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return from_dict(arg, value, path)
            except ConfigError:
                pass
        _fail(path, tp, value)
    if origin is list:
        if not isinstance(value, list):
            _fail(path, tp, value)
        (item,) = typing.get_args(tp)
        return [from_dict(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, tp, value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_dict(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            _fail(path, tp, value)
        return tuple(from_dict(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, tp, value)
        key_t, val_t = typing.get_args(tp)
        return {from_dict(key_t, k, f"{path}.{k}"): from_dict(val_t, v, f"{path}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(path, tp, value)
    raise TypeError(f"{path}: unsupported schema type {tp!r}")  # a bug in a schema, not in params


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: dataclasses to plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --- the params file -------------------------------------------------------------------
# Imported late-bound: section schemas are defined beside the code that uses them.
from vlmcompress.codec.config import CodecStageParams  # noqa: E402
from vlmcompress.data.config import DataParams  # noqa: E402
from vlmcompress.eval.config import AnchorsParams, BDRateParams, EvalCodecParams  # noqa: E402
from vlmcompress.figures.config import FiguresParams  # noqa: E402
from vlmcompress.lvlm.config import LvlmParams  # noqa: E402
from vlmcompress.tokens.config import TokensParams  # noqa: E402


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


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning I/O and syntax errors into one-line :class:`ConfigError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None


def load_params(path: str | Path | None = None) -> Params:
    """Load and validate a params file (default: the project's ``params.yaml``)."""
    path = Path(path) if path is not None else project_root() / "params.yaml"
    return from_dict(Params, read_yaml(path), "")
