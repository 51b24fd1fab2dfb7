"""The attention the last prompt token pays to each visual token (FastV, PDrop)."""

from __future__ import annotations

import torch

from atp.layout import gather_seq
from atp.scorers.base import AttentionView, Scorer, additive_rows


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
    heads = query.shape[1]
    groups = heads // key.shape[1]
    rows = last_slot[:, None]  # (B, 1)
    q_last = gather_seq(query.float(), rows, dim=2)  # (B, H, 1, d)
    keys = key.float().repeat_interleave(groups, dim=1) if groups > 1 else key.float()
    logits = torch.einsum("bhqd,bhld->bhql", q_last, keys) * scale
    probs = torch.softmax(logits + additive_rows(attention_mask, rows, keys.shape[2]), dim=-1).mean(
        1
    )  # (B, 1, L)
    return gather_seq(probs, visual_slots, dim=2)[:, 0]


class LastTokenScorer(Scorer):
    """``s_last``: attention from the last prompt token, as FastV and PDrop rank tokens."""

    name = "last_token"

    def score(self, view: AttentionView) -> dict[str, torch.Tensor]:
        return {
            "s_last": last_token_attention(
                view.query, view.key, view.attention_mask, view.scale, view.last_slot, view.visual_slots
            )
        }
