"""The paper's redundancy scores (Sec. 3.3.1, Eq. 3-4), without an L x L matrix."""

from __future__ import annotations

import torch
from einops import reduce

from atp.layout import gather_seq
from atp.scorers.base import AttentionView, Scorer, additive_rows


def self_scores(
    query: torch.Tensor, key: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor, scale: float
) -> torch.Tensor:
    """S_self (Eq. 3): mean over visual queries m of q_m . k_n * scale, averaged over heads.

    A mean of dot products is the dot product with the mean query, so this costs O(N d).

    Parameters
    ----------
    query : (B, H, L, d)    key : (B, H_kv, L, d)
    slots : (B, N) visual slots    weight : (B, N) weight of each visual query (0 = absent)

    Returns
    -------
    (B, N) float32
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    weight = weight.float()
    q_visual = gather_seq(query.float(), slots, dim=2)  # (B, H, N, d)
    q_mean = torch.einsum("bhnd,bn->bhd", q_visual, weight) / weight.sum(1).clamp_min(1e-6)[:, None, None]
    q_mean = reduce(q_mean, "b (g r) d -> b g d", "sum", g=kv_heads)  # GQA: sum each group
    k_visual = gather_seq(key.float(), slots, dim=2)  # (B, H_kv, N, d)
    return torch.einsum("bgd,bgnd->bn", q_mean, k_visual) * (scale / heads)


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

    Only the (T x L) block of instruction queries is formed, with the layer's real mask.

    Returns
    -------
    (B, N) float32; zero for a sample without instruction tokens.
    """
    batch, heads, _, _ = query.shape
    groups = heads // key.shape[1]
    q_text = gather_seq(query.float(), instruction_slots, dim=2)  # (B, H, T, d)
    keys = key.float().repeat_interleave(groups, dim=1) if groups > 1 else key.float()
    logits = torch.einsum("bhtd,bhld->bhtl", q_text, keys) * scale
    bias = additive_rows(attention_mask, instruction_slots, keys.shape[2])
    bias = bias.masked_fill(~instruction_valid[:, None, :, None], 0.0)  # padding rows: finite, weight 0
    probs = torch.softmax(logits + bias, dim=-1).mean(1)  # (B, T, L)
    probs = gather_seq(probs, visual_slots, dim=2)  # (B, T, N)
    weight = instruction_valid.float()
    return torch.einsum("btn,bt->bn", probs, weight) / weight.sum(1).clamp_min(1.0)[:, None]


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
