"""Budget losses (Sec. 3.3.3, Eq. 12-14) on the kept-token counts.

The runtime hands a budget loss the cumulative masks of each ATP layer as *counting masks*:
in training their values are the hard decisions (what inference keeps) and their gradient is
the soft masks' (a straight-through count), so a target is met in the tokens inference keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How the budget terms enter training (Eq. 14): L = L_ntp + lambda_atp L_ATP + lambda_target L_target.

    Attributes
    ----------
    lambda_atp : weight of L_ATP (paper: 0.01 to 0.1).
    lambda_target : weight of L_target (paper: 0.2). With the default ``normalized`` budget
        loss both terms are fractions of the visual tokens (in [0, 1]), on the scale of a
        per-token answer loss; with ``paper`` they count tokens (Eq. 12-13 as printed).
    target_tokens : N_target, the average token count to aim for, > 0 (None: L_target = 0).
    add_to_loss : add the weighted terms to ``outputs.loss`` when the model is called with
        labels in training mode (otherwise read them from ``handle.stats.losses``).
    """

    lambda_atp: float = 0.0
    lambda_target: float = 0.0
    target_tokens: float | None = None
    add_to_loss: bool = True

    def __post_init__(self):
        from atp.arguments import NON_NEGATIVE, POSITIVE  # the checks of --lambda-atp, ... and recipes

        for name in ("lambda_atp", "lambda_target"):
            object.__setattr__(self, name, NON_NEGATIVE.check(getattr(self, name), name, text=False))
        if self.target_tokens is not None:
            target = POSITIVE.check(self.target_tokens, "target_tokens", text=False)
            object.__setattr__(self, "target_tokens", target)
        if self.lambda_target > 0 and self.target_tokens is None:
            raise ValueError("lambda_target > 0 needs target_tokens (N_target, e.g. target_tokens=144)")


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


class _BudgetLoss:
    """Eq. 12-13's shared arithmetic: the kept counts per ATP layer of the samples with visual
    tokens, the layer depths and the Token metric; subclasses choose the two terms' form."""

    name = ""

    def __init__(self, target_tokens: float | None = None):
        from atp.arguments import POSITIVE

        if target_tokens is not None:
            target_tokens = POSITIVE.check(target_tokens, "target_tokens", text=False)
        self.target_tokens = target_tokens

    def __call__(
        self,
        soft_masks: Sequence[torch.Tensor],
        num_visual: torch.Tensor,
        layers: Sequence[int],
        num_layers: int,
    ) -> dict[str, torch.Tensor]:
        """Cumulative (counting) masks (B, N) per ATP layer -> {"atp": scalar, "target": scalar}."""
        counts = torch.stack([mask.sum(dim=1) for mask in soft_masks], dim=1)  # (B, K)
        has_visual = num_visual > 0  # samples without images take no part
        if not bool(has_visual.any()):
            zero = counts.sum() * 0.0
            return {"atp": zero, "target": zero}
        counts, num_visual = counts[has_visual], num_visual[has_visual].float()
        depth = torch.tensor(list(layers), dtype=torch.float32, device=counts.device)
        loss_atp = self.atp_term(counts / num_visual[:, None], depth)
        if self.target_tokens is None:
            loss_target = counts.sum() * 0.0
        else:
            n_bar = average_tokens(counts, num_visual, layers, num_layers).mean()
            loss_target = self.target_term(n_bar, num_visual)
        return {"atp": loss_atp, "target": loss_target}

    def atp_term(self, fractions: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """(B, K) kept fractions per ATP layer, (K,) layer indices -> L_ATP."""
        raise NotImplementedError

    def target_term(self, n_bar: torch.Tensor, num_visual: torch.Tensor) -> torch.Tensor:
        """The batch's Token metric, (B,) visual counts -> L_target."""
        raise NotImplementedError


class PaperBudgetLoss(_BudgetLoss):
    """L_ATP = sum_k sum(C_k) / L_v * i_k  and  L_target = |N_bar - N_target| (Eq. 12-13).

    Both are means over the samples that have visual tokens; ``C_k`` is the cumulative soft
    mask of ATP layer ``i_k`` and ``L_v`` the sample's visual token count (576 in the paper).

    Parameters
    ----------
    target_tokens : N_target, the average token count to aim for (None: no target term).
    """

    name = "paper"

    def atp_term(self, fractions, depth):
        return (fractions * depth).sum(dim=1).mean()

    def target_term(self, n_bar, num_visual):
        return (n_bar - self.target_tokens).abs()


class NormalizedBudgetLoss(_BudgetLoss):
    """The budget terms as fractions, on the scale of the answer loss (atp's default):

    ``L_ATP = sum_k f_k i_k / sum_k i_k`` with ``f_k`` the fraction of a sample's visual tokens
    kept after ATP layer ``i_k`` (Eq. 12 divided by ``sum_k i_k``: in [0, 1]), and
    ``L_target = ((N_bar - N_target) / L_v)^2`` with ``N_bar`` the Token metric and ``L_v`` the
    mean visual token count (Eq. 13's error as a fraction of the visual tokens, squared).

    Why it departs from Eq. 12-13: counted in tokens, ``lambda_target * dL_target / dtheta`` was
    700-96,000 times the answer loss's gradient on a threshold, and |.| keeps that size at the
    target, so the answer loss could not be heard. As fractions the terms no longer grow with
    the number of visual tokens or layers, and the square's gradient vanishes at the target:
    the target term holds the batch's mean Token metric while the answer loss decides which
    samples keep more (the target is a mean over samples, so moving tokens between samples
    costs it nothing).

    Parameters
    ----------
    target_tokens : N_target, the average token count to aim for (None: no target term).
    """

    name = "normalized"

    def atp_term(self, fractions, depth):
        return (fractions * depth).sum(dim=1).mean() / depth.sum()

    def target_term(self, n_bar, num_visual):
        return ((n_bar - self.target_tokens) / num_visual.mean()) ** 2
