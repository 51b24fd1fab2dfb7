"""The attention the last prompt token pays to each visual token (FastV, PDrop)."""

from __future__ import annotations

import torch

from atp.scorers.base import AttentionView, Scorer, row_attention


def last_token_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask,
    scale: float,
    last_slot: torch.Tensor,
    visual_slots,
) -> torch.Tensor:
    """Softmax attention of the query at ``last_slot`` (B,) over all keys, averaged over heads,
    at the visual slots (B, N). One query row per sample: O(L d), no L x L matrix. float32."""
    probs = row_attention(query, key, attention_mask, scale, last_slot[:, None]).mean(1)  # (B, 1, L)
    return probs[:, 0].gather(1, visual_slots)


class LastTokenScorer(Scorer):
    """``s_last``: attention from the last prompt token, as FastV and PDrop rank tokens."""

    name = "last_token"

    def score(self, view: AttentionView) -> dict[str, torch.Tensor]:
        return {
            "s_last": last_token_attention(
                view.query, view.key, view.attention_mask, view.scale, view.last_slot, view.visual_slots
            )
        }
