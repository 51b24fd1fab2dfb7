"""Hook specifications: how built-in and third-party plugins add components to atp.

Every registration hook receives a ``register(name, factory)`` callback. A plugin is a
module (or object) with functions decorated by :data:`hookimpl`; third-party packages
expose it through the ``atp`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("atp")
hookimpl = pluggy.HookimplMarker("atp")

Register = Callable[[str, Any], None]


@hookspec
def atp_register_scorers(register: Register) -> None:
    """Register Scorer classes (score the live visual tokens from one layer's attention)."""


@hookspec
def atp_register_threshold_heads(register: Register) -> None:
    """Register ThresholdHead classes (scores -> per-sample thresholds)."""


@hookspec
def atp_register_mask_combiners(register: Register) -> None:
    """Register MaskCombiner classes (scores + thresholds -> per-layer keep mask)."""


@hookspec
def atp_register_position_keepers(register: Register) -> None:
    """Register PositionKeeper classes (what kept tokens' positions become)."""


@hookspec
def atp_register_budget_losses(register: Register) -> None:
    """Register BudgetLoss classes (the training penalties on kept-token counts)."""


@hookspec
def atp_register_policies(register: Register) -> None:
    """Register Policy classes (decide which visual tokens survive each ATP layer)."""


@hookspec
def atp_register_backbones(register: Register) -> None:
    """Register BackboneAdapter classes (one model family each)."""


@hookspec(firstresult=True)
def atp_resolve_backbone(model) -> str | None:
    """Return the registered backbone name for ``model`` (or None to let the others decide)."""


@hookspec
def atp_observe(event: dict) -> None:
    """Called with each ATP layer's decision when ``attach(..., observe=True)``; see docs/plugins.md."""
