"""FastV (Chen et al., 2024) as its reference code does it, without eager attention."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.fixed import top_k_mask
from atp.policies.options import OptionCheck
from atp.scorers.last_token import LastTokenScorer


class FastVPolicy(Policy):
    """At layer K (``layers=[K]``, so the attention of layer K-1), keep the ``round(L_v * (1 - ratio))``
    visual tokens that the last prompt token attends to most, averaged over heads.

    Options
    -------
    ratio : R, the fraction of visual tokens dropped, in [0, 1) (FastV's default 0.5 at K = 2).
    """

    name = "fastv"

    def __init__(self, context: PolicyContext, ratio: float = 0.5):
        super().__init__(context)
        if len(context.layers) != 1:
            raise ValueError(
                "fastv prunes once: give one layer (K), e.g. layers=[2]; use 'pdrop' for several stages"
            )
        self.ratio = OptionCheck(self.name).real("ratio", ratio, 0.0, 1.0, high_open=True)
        self.scorer = LastTokenScorer()

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = torch.round(inputs.num_visual.double() * (1.0 - self.ratio)).long()
        return Decision(top_k_mask(inputs.scores["s_last"], inputs.live, counts).float())
