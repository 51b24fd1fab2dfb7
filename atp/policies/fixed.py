"""Fixed budgets: keep the top tokens by redundancy score at each ATP layer."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.scorers.normalize import minmax_normalize
from atp.scorers.redundancy import RedundancyScorer


def top_k_mask(scores: torch.Tensor, live: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, N): the ``counts`` (B,) highest-scoring live tokens; ties keep the earlier token."""
    ranked = scores.float().masked_fill(~live, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < counts[:, None]) & live


class FixedPolicy(Policy):
    """Keep a pre-defined budget per ATP layer, ranked by S_red (as the ``atp`` policy scores).

    Options
    -------
    keep : one entry per ATP layer. An int is a token count, a float in (0, 1] a fraction
        of the tokens alive before that layer (rounded to the nearest integer).
    """

    def __init__(self, context: PolicyContext, keep: list[int | float] | None = None):
        super().__init__(context)
        if keep is None:
            raise ValueError("the 'fixed' policy needs keep=[...], one count or fraction per ATP layer")
        keep = list(keep)
        if len(keep) != len(context.layers):
            raise ValueError(f"keep has {len(keep)} entries but there are {len(context.layers)} ATP layers")
        for value in keep:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"keep entries must be ints (counts) or floats (fractions), got {value!r}")
            if isinstance(value, int) and value < 0:
                raise ValueError(f"keep counts must be >= 0, got {value}")
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise ValueError(f"keep fractions must be in (0, 1], got {value}")
        self.keep = keep
        self.scorer = RedundancyScorer()

    def counts(self, inputs: PolicyInput) -> torch.Tensor:
        """LongTensor (B,): tokens to keep at this layer (a count, or a fraction of those alive)."""
        alive = inputs.live.sum(dim=1)
        budget = self.keep[inputs.index]
        if isinstance(budget, float):
            return torch.round(alive.double() * budget).long()
        return alive.clamp(max=budget)

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = self.counts(inputs)
        s_redundant = minmax_normalize(inputs.scores["s_self"], inputs.live)
        s_redundant = (s_redundant + minmax_normalize(inputs.scores["s_cross"], inputs.live)) / 2
        return Decision(top_k_mask(s_redundant, inputs.live, counts).float())
