"""Budget losses (Sec. 3.3.3, Eq. 12-14) on the soft kept-token counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def average_tokens(
    kept: torch.Tensor, num_visual: torch.Tensor, layers: Sequence[int], num_layers: int
) -> torch.Tensor:
    """The paper's "Token" metric per sample: visual tokens at the input of each decoder layer, averaged.

    Parameters
    ----------
    kept : (B, K) visual tokens alive after each ATP layer (soft sums allowed).
    num_visual : (B,) visual tokens before pruning.
    layers : the K ATP layer indices, increasing.    num_layers : decoder layers.

    Returns
    -------
    (B,) float32. Layers [0, layers[0]) see ``num_visual``; layers [layers[k], layers[k+1])
    see ``kept[:, k]``.
    """
    bounds = list(layers) + [num_layers]
    total = num_visual.float() * layers[0]
    for k in range(len(layers)):
        total = total + kept[:, k].float() * (bounds[k + 1] - bounds[k])
    return total / num_layers


class PaperBudgetLoss:
    """L_ATP = sum_k sum(C_k) / L_v * i_k  and  L_target = |N_bar - N_target| (Eq. 12-13).

    Parameters
    ----------
    target_tokens : N_target, the average token count to aim for (None: no target term).
    """

    name = "paper"

    def __init__(self, target_tokens: float | None = None):
        if target_tokens is not None and target_tokens < 0:
            raise ValueError(f"target_tokens must be >= 0, got {target_tokens!r}")
        self.target_tokens = target_tokens

    def __call__(
        self,
        soft_masks: Sequence[torch.Tensor],
        num_visual: torch.Tensor,
        layers: Sequence[int],
        num_layers: int,
    ) -> dict[str, torch.Tensor]:
        """Cumulative soft masks (B, N) per ATP layer -> {"atp": scalar, "target": scalar}."""
        counts = torch.stack([mask.sum(dim=1) for mask in soft_masks], dim=1)  # (B, K)
        denominator = num_visual.float().clamp_min(1.0)[:, None]
        depth = torch.tensor(list(layers), dtype=torch.float32, device=counts.device)
        loss_atp = (counts / denominator * depth).sum(dim=1).mean()
        if self.target_tokens is None:
            loss_target = counts.new_zeros(())
        else:
            n_bar = average_tokens(counts, num_visual, layers, num_layers).mean()
            loss_target = (n_bar - self.target_tokens).abs()
        return {"atp": loss_atp, "target": loss_target}
