"""Uniformly random keep sets at a given budget (a floor that any scoring must beat)."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.fixed import budget_counts, keep_schedule, top_k_mask
from atp.policies.options import OptionCheck


class RandomPolicy(Policy):
    """Keep a random subset of the live tokens per sample, with the ``fixed`` policy's budgets.

    Options
    -------
    keep : one entry per ATP layer, an int count or a float fraction of the tokens alive
        (the ``fixed`` policy's rules: counts can only shrink or stay).
    seed : an int >= 0; seeds the generator once at attach, so a run is reproducible.
    """

    name = "random"

    def __init__(self, context: PolicyContext, keep: list[int | float] | None = None, seed: int = 0):
        super().__init__(context)
        check = OptionCheck(self.name)
        self.keep = keep_schedule(check, keep, context.layers)  # the fixed policy's rules
        self.generator = torch.Generator().manual_seed(check.integer("seed", seed, 0, 2**64 - 1))

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = budget_counts(self.keep[inputs.index], inputs.live)
        noise = torch.rand(inputs.live.shape, generator=self.generator).to(inputs.live.device)
        return Decision(top_k_mask(noise, inputs.live, counts).float())
