"""Threshold heads (Sec. 3.3.2, Eq. 6-8): scores -> per-sample thresholds theta_r, theta_s."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ThresholdHead(nn.Module):
    """theta_r, theta_s = sigmoid(readout(GELU(proj(features)))), computed in float32.

    Subclasses choose the features (:meth:`features`). The output layers start at zero weight
    with biases that put the thresholds at ``init_theta_r`` / ``init_theta_s``, so an untrained
    head is a constant rule, like a zero-initialised adapter.

    The layers are scaled so that one optimizer step moves a threshold's logit by an amount that
    does not grow with the widths (Adam moves every weight by about the learning rate ``lr``):
    ``proj`` averages over its inputs (weights start at N(0, in_features), so z starts at the
    scale of a standard layer), each readout averages over ``z``, and the logit is ``GAIN``
    times the readout. A step moves a logit by at most ``GAIN * lr * (1 + max |z|)`` (plus a
    second-order term): about 1e-3 at the paper's 1e-4, so a threshold can cross its whole range
    in a few thousand steps (the paper's epoch is 5,200) but not in a few dozen. A plain
    zero-initialised readout summed over 256 units moved it by up to ``lr * (1 + sum |z|)`` and
    saturated the thresholds at 0 or 1 within a few dozen steps at 1e-2.
    """

    GAIN = 10.0  # logit = GAIN * readout: how far a step of the readout moves the logit

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
        self.in_scale = 1.0 / in_features
        self.out_scale = 1.0 / hidden_size
        with torch.no_grad():
            self.proj.weight.normal_(std=math.sqrt(in_features))
            self.proj.bias.zero_()
            for layer, value in ((self.theta_r, init_theta_r), (self.theta_s, init_theta_s)):
                layer.weight.zero_()
                layer.bias.fill_(math.log(value / (1.0 - value)) / self.GAIN)

    def features(self, s_self, s_cross, live, num_visual) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """z (B, hidden_size), float32."""
        proj = F.linear(features.float(), self.proj.weight.float() * self.in_scale, self.proj.bias.float())
        return F.gelu(proj)

    def logits(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The thresholds' logits (B,) from z."""
        return tuple(
            self.GAIN * F.linear(z, layer.weight.float() * self.out_scale, layer.bias.float()).squeeze(-1)
            for layer in (self.theta_r, self.theta_s)
        )

    def forward(
        self, s_self: torch.Tensor, s_cross: torch.Tensor, live: torch.Tensor, num_visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) normalised scores (0 where pruned), live mask, (B,) visual counts -> theta_r, theta_s (B,)."""
        logit_r, logit_s = self.logits(self.hidden(self.features(s_self, s_cross, live, num_visual)))
        return torch.sigmoid(logit_r), torch.sigmoid(logit_s)


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
        init_theta_r: float = 0.5,
        init_theta_s: float = 0.5,
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
        self, bins: int = 64, hidden_size: int = 256, init_theta_r: float = 0.5, init_theta_s: float = 0.5
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


class ConstantThresholdHead(ThresholdHead):
    """A control without per-instance input: theta_r, theta_s are two learned numbers per ATP
    layer, the same for every sample (the readout biases; the features are a constant 0).

    Trained like the other heads, it learns a per-layer schedule and nothing per instance, so
    comparing it with a trained ``paper`` or ``binned`` head separates what the thresholds gain
    from reading each input (docs/study.md).
    """

    def __init__(self, init_theta_r: float = 0.5, init_theta_s: float = 0.5):
        super().__init__(1, 1, init_theta_r, init_theta_s)  # hidden_size does not apply: one constant unit

    @classmethod
    def from_options(
        cls,
        num_visual_tokens: int | None,
        hidden_size: int,
        init_theta_r: float,
        init_theta_s: float,
        bins: int,
    ):
        return cls(init_theta_r, init_theta_s)

    def features(self, s_self, s_cross, live, num_visual) -> torch.Tensor:
        return s_self.new_zeros(s_self.shape[0], 1, dtype=torch.float32)
