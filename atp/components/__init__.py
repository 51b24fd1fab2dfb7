"""Backbone-agnostic components: threshold heads, mask combiners, position keepers, budget losses."""

from atp.components.budget_loss import Budget, NormalizedBudgetLoss, PaperBudgetLoss, average_tokens
from atp.components.mask_combiner import MaxSigmoidCombiner, cumulative
from atp.components.position_keeper import KeepPositions, RenumberPositions, Rope2DPositions
from atp.components.threshold_head import BinnedThresholdHead, ConstantThresholdHead, PaperThresholdHead
from atp.hookspecs import hookimpl

__all__ = [
    "RenumberPositions",
    "Rope2DPositions",
    "BinnedThresholdHead",
    "Budget",
    "ConstantThresholdHead",
    "KeepPositions",
    "MaxSigmoidCombiner",
    "NormalizedBudgetLoss",
    "PaperBudgetLoss",
    "PaperThresholdHead",
    "average_tokens",
    "cumulative",
]


@hookimpl
def atp_register_threshold_heads(register):
    register("paper", PaperThresholdHead)
    register("binned", BinnedThresholdHead)
    register("constant", ConstantThresholdHead)


@hookimpl
def atp_register_mask_combiners(register):
    register("max_sigmoid", MaxSigmoidCombiner)


@hookimpl
def atp_register_position_keepers(register):
    register("keep", KeepPositions)
    register("renumber", RenumberPositions)
    register("rope2d", Rope2DPositions)


@hookimpl
def atp_register_budget_losses(register):
    register("normalized", NormalizedBudgetLoss)
    register("paper", PaperBudgetLoss)
