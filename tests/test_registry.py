"""vlmcompress.registry: names known without importing implementations; open to users."""
from __future__ import annotations

import sys
import types

import pytest

from vlmcompress.registry import Registry


def _module(name: str, reg: Registry) -> None:
    """A module that registers ``thing`` in ``reg`` when imported."""
    mod = types.ModuleType(name)

    def thing() -> str:
        return "built-in"
    thing.__module__, thing.__qualname__ = name, "thing"
    mod.thing = thing
    mod.__loader__ = None

    def load() -> None:
        reg.register("thing")(thing)
    mod.load = load
    sys.modules[name] = mod


def test_a_declared_builtin_is_known_before_its_module_is_imported_and_bound_on_first_use(monkeypatch):
    reg = Registry("widget", {"thing": "fake_widgets:thing"})
    assert "thing" in reg and reg.names() == ["thing"] and len(reg) == 1
    imported = []

    def fake_import(name):
        imported.append(name)
        _module(name, reg)
        sys.modules[name].load()
        return sys.modules[name]
    monkeypatch.setattr("vlmcompress.registry.importlib.import_module", fake_import)
    try:
        assert reg["thing"]() == "built-in" and imported == ["fake_widgets"]
        assert reg["thing"]() == "built-in" and imported == ["fake_widgets"]      # imported once
    finally:
        sys.modules.pop("fake_widgets", None)


def test_users_register_new_names_but_not_over_a_builtin_or_twice():
    reg = Registry("widget", {"thing": "fake_widgets:thing"})

    @reg.register("mine")
    def mine() -> int:
        return 1
    assert reg["mine"] is mine and reg.names() == ["thing", "mine"] and list(reg) == ["thing", "mine"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mine")(mine)
    with pytest.raises(ValueError, match="is a built-in"):
        reg.register("thing")(mine)
    with pytest.raises(ValueError, match="cannot be removed"):
        reg.unregister("thing")
    assert reg.unregister("mine") is mine and "mine" not in reg
    with pytest.raises(KeyError):
        reg["mine"]


def test_a_declared_module_that_does_not_register_its_name_is_a_clear_error():
    reg = Registry("widget", {"ghost": "vlmcompress.schema:ghost"})    # importable, registers nothing
    with pytest.raises(LookupError, match="did not register it"):
        reg["ghost"]
