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
    """Read-only mapping ``(kind, name) -> Entry`` collected from all plugins, plus the hooks
    that are not registrations (backbone resolution, observers), resolved once."""

    def __init__(self, entries: dict[tuple[str, str], Entry], pm: pluggy.PluginManager):
        self._entries = entries
        self._pm = pm

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self._entries if k == kind)

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: (e.kind, e.name))

    def get(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {sorted(KINDS)}")
        if not isinstance(name, str) or (kind, name) not in self._entries:
            raise ValueError(
                f"unknown {kind} {name!r}; registered: {', '.join(self.names(kind)) or 'none'}. "
                "Run `atp plugins` to list every component and the package it comes from."
            )
        return self._entries[(kind, name)]

    def resolve_backbone(self, model) -> str | None:
        """The first plugin answer to ``atp_resolve_backbone`` (None if no plugin claims the model)."""
        return self._pm.hook.atp_resolve_backbone(model=model)

    def observers(self) -> list:
        """The ``atp_observe`` implementations, to be called directly (no plugin manager in forward)."""
        return [impl.function for impl in self._pm.hook.atp_observe.get_hookimpls()]


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _skip(name: str, what: str, error: BaseException) -> None:
    """A broken plugin must not take the host down: warn (or raise in strict mode)."""
    if _strict():
        raise error
    warnings.warn(
        f"atp plugin {name!r} {what} and was skipped: {error!r}. Set {STRICT_ENV}=1 to turn this into an error.",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_hook_names(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Raise for hook implementations whose name matches no hook (a misspelt hook)."""
    unknown = [caller.name for caller in pm.get_hookcallers(plugin) or [] if caller.spec is None]
    if unknown:
        known = sorted(n for n in dir(hookspecs) if n.startswith("atp_"))
        raise pluggy.PluginValidationError(
            plugin, f"plugin {name!r} implements unknown hook(s) {unknown}; atp's hooks are {known}"
        )


def plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with the built-ins and the ``atp`` entry points loaded (failures isolated)."""
    pm = pluggy.PluginManager("atp")
    pm.add_hookspecs(hookspecs)
    pm.atp_origins = {}
    for module in BUILTIN_PLUGINS:
        plugin = importlib.import_module(module)
        pm.register(plugin, name=module)
        pm.atp_origins[plugin] = "atp"
    for ep in entry_points(group="atp"):
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as error:
            _skip(ep.name, f"({ep.value}) failed to load", error)
            continue
        try:
            _check_hook_names(pm, plugin, ep.name)
        except pluggy.PluginValidationError as error:
            pm.unregister(plugin)
            _skip(ep.name, "is invalid", error)
            continue
        dist = getattr(ep, "dist", None)
        pm.atp_origins[plugin] = f"{dist.name} {dist.version}" if dist is not None else ep.name
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    entries: dict[tuple[str, str], Entry] = {}
    origins = getattr(pm, "atp_origins", {})
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            origin = origins.get(impl.plugin, pm.get_name(impl.plugin) or "?")
            found: dict[tuple[str, str], Entry] = {}

            def register(
                name: str, factory: Any, *, _kind: str = kind, _origin: str = origin, _found=found
            ) -> None:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"{_kind} names must be non-empty strings, got {name!r} from {_origin}")
                if (_kind, name) in entries or (_kind, name) in _found:
                    clash = entries.get((_kind, name)) or _found[(_kind, name)]
                    raise ValueError(
                        f"{_kind} {name!r} from {_origin} clashes with the one from {clash.origin}"
                    )
                _found[(_kind, name)] = Entry(_kind, name, factory, _origin)

            try:
                impl.function(register=register)
            except Exception as error:
                if origin == "atp":
                    raise
                _skip(pm.get_name(impl.plugin) or origin, f"failed in {hook_name}", error)
                continue
            entries.update(found)
    return Registry(entries, pm)


@functools.cache
def registry() -> Registry:
    """The process-wide registry (built on first use, then read-only)."""
    return build_registry(plugin_manager())
