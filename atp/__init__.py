"""atp: adaptive visual-token pruning inside the language model of a vision-language model.

>>> import atp
>>> handle = atp.attach(model, layers=[4, 14, 24], policy="atp")
>>> model.generate(**inputs)
>>> handle.stats.kept, handle.stats.avg_tokens
>>> handle.remove()

The names below load their modules when first used, so that ``import atp.core`` (the pruning core
a serving engine reuses) does not import transformers.
"""

from __future__ import annotations

import importlib

from atp._version import __version__

_WHERE = {
    "attach": "atp.host.attach",
    "default_layers": "atp.host.attach",
    "detach": "atp.host.attach",
    "supported_models": "atp.host.attach",
    "AttachHandle": "atp.host.handle",
    "kv_cache_bytes": "atp.host.compat",
    "registry": "atp.plugins",
    "PruningStats": "atp.core.stats",
}

__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'atp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
