"""The paper's redundancy scores (Sec. 3.3.1, Eq. 3-4), without an L x L matrix."""

from __future__ import annotations

import torch
from einops import reduce

from atp.scorers.base import AttentionView, Scorer, row_attention


def self_scores(
    query: torch.Tensor, key: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor, scale: float
) -> torch.Tensor:
    """S_self (Eq. 3): mean over visual queries m of q_m . k_n * scale, averaged over heads.

    A mean of dot products is the dot product with the mean query, so this costs O(L d): two
    matrix-vector products over the whole sequence, no gathered copy of the queries or keys.

    Parameters
    ----------
    query : (B, H, L, d)    key : (B, H_kv, L, d)
    slots : (B, N) visual slots    weight : (B, N) weight of each visual query (0 = absent)

    Returns
    -------
    (B, N) float32
    """
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    weight = weight.float()
    # the weights at their slots (an absent slot adds 0 wherever it points)
    per_slot = torch.zeros(batch, length, device=query.device).scatter_add(1, slots, weight)
    per_slot = per_slot / weight.sum(1, keepdim=True).clamp_min(1e-6)
    q_mean = torch.matmul(per_slot[:, None, None, :], query.float()).squeeze(2)  # (B, H, d)
    q_mean = reduce(q_mean, "b (g r) d -> b g d", "sum", g=kv_heads)  # GQA: sum each group
    per_key = torch.matmul(key.float(), q_mean[..., None]).squeeze(-1).sum(1)  # (B, L)
    return per_key.gather(1, slots) * (scale / heads)


def cross_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    instruction_slots: torch.Tensor,
    instruction_valid: torch.Tensor,
    visual_slots: torch.Tensor,
) -> torch.Tensor:
    """S_cross (Eq. 4): attention each visual token receives, averaged over instruction queries and heads.

    Only the (T x L) block of instruction queries is formed, with the layer's real mask; with
    grouped keys (GQA) the queries are grouped instead of the keys repeated.

    Returns
    -------
    (B, N) float32; zero for a sample without instruction tokens.
    """
    probs = row_attention(query, key, attention_mask, scale, instruction_slots, instruction_valid)
    weight = instruction_valid.float()
    # mean over heads and the instruction queries in one pass, then the visual columns
    per_key = torch.matmul(weight[:, None, None, :], probs).sum(1)[:, 0]  # (B, L)
    per_key = per_key / (query.shape[1] * weight.sum(1).clamp_min(1.0))[:, None]
    return per_key.gather(1, visual_slots)


class RedundancyScorer(Scorer):
    """Computes ``s_self`` and ``s_cross`` for every live visual token."""

    name = "redundancy"

    def score(self, view: AttentionView) -> dict[str, torch.Tensor]:
        weight = view.visual_weight * view.visual_valid
        return {
            "s_self": self_scores(view.query, view.key, view.visual_slots, weight, view.scale),
            "s_cross": cross_scores(
                view.query,
                view.key,
                view.attention_mask,
                view.scale,
                view.instruction_slots,
                view.instruction_valid,
                view.visual_slots,
            ),
        }
