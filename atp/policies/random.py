"""Uniformly random keep sets at a given budget (a floor that any scoring must beat)."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.fixed import FixedPolicy, top_k_mask


class RandomPolicy(Policy):
    """Keep a random subset of the live tokens per sample, with the ``fixed`` policy's budgets.

    Options
    -------
    keep : one entry per ATP layer, an int count or a float fraction of the tokens alive.
    seed : seeds the generator once at attach, so a run is reproducible.
    """

    def __init__(self, context: PolicyContext, keep: list[int | float] | None = None, seed: int = 0):
        super().__init__(context)
        if keep is None:
            raise ValueError("the 'random' policy needs keep=[...], one count or fraction per ATP layer")
        self.budgets = FixedPolicy(context, keep=keep)  # same validation and counting
        self.generator = torch.Generator().manual_seed(int(seed))

    def decide(self, inputs: PolicyInput) -> Decision:
        counts = self.budgets.counts(inputs)
        noise = torch.rand(inputs.live.shape, generator=self.generator).to(inputs.live.device)
        return Decision(top_k_mask(noise, inputs.live, counts).float())
