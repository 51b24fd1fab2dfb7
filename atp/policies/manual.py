"""Manual keep sets: the caller says which visual tokens survive each ATP layer."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.options import OptionCheck


class ManualPolicy(Policy):
    """Apply given keep masks; no scores are computed. Useful for oracles and ablations.

    Options
    -------
    keep_masks : one BoolTensor (B, N) per ATP layer, original visual order, True = keep.
        Masks are made cumulative (a token pruned earlier stays pruned).
    """

    name = "manual"

    def __init__(self, context: PolicyContext, keep_masks: list[torch.Tensor] | None = None):
        super().__init__(context)
        check = OptionCheck(self.name)

        def entry(name: str, mask) -> torch.Tensor:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                check.fail(name, mask, "a BoolTensor of shape (batch, visual tokens)", TypeError)
            return mask.clone()

        what = "one BoolTensor (B, N)"
        self.keep_masks = check.per_layer("keep_masks", keep_masks, context.layers, what, entry)

    def decide(self, inputs: PolicyInput) -> Decision:
        mask = self.keep_masks[inputs.index]
        if mask.shape[0] != inputs.live.shape[0] or mask.shape[1] < inputs.live.shape[1]:
            raise ValueError(
                f"keep_masks[{inputs.index}] has shape {tuple(mask.shape)}, the batch needs "
                f"({inputs.live.shape[0]}, {inputs.live.shape[1]})"
            )
        return Decision(mask[:, : inputs.live.shape[1]].to(inputs.live.device).float())
