"""Per-sample normalisation of scores over the live visual tokens."""

from __future__ import annotations

import torch


def minmax_normalize(
    scores: torch.Tensor, live: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores (B, N) mapped to [0, 1] per sample by min-max over the ``live`` (B, N) entries.

    Entries outside ``present`` (default: ``live``) become 0; present entries that are not
    live (in training, tokens the hard decision dropped that keep a soft weight) are mapped
    with the live tokens' range and clipped to [0, 1]. A sample whose live scores are all
    equal (or that has one live token) maps them to 1, so a constant score never prunes by itself.
    """
    present = live if present is None else present
    scores = scores.float()
    big = torch.finfo(torch.float32).max
    low = scores.masked_fill(~live, big).amin(dim=1, keepdim=True)
    high = scores.masked_fill(~live, -big).amax(dim=1, keepdim=True)
    span = high - low
    flat = span <= 1e-12
    normalized = (scores - low) / torch.where(flat, torch.ones_like(span), span)
    normalized = torch.where(flat, torch.ones_like(normalized), normalized)
    return normalized.clamp(0.0, 1.0).masked_fill(~present, 0.0)
