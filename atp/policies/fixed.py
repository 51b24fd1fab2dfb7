"""Fixed budgets: keep the top tokens by redundancy score at each ATP layer."""

from __future__ import annotations

import torch

from atp.plugins import registry
from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.scorers.normalize import minmax_normalize


def top_k_mask(scores: torch.Tensor, live: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, N): the ``counts`` (B,) highest-scoring live tokens; ties keep the earlier token."""
    ranked = scores.float().masked_fill(~live, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < counts[:, None]) & live


class FixedPolicy(Policy):
    """Keep a pre-defined budget per ATP layer, ranked by the scorer's scores: each score is
    min-max normalised over the live tokens and the scores are averaged (for the default
    ``redundancy`` scorer that is S_red, as the ``atp`` policy computes it).

    Options
    -------
    keep : one entry per ATP layer. An int is a token count, a float in (0, 1] a fraction
        of the tokens alive before that layer (rounded to the nearest integer).
    scorer : a registered scorer name (default "redundancy"; e.g. a plugin's).
    scorer_options : keyword arguments for that scorer.
    """

    def __init__(
        self,
        context: PolicyContext,
        keep: list[int | float] | None = None,
        scorer: str = "redundancy",
        scorer_options: dict | None = None,
    ):
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
        self.scorer = registry().get("scorer", scorer).factory(**(scorer_options or {}))

    def counts(self, inputs: PolicyInput) -> torch.Tensor:
        """LongTensor (B,): tokens to keep at this layer (a count, or a fraction of those alive)."""
        alive = inputs.live.sum(dim=1)
        budget = self.keep[inputs.index]
        if isinstance(budget, float):
            return torch.round(alive.double() * budget).long()
        return alive.clamp(max=budget)

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = self.counts(inputs)
        combined = sum(minmax_normalize(score, inputs.live) for score in inputs.scores.values()) / len(
            inputs.scores
        )
        return Decision(top_k_mask(combined, inputs.live, counts).float())
