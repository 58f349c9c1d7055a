"""Named, swappable implementations that params files select by name.

A :class:`Registry` maps names to implementations (codec models, rank losses, ...). It is
open: ``@REGISTRY.register("mine")`` on a class or function in any module imported before
use adds one. Built-ins are *declared* by name with where they live (``"module:attr"``), so a
params schema can check a name without importing the implementation, which needs torch; the
built-in's own decorator then binds it when its module is imported, and must name the same
object. This module imports only the standard library.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"


class Registry(Mapping[str, T], Generic[T]):
    """``name -> implementation``; ``builtins`` maps each built-in name to ``"module:attr"``."""

    def __init__(self, kind: str, builtins: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._declared = dict(builtins or {})
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated object available as ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            declared = self._declared.get(name)
            if declared is not None and declared != _where(obj):
                raise ValueError(f"{self.kind} {name!r} is a built-in ({declared}); choose another name")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove a user-registered ``name`` (built-ins stay)."""
        if name in self._declared:
            raise ValueError(f"{self.kind} {name!r} is a built-in and cannot be removed")
        return self._items.pop(name)

    def names(self) -> list[str]:
        """Every name, built-ins first, without importing any implementation."""
        return list(dict.fromkeys([*self._declared, *self._items]))

    def __getitem__(self, name: str) -> T:
        if name not in self._items and name in self._declared:
            importlib.import_module(self._declared[name].partition(":")[0])   # its decorator binds it
            if name not in self._items:
                raise LookupError(f"{self.kind} {name!r}: {self._declared[name]} did not register it")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._declared or name in self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
