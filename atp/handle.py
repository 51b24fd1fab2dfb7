"""The handle returned by :func:`atp.attach`: statistics, parameters, removal."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from atp.runtime import Runtime
from atp.stats import PruningStats

CONTAINER_NAME = "atp"


class AtpModules(nn.Module):
    """The ATP part of a model, registered as ``model.atp`` so it moves, trains and
    shards with the model. Holds the policy (and its learned heads)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.handle: AttachHandle | None = None


class AttachHandle:
    """What :func:`atp.attach` returns. Use as a context manager to remove on exit."""

    def __init__(self, model: nn.Module, runtime: Runtime, restore: dict):
        self.model = model
        self.runtime = runtime
        self._restore = restore
        self.removed = False

    @property
    def layers(self) -> tuple[int, ...]:
        return self.runtime.layers

    @property
    def policy(self) -> nn.Module:
        return self.runtime.policy

    @property
    def stats(self) -> PruningStats:
        """Statistics of the last prefill forward (raises before the first one)."""
        if self.runtime.last_stats is None:
            raise RuntimeError("no forward has run since atp.attach; call the model (or generate) first")
        return self.runtime.last_stats

    def parameters(self) -> Iterator[nn.Parameter]:
        """The ATP parameters (the threshold heads of the atp policy; none for fixed rules)."""
        return self.runtime.policy.parameters()

    def remove(self) -> None:
        """Remove hooks, the ATP modules and the attention function; the model is as before."""
        if self.removed:
            return
        self.runtime.remove()
        model = self.model
        model.set_attn_implementation(self._restore["attn_implementation"])
        if CONTAINER_NAME in model._modules:
            del model._modules[CONTAINER_NAME]
        if self._restore.get("generate_patched"):
            del model.__dict__["generate"]
        self.removed = True

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "attached"
        return (
            f"AttachHandle({self.runtime.adapter.family}, layers={list(self.layers)}, "
            f"policy={type(self.policy).__name__}, prune_mode={self.runtime.prune_mode!r}, {state})"
        )
