"""Plugins: other packages' models, datasets and any other registry entries, by name, for the CLI.

A package declares an entry point in the group `polytrain.plugins`; its value is a module, which registers
its entries when imported, or a callable, which registers them when called:

    # pyproject.toml of the package mynets
    [project.entry-points."polytrain.plugins"]
    mynets = "mynets.polytrain_plugin"          # that module does @MODELS.register("mynet")

A module of one's own on the path needs no packaging: POLYTRAIN_PLUGINS=mymodule,other:register names
modules (or module:callable) loaded the same way. `load_plugins()` loads each plugin once per process;
a spawned rank, a fresh process, loads them again from the same metadata and environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import types
from collections.abc import Callable
from typing import Any

ENTRY_POINT_GROUP = "polytrain.plugins"
ENVIRONMENT_VARIABLE = "POLYTRAIN_PLUGINS"

# Plugin names loaded in this process, in load order, and what each was loaded from.
_loaded: dict[str, str] = {}


class PluginError(ValueError):
    """A plugin failed to load; the message names it, what it was loaded from, and the exception."""


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _activate(loaded: Any) -> None:
    """A loaded module registered its entries on import; anything else callable is called to register them."""
    if not isinstance(loaded, types.ModuleType) and callable(loaded):
        loaded()


def _load(name: str, origin: str, load: Callable[[], Any]) -> None:
    if name in _loaded:
        return
    try:
        _activate(load())
    except Exception as error:
        raise PluginError(f"plugin {name!r} ({origin}) failed to load: {_one_line(error)}") from error
    _loaded[name] = origin


def _import_target(target: str) -> Any:
    """The module `a.b`, or the attribute `f` of module `a.b` for `a.b:f` (entry point syntax)."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name.strip())
    for part in filter(None, attribute.strip().split(".")):
        module = getattr(module, part)
    return module


def load_plugins() -> list[str]:
    """Loads every plugin not loaded yet in this process and returns the names of all loaded so far.

    Plugins are the entry points of the group `polytrain.plugins` (named by the entry point), then the
    modules named in $POLYTRAIN_PLUGINS (named by the module). Calling it again loads nothing twice, so a
    plugin's registrations never clash with themselves.

    Raises:
        PluginError: a plugin failed to import or to register (one line naming it and the exception);
            it is tried again on the next call.
    """
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load(entry_point.name, f"entry point {entry_point.name} = {entry_point.value}", entry_point.load)
    for target in filter(None, (part.strip() for part in os.environ.get(ENVIRONMENT_VARIABLE, "").split(","))):
        _load(target, f"named in ${ENVIRONMENT_VARIABLE}", lambda target=target: _import_target(target))
    return list(_loaded)


__all__ = ["ENTRY_POINT_GROUP", "ENVIRONMENT_VARIABLE", "PluginError", "load_plugins"]
