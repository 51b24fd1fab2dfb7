"""Fixed budgets: keep the top tokens by redundancy score at each ATP layer."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.options import OptionCheck, plain_number
from atp.scorers.normalize import minmax_normalize


def top_k_mask(scores: torch.Tensor, live: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, N): the ``counts`` (B,) highest-scoring live tokens; ties keep the earlier token."""
    ranked = scores.float().masked_fill(~live, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < counts[:, None]) & live


def budget_counts(budget: int | float, live: torch.Tensor) -> torch.Tensor:
    """LongTensor (B,): tokens to keep given ``live`` (B, N): a count, or a fraction of those alive."""
    alive = live.sum(dim=1)
    if isinstance(budget, float):
        return torch.round(alive.double() * budget).long()
    return alive.clamp(max=budget)


def keep_schedule(check: OptionCheck, keep, layers: tuple[int, ...]) -> list[int | float]:
    """``keep`` checked: per ATP layer an int count >= 0 or a float fraction in (0, 1] of the
    tokens alive. A count above an earlier count could never be met (at most that many tokens
    are alive after the earlier layer), so counts can only shrink or stay."""

    def entry(name: str, value) -> int | float:
        number, expected = plain_number(value), "an int count >= 0 or a float fraction in (0, 1]"
        if number is None:
            check.fail(name, value, expected, TypeError)
        if not (number >= 0 if isinstance(number, int) else 0 < number <= 1):  # NaN fails too
            check.fail(name, value, expected)
        return number

    budgets = check.per_layer("keep", keep, layers, "one count or fraction", entry)
    counts = [(index, budget) for index, budget in enumerate(budgets) if isinstance(budget, int)]
    for (before, earlier), (index, count) in zip(counts, counts[1:]):
        if count > earlier:
            raise ValueError(
                f"policy {check.policy!r}: option keep[{index}] = {count} is more than keep[{before}] = "
                f"{earlier}: at most {earlier} tokens are alive after ATP layer {layers[before]}, so counts "
                f"can only shrink or stay from one ATP layer to the next (e.g. keep[{index}] = {earlier}, "
                "or a fraction of those alive)"
            )
    return budgets


class FixedPolicy(Policy):
    """Keep a pre-defined budget per ATP layer, ranked by the scorer's scores: each score is
    min-max normalised over the live tokens and the scores are averaged (for the default
    ``redundancy`` scorer that is S_red, as the ``atp`` policy computes it).

    Options
    -------
    keep : one entry per ATP layer. An int is a token count, a float in (0, 1] a fraction
        of the tokens alive before that layer (rounded to the nearest integer). Counts can only
        shrink or stay from one layer to the next.
    scorer : a registered scorer name (default "redundancy"; e.g. a plugin's).
    scorer_options : keyword arguments for that scorer.
    """

    name = "fixed"

    def __init__(
        self,
        context: PolicyContext,
        keep: list[int | float] | None = None,
        scorer: str = "redundancy",
        scorer_options: dict | None = None,
    ):
        super().__init__(context)
        check = OptionCheck(self.name)
        self.keep = keep_schedule(check, keep, context.layers)
        factory = check.component("scorer", scorer, "scorer")
        self.scorer = factory(**check.keywords("scorer_options", scorer_options, factory))

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = budget_counts(self.keep[inputs.index], inputs.live)
        combined = sum(minmax_normalize(score, inputs.live) for score in inputs.scores.values()) / len(
            inputs.scores
        )
        return Decision(top_k_mask(combined, inputs.live, counts).float())
