"""Threshold heads (Sec. 3.3.2, Eq. 6-8): scores -> per-sample thresholds theta_r, theta_s."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class PaperThresholdHead(nn.Module):
    """The paper's head: z = MLP(cat(S_self, S_cross)); theta = sigmoid(Linear(z)).

    Its input has a fixed length ``2 * num_visual_tokens`` over the original visual order
    (pruned positions hold 0). The output layers start at zero weight with biases that
    put the thresholds at ``init_theta_r`` / ``init_theta_s``, so an untrained head is a
    constant rule ("close to keep everything" by default). Runs in float32.

    Parameters
    ----------
    num_visual_tokens : visual tokens per sample the head was built for (576 for LLaVA-1.5).
    hidden_size : width of z.
    init_theta_r, init_theta_s : thresholds of the untrained head, in (0, 1).
    """

    def __init__(
        self,
        num_visual_tokens: int,
        hidden_size: int = 256,
        init_theta_r: float = 1e-3,
        init_theta_s: float = 0.999,
    ):
        super().__init__()
        if num_visual_tokens < 1 or hidden_size < 1:
            raise ValueError("num_visual_tokens and hidden_size must be positive")
        self.num_visual_tokens = num_visual_tokens
        self.proj = nn.Linear(2 * num_visual_tokens, hidden_size)
        self.theta_r = nn.Linear(hidden_size, 1)
        self.theta_s = nn.Linear(hidden_size, 1)
        _init_outputs(self, init_theta_r, init_theta_s)

    @classmethod
    def from_options(
        cls,
        num_visual_tokens: int | None,
        hidden_size: int,
        init_theta_r: float,
        init_theta_s: float,
        bins: int,
    ):
        if num_visual_tokens is None:
            raise ValueError(
                "the 'paper' threshold head needs a fixed number of visual tokens per sample, which this "
                "model family does not have; use threshold_head='binned' (the size-agnostic head)"
            )
        return cls(num_visual_tokens, hidden_size, init_theta_r, init_theta_s)

    def forward(
        self, s_self: torch.Tensor, s_cross: torch.Tensor, live: torch.Tensor, num_visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) normalised scores (0 where pruned) -> theta_r, theta_s, each (B,) float32."""
        width = s_self.shape[1]
        if width > self.num_visual_tokens:
            raise ValueError(
                f"this threshold head was built for {self.num_visual_tokens} visual tokens per sample, "
                f"got {width}; use a size-agnostic threshold head for inputs with more visual tokens"
            )
        pad = self.num_visual_tokens - width
        features = torch.cat([F.pad(s_self.float(), (0, pad)), F.pad(s_cross.float(), (0, pad))], dim=1)
        return _thresholds(self, features)


def _thresholds(head: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_r, theta_s = sigmoid(Linear(GELU(Linear(features)))), in float32."""
    z = F.gelu(F.linear(features, head.proj.weight.float(), head.proj.bias.float()))
    theta_r = torch.sigmoid(F.linear(z, head.theta_r.weight.float(), head.theta_r.bias.float()))
    theta_s = torch.sigmoid(F.linear(z, head.theta_s.weight.float(), head.theta_s.bias.float()))
    return theta_r.squeeze(-1), theta_s.squeeze(-1)


def _init_outputs(head: nn.Module, init_theta_r: float, init_theta_s: float) -> None:
    for name, value in (("init_theta_r", init_theta_r), ("init_theta_s", init_theta_s)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    with torch.no_grad():
        for layer, value in ((head.theta_r, init_theta_r), (head.theta_s, init_theta_s)):
            layer.weight.zero_()
            layer.bias.fill_(math.log(value / (1.0 - value)))


def quantiles(scores: torch.Tensor, live: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, N) scores -> (B, bins): the live scores sorted high to low, sampled at ``bins`` evenly
    spaced ranks (0 for a sample without live tokens). Size-agnostic."""
    ordered = scores.float().masked_fill(~live, float("-inf")).sort(dim=1, descending=True).values
    count = live.sum(dim=1, keepdim=True)
    ranks = torch.linspace(0, 1, bins, device=scores.device)[None, :] * (count - 1).clamp_min(0)
    picked = ordered.gather(1, ranks.round().long().clamp_max(max(scores.shape[1] - 1, 0)))
    return torch.where(count > 0, picked, torch.zeros_like(picked))


class BinnedThresholdHead(nn.Module):
    """A size-agnostic head for any number of visual tokens (dynamic resolution, several images, video).

    Its input is ``bins`` quantiles of each normalised score over the live tokens, plus the
    fraction of the sample's visual tokens still alive and log(1 + alive) / 10, so the same
    weights serve 64 or 16,000 visual tokens. Initialised like :class:`PaperThresholdHead`.
    """

    def __init__(
        self, bins: int = 64, hidden_size: int = 256, init_theta_r: float = 1e-3, init_theta_s: float = 0.999
    ):
        super().__init__()
        if bins < 2 or hidden_size < 1:
            raise ValueError(f"bins must be >= 2 and hidden_size >= 1, got {bins}, {hidden_size}")
        self.bins = bins
        self.proj = nn.Linear(2 * bins + 2, hidden_size)
        self.theta_r = nn.Linear(hidden_size, 1)
        self.theta_s = nn.Linear(hidden_size, 1)
        _init_outputs(self, init_theta_r, init_theta_s)

    @classmethod
    def from_options(
        cls,
        num_visual_tokens: int | None,
        hidden_size: int,
        init_theta_r: float,
        init_theta_s: float,
        bins: int,
    ):
        return cls(bins, hidden_size, init_theta_r, init_theta_s)

    def forward(
        self, s_self: torch.Tensor, s_cross: torch.Tensor, live: torch.Tensor, num_visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) normalised scores, live mask, (B,) visual counts -> theta_r, theta_s (B,)."""
        alive = live.sum(dim=1).float()
        features = torch.cat(
            [
                quantiles(s_self, live, self.bins),
                quantiles(s_cross, live, self.bins),
                (alive / num_visual.float().clamp_min(1.0))[:, None],
                (torch.log1p(alive) / 10.0)[:, None],
            ],
            dim=1,
        )
        return _thresholds(self, features)
