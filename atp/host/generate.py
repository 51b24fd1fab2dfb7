"""``model.generate`` while atp is attached: the generation modes atp follows, checked first.

:func:`atp.host.attach.attach` puts a :class:`GuardedGenerate` in the model's ``__dict__``; it
refuses the settings that would reorder, copy or re-run the KV cache atp pruned before anything
runs, and tells the runtime that a generate call is in progress (its decode steps must find the
cache).
"""

from __future__ import annotations

import inspect

from torch import nn

from atp.host import compat
from atp.host.runtime import Runtime


class GuardedGenerate:
    """``model.generate`` that refuses the generation modes atp does not support yet.

    An object (not a closure) kept in the model's ``__dict__``: copies and pickles of the model
    get their own, bound to the copy and its runtime.
    """

    def __init__(self, model: nn.Module, runtime: Runtime):
        self.model = model
        self.runtime = runtime

    @property
    def __wrapped__(self):
        return type(self.model).generate.__get__(self.model)

    @property
    def __doc__(self):
        return type(self.model).generate.__doc__

    def __call__(self, *args, **kwargs):
        check_generation(self.model, args, kwargs)
        runtime = self.runtime
        runtime.check_continuation(args, kwargs)  # before generate reads the cache's length
        runtime.generate_step = 0  # decode steps must find the cache (atp.host.checks.check_new_prompt)
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            runtime.generate_step = None


def check_generation(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse, before anything runs, the ``generate`` settings that change what the KV cache
    holds or how the prompt reaches the model in ways atp does not follow. The settings are
    read as generate reads them: a ``generation_config`` given by keyword or position, else the
    model's, updated by the keyword arguments."""
    try:
        bound = inspect.signature(type(model).generate).bind(model, *args, **kwargs).arguments
    except TypeError:  # generate itself reports its arguments
        return
    given = {name: value for name, value in bound.items() if name not in ("self", "kwargs")}
    given.update(bound.get("kwargs", {}))
    if given.get("generation_config") is None and getattr(model, "generation_config", None) is None:
        return
    config = compat.resolved_generation_config(model, given)
    mode = compat.generation_mode(config, given.get("assistant_model"))
    if mode not in ("greedy_search", "sample"):
        raise ValueError(
            f"{mode.replace('_', ' ')} is not supported with atp yet (generate would reorder, copy or re-run "
            "the KV cache atp pruned); use greedy decoding or sampling (num_beams=1, no assistant model, "
            "no penalty_alpha, no constraints, no dola_layers)"
        )
    if config.use_cache is False:
        raise ValueError(
            "generate(use_cache=False) would re-prune the prompt at every step; atp needs use_cache=True"
        )
    if config.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={config.cache_implementation!r} is not supported with atp; "
            "use the default dynamic cache"
        )
    if getattr(config, "prefill_chunk_size", None) is not None:
        raise ValueError(
            f"prefill_chunk_size={config.prefill_chunk_size!r} is not supported with atp: atp scores and "
            "prunes the visual tokens from the whole multimodal prompt in one forward; use prefill_chunk_size=None"
        )
    if getattr(config, "guidance_scale", None) not in (None, 1, 1.0):
        raise ValueError(
            "classifier-free guidance (guidance_scale) runs a second, unconditional prompt through the model "
            "during decoding, which atp does not follow; leave guidance_scale unset"
        )
    if given.get("custom_generate") is not None:
        raise ValueError(
            "custom_generate is not supported with atp: a custom decoding loop may reuse or reorder the KV "
            "cache in ways atp cannot check; use the built-in greedy or sampling generation"
        )
    for name in compat.CACHE_ARGUMENTS:
        value = given.get(name)
        if value is not None and not isinstance(value, compat.Cache):
            raise ValueError(f"{name} must be a transformers Cache object, got {type(value).__name__}")
