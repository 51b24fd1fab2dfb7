"""Threshold heads (Sec. 3.3.2, Eq. 6-8): scores -> per-sample thresholds theta_r, theta_s."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ThresholdHead(nn.Module):
    """theta_r, theta_s = sigmoid(Linear(GELU(Linear(features)))), computed in float32.

    Subclasses choose the features (:meth:`features`). The output layers start at zero weight
    with biases that put the thresholds at ``init_theta_r`` / ``init_theta_s``, so an untrained
    head is a constant rule ("close to keep everything" by default), like a zero-initialised adapter.
    """

    def __init__(self, in_features: int, hidden_size: int, init_theta_r: float, init_theta_s: float):
        super().__init__()
        for name, value in (("init_theta_r", init_theta_r), ("init_theta_s", init_theta_s)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.proj = nn.Linear(in_features, hidden_size)
        self.theta_r = nn.Linear(hidden_size, 1)
        self.theta_s = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            for layer, value in ((self.theta_r, init_theta_r), (self.theta_s, init_theta_s)):
                layer.weight.zero_()
                layer.bias.fill_(math.log(value / (1.0 - value)))

    def features(self, s_self, s_cross, live, num_visual) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, s_self: torch.Tensor, s_cross: torch.Tensor, live: torch.Tensor, num_visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) normalised scores (0 where pruned), live mask, (B,) visual counts -> theta_r, theta_s (B,)."""
        z = F.gelu(
            F.linear(
                self.features(s_self, s_cross, live, num_visual),
                self.proj.weight.float(),
                self.proj.bias.float(),
            )
        )
        theta_r = torch.sigmoid(F.linear(z, self.theta_r.weight.float(), self.theta_r.bias.float()))
        theta_s = torch.sigmoid(F.linear(z, self.theta_s.weight.float(), self.theta_s.bias.float()))
        return theta_r.squeeze(-1), theta_s.squeeze(-1)


class PaperThresholdHead(ThresholdHead):
    """The paper's head: its input is cat(S_self, S_cross) with a fixed length
    ``2 * num_visual_tokens`` over the original visual order (pruned positions hold 0).

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
        if num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be positive, got {num_visual_tokens}")
        super().__init__(2 * num_visual_tokens, hidden_size, init_theta_r, init_theta_s)
        self.num_visual_tokens = num_visual_tokens

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

    def features(self, s_self, s_cross, live, num_visual) -> torch.Tensor:
        width = s_self.shape[1]
        if width > self.num_visual_tokens:
            raise ValueError(
                f"this threshold head was built for {self.num_visual_tokens} visual tokens per sample, "
                f"got {width} (several images in one prompt?); attach with threshold_head='binned', the "
                "size-agnostic head, for such inputs"
            )
        pad = self.num_visual_tokens - width
        return torch.cat([F.pad(s_self.float(), (0, pad)), F.pad(s_cross.float(), (0, pad))], dim=1)


def quantiles(scores: torch.Tensor, live: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, N) scores -> (B, bins): the live scores sorted high to low, sampled at ``bins`` evenly
    spaced ranks (0 for a sample without live tokens). Size-agnostic."""
    ordered = scores.float().masked_fill(~live, float("-inf")).sort(dim=1, descending=True).values
    count = live.sum(dim=1, keepdim=True)
    ranks = torch.linspace(0, 1, bins, device=scores.device)[None, :] * (count - 1).clamp_min(0)
    picked = ordered.gather(1, ranks.round().long().clamp_max(max(scores.shape[1] - 1, 0)))
    return torch.where(count > 0, picked, torch.zeros_like(picked))


class BinnedThresholdHead(ThresholdHead):
    """A size-agnostic head for any number of visual tokens (dynamic resolution, several images, video).

    Its input is ``bins`` quantiles of each normalised score over the live tokens, plus the
    fraction of the sample's visual tokens still alive and log(1 + alive) / 10, so the same
    weights serve 64 or 16,000 visual tokens.
    """

    def __init__(
        self, bins: int = 64, hidden_size: int = 256, init_theta_r: float = 1e-3, init_theta_s: float = 0.999
    ):
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        super().__init__(2 * bins + 2, hidden_size, init_theta_r, init_theta_s)
        self.bins = bins

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

    def features(self, s_self, s_cross, live, num_visual) -> torch.Tensor:
        alive = live.sum(dim=1).float()
        return torch.cat(
            [
                quantiles(s_self, live, self.bins),
                quantiles(s_cross, live, self.bins),
                (alive / num_visual.float().clamp_min(1.0))[:, None],
                (torch.log1p(alive) / 10.0)[:, None],
            ],
            dim=1,
        )
