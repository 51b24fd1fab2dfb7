"""Keep everything: all machinery on, nothing pruned (the baseline for equivalence checks)."""

from __future__ import annotations

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.scorers.redundancy import RedundancyScorer


class KeepAllPolicy(Policy):
    """Scores are computed and every hook runs, but every visual token is kept."""

    name = "keep_all"

    def __init__(self, context: PolicyContext):
        super().__init__(context)
        self.scorer = RedundancyScorer()

    def decide(self, inputs: PolicyInput) -> Decision:
        return Decision(inputs.live.float())
