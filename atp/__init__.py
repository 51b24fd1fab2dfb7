"""atp: adaptive visual-token pruning inside the language model of a vision-language model.

>>> import atp
>>> handle = atp.attach(model, layers=[4, 14, 24], policy="atp")
>>> model.generate(**inputs)
>>> handle.stats.kept, handle.stats.avg_tokens
>>> handle.remove()
"""

from atp._version import __version__
from atp.core.stats import PruningStats
from atp.host.attach import attach, default_layers, detach, supported_models
from atp.host.compat import kv_cache_bytes
from atp.host.handle import AttachHandle
from atp.plugins import registry

__all__ = [
    "AttachHandle",
    "PruningStats",
    "__version__",
    "attach",
    "default_layers",
    "detach",
    "kv_cache_bytes",
    "registry",
    "supported_models",
]
