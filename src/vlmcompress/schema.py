"""The schema language of ``params.yaml``: typed conversion and one-line errors.

A leaf module (standard library only), so every section schema can import it at the top and
``vlmcompress check-params`` needs no torch. :func:`from_dict` converts plain YAML data into
frozen dataclasses and fails *before any work* on an unknown key, a missing key, a wrong type
or a non-finite float, with a message that names the key path::

    codec.lambda_rate: expected float, got 'abc'

The ``check_*`` helpers are the value checks section schemas share; every failure is a
:class:`ConfigError` that quotes at most a short prefix of the bad value.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Collection, Iterable
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

MAX_PARAMS_BYTES = 1 << 20          # a params file is a few kB; refuse anything near a memory problem
SHOW_CHARS = 60                     # longest quoted value in an error message
SEED_MAX = 2**32 - 1                # numpy and torch both accept seeds in [0, 2**32 - 1]


class ConfigError(ValueError):
    """A params file that does not match its schema; the message names the key path."""


class _NotFinite(ConfigError):
    """A float of the right type but not finite: preferred over "expected X" inside unions."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, SHOW_CHARS, SHOW_CHARS, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def show(value: Any) -> str:
    """``repr(value)`` on one line, cut to about :data:`SHOW_CHARS` characters.

    Bounded in depth and length, so a huge or deeply nested value cannot blow up a message.
    """
    try:
        text = _REPR.repr(value)
    except ValueError:   # an int too long for str(); Python refuses to convert it
        text = f"<int of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return clip(text)


def clip(text: str, limit: int = SHOW_CHARS) -> str:
    """``text`` on one line, cut to about ``limit`` characters."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def key_path(path: str, key: Any) -> str:
    """``path.key``; a key that is not a short printable name is shown as a cut repr."""
    name = key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= SHOW_CHARS else show(key)
    return f"{path}.{name}" if path else name


def require(ok: bool, path: str, msg: str) -> None:
    """Raise ``ConfigError("path: msg")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{path}: {msg}")


def check_min(path: str, value: float, low: float, note: str = "") -> None:
    """``value >= low``; ``note`` (e.g. ``" (0: all)"``) is appended to the rule."""
    require(value >= low, path, f"must be >= {show(low)}{note}, got {show(value)}")


def check_range(path: str, value: float, low: float, high: float) -> None:
    """``low <= value <= high``."""
    require(low <= value <= high, path, f"must be in [{show(low)}, {show(high)}], got {show(value)}")


def check_choice(path: str, value: Any, known: Collection[Any], what: str) -> None:
    """``value`` is one of ``known`` (a registry's names or a literal set)."""
    # The list is clipped: a registry open to users can hold any number of names.
    require(value in known, path, f"unknown {what} {show(value)} (known: {clip(', '.join(map(str, known)), 80)})")


def check_unique(path: str, items: Iterable[Any], key: Callable[[Any], Any] = lambda x: x) -> None:
    """No item twice by ``key`` (a repeated method or codec would run twice under one name)."""
    seen: set[Any] = set()
    for item in items:
        require(key(item) not in seen, path, f"{show(item)} is listed twice")
        seen.add(key(item))


def check_names(path: str, names: list[str], known: Collection[str], what: str, *,
                allow_empty: bool = False) -> None:
    """A list of registry names: non-empty (unless allowed), each known, none twice."""
    require(allow_empty or len(names) > 0, path, f"needs at least one {what}")
    for i, name in enumerate(names):
        check_choice(f"{path}[{i}]", name, known, what)
    check_unique(path, names)


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
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {show(value)}")


def _finite_float(value: int | float, path: str) -> float:
    try:
        out = float(value)
    except OverflowError:   # an int beyond the float range
        out = math.inf
    if not math.isfinite(out):
        raise _NotFinite(f"{path}: must be a finite number, got {show(value)}")
    return out


def from_dict(tp: type[T] | Any, value: Any, path: str = "", *, strict: bool = False) -> T:
    """Convert YAML data ``value`` to type ``tp``, raising :class:`ConfigError` on mismatch.

    Supports dataclasses, ``bool``/``int``/``float``/``str``, ``Optional``/unions,
    ``Literal``, ``list[X]``, ``tuple[X, ...]`` and ``dict[str, X]``. An ``int`` is
    accepted where a ``float`` is expected; a ``bool`` is never accepted as a number;
    every ``float`` must be finite (no nan or inf). A dataclass field with
    ``metadata={"inline": types}`` is a ``dict`` whose entries sit beside the other fields
    in the file, each key allowed and typed by the mapping ``types()`` returns then (a
    registry). A ``ValueError`` from a dataclass's own checks becomes a ``ConfigError`` at its
    path (at ``path.field`` when its message starts with ``"field: "``). ``strict``: every
    field of the section tree must be given, defaults are not filled in (a params file states
    every value); entries of lists and mappings, and method sections, may still use defaults.
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(path or "params", tp, value)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        inline = next((f for f in fields.values() if "inline" in f.metadata), None)
        inline_types: dict[str, Any] = {}
        if inline is not None:   # its entries are keys of this mapping, typed by the field's metadata
            del fields[inline.name]
            inline_types = {k: t for k, t in inline.metadata["inline"]().items() if k not in fields}
        known = [*fields, *inline_types]
        unknown = [k for k in value if k not in fields and k not in inline_types]   # file order: mixed key types
        if unknown:
            raise ConfigError(f"{key_path(path, unknown[0])}: unknown key (known: {', '.join(known)})")
        kwargs = {}
        if inline is not None:
            kwargs[inline.name] = {k: from_dict(inline_types[k], v, key_path(path, k))
                                   for k, v in value.items() if k in inline_types}
        for name, field in fields.items():
            sub = key_path(path, name)
            if name not in value:
                has_default = (field.default is not dataclasses.MISSING
                               or field.default_factory is not dataclasses.MISSING)
                if has_default and not strict:
                    continue
                raise ConfigError(f"{sub}: missing key")
            kwargs[name] = from_dict(hints[name], value[name], sub, strict=strict)
        try:
            return tp(**kwargs)
        except ConfigError:
            raise
        except ValueError as exc:   # a schema's own check; "field: why" is placed at path.field
            head, sep, why = str(exc).partition(": ")
            if sep and head in fields:
                raise ConfigError(f"{key_path(path, head)}: {clip(why, 2 * SHOW_CHARS)}") from None
            raise ConfigError(f"{path or 'params'}: {clip(str(exc), 2 * SHOW_CHARS)}") from None
    if origin is Literal:
        # Compare type too, so `1` does not match `True` and `1.0` does not match `1`.
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        _fail(path, tp, value)
    if origin in (Union, types.UnionType):
        bad_value: _NotFinite | None = None
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return from_dict(arg, value, path, strict=strict)
            except _NotFinite as exc:
                bad_value = bad_value or exc
            except ConfigError:
                pass
        if bad_value is not None:
            raise bad_value
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
        return {from_dict(key_t, k, key_path(path, k)): from_dict(val_t, v, key_path(path, k))
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
            return _finite_float(value, path)
        _fail(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(path, tp, value)
    raise TypeError(f"{path}: unsupported schema type {tp!r}")  # a bug in a schema, not in params


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: dataclasses to plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if "inline" in f.metadata:
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
