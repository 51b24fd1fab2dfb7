"""Manual keep sets: the caller says which visual tokens survive each ATP layer."""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput


class ManualPolicy(Policy):
    """Apply given keep masks; no scores are computed. Useful for oracles and ablations.

    Options
    -------
    keep_masks : one BoolTensor (B, N) per ATP layer, original visual order, True = keep.
        Masks are made cumulative (a token pruned earlier stays pruned).
    """

    def __init__(self, context: PolicyContext, keep_masks: list[torch.Tensor] | None = None):
        super().__init__(context)
        if keep_masks is None or len(keep_masks) != len(context.layers):
            raise ValueError(
                f"the 'manual' policy needs keep_masks=[...], one BoolTensor (B, N) per ATP layer "
                f"({len(context.layers)} layers)"
            )
        for mask in keep_masks:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise TypeError("keep_masks entries must be BoolTensors of shape (batch, visual tokens)")
        self.keep_masks = [mask.clone() for mask in keep_masks]

    def decide(self, inputs: PolicyInput) -> Decision:
        mask = self.keep_masks[inputs.index]
        if mask.shape[0] != inputs.live.shape[0] or mask.shape[1] < inputs.live.shape[1]:
            raise ValueError(
                f"keep_masks[{inputs.index}] has shape {tuple(mask.shape)}, the batch needs "
                f"({inputs.live.shape[0]}, {inputs.live.shape[1]})"
            )
        return Decision(mask[:, : inputs.live.shape[1]].to(inputs.live.device).float())
