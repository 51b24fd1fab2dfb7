"""Threshold heads (Sec. 3.3.2, Eq. 6-8): scores -> per-sample thresholds theta_r, theta_s."""

from __future__ import annotations

import math
import warnings

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
        for name, value in (("init_theta_r", init_theta_r), ("init_theta_s", init_theta_s)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if num_visual_tokens < 1 or hidden_size < 1:
            raise ValueError("num_visual_tokens and hidden_size must be positive")
        self.num_visual_tokens = num_visual_tokens
        self.proj = nn.Linear(2 * num_visual_tokens, hidden_size)
        self.theta_r = nn.Linear(hidden_size, 1)
        self.theta_s = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            for head, value in ((self.theta_r, init_theta_r), (self.theta_s, init_theta_s)):
                head.weight.zero_()
                head.bias.fill_(math.log(value / (1.0 - value)))

    def forward(self, s_self: torch.Tensor, s_cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) normalised scores (0 where pruned) -> theta_r, theta_s, each (B,) float32."""
        width = s_self.shape[1]
        if width > self.num_visual_tokens:
            raise ValueError(
                f"this threshold head was built for {self.num_visual_tokens} visual tokens per sample, "
                f"got {width}; use a size-agnostic threshold head for inputs with more visual tokens"
            )
        pad = self.num_visual_tokens - width
        features = torch.cat([F.pad(s_self.float(), (0, pad)), F.pad(s_cross.float(), (0, pad))], dim=1)
        z = F.gelu(F.linear(features, self.proj.weight.float(), self.proj.bias.float()))
        theta_r = torch.sigmoid(F.linear(z, self.theta_r.weight.float(), self.theta_r.bias.float()))
        theta_s = torch.sigmoid(F.linear(z, self.theta_s.weight.float(), self.theta_s.bias.float()))
        return theta_r.squeeze(-1), theta_s.squeeze(-1)


def warn_untrained(what: str) -> None:
    warnings.warn(
        f"{what}: the ATP threshold heads are untrained, so they apply their initial thresholds to every "
        "input. Train them (see docs/concepts.md) or load trained ones before relying on the pruning.",
        UserWarning,
        stacklevel=3,
    )
