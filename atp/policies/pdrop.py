"""PDrop (Xing et al., 2024): pyramid dropping, a fixed ratio at several stages."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.fixed import top_k_mask
from atp.policies.options import OptionCheck
from atp.scorers.last_token import LastTokenScorer


class PDropPolicy(Policy):
    """At every ATP layer keep ``round(alive * ratio)`` visual tokens, ranked by the attention
    of the last instruction token (the last prompt token) at the layer before.

    Options
    -------
    ratio : the fraction kept at each stage, in (0, 1] (PDrop's lambda, default 0.5;
        e.g. layers=[8, 16, 24]).
    """

    name = "pdrop"

    def __init__(self, context: PolicyContext, ratio: float = 0.5):
        super().__init__(context)
        self.ratio = OptionCheck(self.name).real("ratio", ratio, 0.0, 1.0, low_open=True)
        self.scorer = LastTokenScorer()

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = torch.round(inputs.live.sum(dim=1).double() * self.ratio).long()
        return Decision(top_k_mask(inputs.scores["s_last"], inputs.live, counts).float())
