"""Mask combiners (Sec. 3.3.2, Eq. 9-11): scores + thresholds -> soft keep mask of one layer."""

from __future__ import annotations

import torch
from torch import nn


class MaxSigmoidCombiner(nn.Module):
    """M = max(sigmoid((S_red - theta_r) T), sigmoid((S_spatial - theta_s) T)).

    Parameters
    ----------
    temperature : T; large enough that the sigmoid is close to a step.
    use_redundant, use_spatial : switch one branch off (the paper's RP / SP ablations).
    """

    def __init__(self, temperature: float = 100.0, use_redundant: bool = True, use_spatial: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not (use_redundant or use_spatial):
            raise ValueError("at least one of use_redundant / use_spatial must be True")
        self.temperature = float(temperature)
        self.use_redundant = use_redundant
        self.use_spatial = use_spatial

    def forward(
        self,
        s_redundant: torch.Tensor,
        s_spatial: torch.Tensor,
        theta_r: torch.Tensor,
        theta_s: torch.Tensor,
    ) -> torch.Tensor:
        """(B, N) scores, (B,) thresholds -> (B, N) mask in (0, 1), float32."""
        masks = list(self._branches(s_redundant, s_spatial, theta_r, theta_s).values())
        return masks[0] if len(masks) == 1 else torch.maximum(masks[0], masks[1])

    def branches(
        self,
        s_redundant: torch.Tensor,
        s_spatial: torch.Tensor,
        theta_r: torch.Tensor,
        theta_s: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``"redundancy"`` / ``"spatial"`` -> BoolTensor (B, N): the tokens each branch alone keeps
        (its sigmoid above 0.5); the mask keeps their union."""
        with torch.no_grad():
            found = self._branches(s_redundant, s_spatial, theta_r, theta_s)
        return {name: mask > 0.5 for name, mask in found.items()}

    def _branches(self, s_redundant, s_spatial, theta_r, theta_s) -> dict[str, torch.Tensor]:
        masks = {}
        if self.use_redundant:
            masks["redundancy"] = torch.sigmoid((s_redundant.float() - theta_r[:, None]) * self.temperature)
        if self.use_spatial:
            masks["spatial"] = torch.sigmoid((s_spatial.float() - theta_s[:, None]) * self.temperature)
        return masks


def cumulative(previous: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """C_k = C_{k-1} * M_k: pruned is forever, the cumulative mask never grows."""
    return previous * mask
