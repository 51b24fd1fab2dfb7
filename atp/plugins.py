"""The plugin manager and the component registry built from it.

Components are looked up by kind and name (``registry().get("policy", "atp")``). The
registry is built once per process, lazily, from the built-in plugins and the packages
that expose the ``atp`` entry-point group; it is read-only afterwards, so nothing calls
the plugin manager inside ``forward``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from atp import hookspecs

KINDS = {
    "scorer": "atp_register_scorers",
    "threshold_head": "atp_register_threshold_heads",
    "mask_combiner": "atp_register_mask_combiners",
    "position_keeper": "atp_register_position_keepers",
    "budget_loss": "atp_register_budget_losses",
    "policy": "atp_register_policies",
    "backbone": "atp_register_backbones",
}
BUILTIN_PLUGINS = ("atp.scorers", "atp.components", "atp.policies", "atp.backbones")
STRICT_ENV = "ATP_STRICT_PLUGINS"


@dataclass(frozen=True)
class Entry:
    """One registered component: its kind, name, factory and the package it came from."""

    kind: str
    name: str
    factory: Any
    origin: str


class Registry:
    """Read-only mapping ``(kind, name) -> Entry`` collected from all plugins."""

    def __init__(self, entries: dict[tuple[str, str], Entry]):
        self._entries = entries

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self._entries if k == kind)

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: (e.kind, e.name))

    def get(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {sorted(KINDS)}")
        if not isinstance(name, str) or (kind, name) not in self._entries:
            raise ValueError(
                f"unknown {kind} {name!r}; registered {kind}s: {', '.join(self.names(kind)) or 'none'}. "
                "Run `atp plugins` to list every component and the package it comes from."
            )
        return self._entries[(kind, name)]


def plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with the built-ins and the ``atp`` entry points loaded."""
    pm = pluggy.PluginManager("atp")
    pm.add_hookspecs(hookspecs)
    for module in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module), name=module)
    for ep in entry_points(group="atp"):
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as error:  # a broken plugin must not take the host down
            if os.environ.get(STRICT_ENV, "") not in ("", "0"):
                raise
            warnings.warn(
                f"atp plugin {ep.name!r} ({ep.value}) failed to load and was skipped: {error!r}. "
                f"Set {STRICT_ENV}=1 to turn this into an error.",
                RuntimeWarning,
                stacklevel=2,
            )
    pm.check_pending()  # misspelt hook names in a plugin raise here
    return pm


def _origin(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or getattr(plugin, "__name__", "?")
    dist = {p: d for p, d in pm.list_plugin_distinfo()}.get(plugin)
    return f"{dist.project_name} {dist.version}" if dist is not None else name.split(".")[0]


@functools.cache
def registry() -> Registry:
    """The process-wide registry (built on first use, then read-only)."""
    pm = plugin_manager()
    entries: dict[tuple[str, str], Entry] = {}
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            origin = _origin(pm, impl.plugin)

            def register(name: str, factory: Any, *, _kind: str = kind, _origin: str = origin) -> None:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"{_kind} names must be non-empty strings, got {name!r} from {_origin}")
                if (_kind, name) in entries:
                    raise ValueError(
                        f"{_kind} {name!r} from {_origin} clashes with the one from "
                        f"{entries[(_kind, name)].origin}; pick another name"
                    )
                entries[(_kind, name)] = Entry(_kind, name, factory, _origin)

            impl.function(register=register)
    return Registry(entries)
