"""What a scorer sees and returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionView:
    """One scoring layer's attention in the current (possibly pruned) sequence, one prefill.

    Attributes
    ----------
    query : (B, H, L, d) after RoPE.    key : (B, H_kv, L, d) after RoPE.
    attention_mask : None (causal), bool (True = attend) or additive float, (B or 1, 1, L, L).
    scale : the softmax scale of the layer.
    visual_slots, visual_valid : (B, N) slot of each live visual token (original visual order).
    visual_weight : (B, N) float weight of each visual slot (the cumulative keep mask).
    instruction_slots, instruction_valid : (B, T) slots of the instruction tokens.
    last_slot : (B,) slot of the last non-padding token (FastV's and PDrop's query).
    visual_ids : (B, N) original visual index of each visual slot.
    context : the forward's ``inputs`` (multimodal kwargs: input_ids, pixel_values, ...), the
        image ``grids`` and the ``visual_positions`` (B, N_all) in the original sequence.
    """

    query: torch.Tensor
    key: torch.Tensor
    attention_mask: torch.Tensor | None
    scale: float
    visual_slots: torch.Tensor
    visual_valid: torch.Tensor
    visual_weight: torch.Tensor
    instruction_slots: torch.Tensor
    instruction_valid: torch.Tensor
    last_slot: torch.Tensor | None = None
    visual_ids: torch.Tensor | None = None
    context: dict | None = None


class Scorer:
    """Scores the live visual tokens of one layer. Subclasses implement :meth:`score`.

    ``score`` returns named float32 tensors (B, N) over ``view.visual_slots``; entries at
    invalid slots are ignored. It must not build an (L x L) attention matrix.
    """

    name = "scorer"

    def score(self, view: AttentionView) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def additive_rows(mask: torch.Tensor | None, rows: torch.Tensor, key_len: int) -> torch.Tensor:
    """Float32 additive mask rows (B, 1, R, K) of ``mask`` at query slots ``rows`` (B, R)."""
    batch, count = rows.shape
    if mask is None:  # plain causal attention over the current slots
        keys = torch.arange(key_len, device=rows.device)
        allowed = keys[None, None, None, :] <= rows[:, None, :, None]
        return torch.zeros(allowed.shape, device=rows.device).masked_fill(~allowed, float("-inf"))
    mask = mask.expand(batch, *mask.shape[1:])
    picked = mask.gather(2, rows[:, None, :, None].expand(batch, mask.shape[1], count, mask.shape[-1]))
    if picked.dtype == torch.bool:
        return torch.zeros(picked.shape, device=rows.device).masked_fill(~picked, float("-inf"))
    return picked.float()


def row_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    rows: torch.Tensor,
    row_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention (B, H, R, L) float32 of the query slots ``rows`` (B, R) over every key,
    with the layer's mask (None = causal). Grouped keys (GQA) are not repeated: the queries of a
    group are stacked instead; the scale multiplies the R queries, not the R x L logits. Rows
    where ``row_valid`` (B, R) is False (padding) are left unmasked, so they stay finite."""
    from atp.core.layout import gather_seq

    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    count = rows.shape[1]
    picked = gather_seq(query, rows, dim=2).float() * scale  # (B, H, R, d)
    picked = picked.reshape(batch, kv_heads, (heads // kv_heads) * count, dim)
    logits = torch.matmul(picked, key.float().transpose(-1, -2)).view(batch, heads, count, length)
    bias = additive_rows(attention_mask, rows, length)  # (B, 1, R, L): small, unlike the logits
    if row_valid is not None:
        bias = bias.masked_fill(~row_valid[:, None, :, None], 0.0)
    return torch.softmax(logits.add_(bias), dim=-1)  # a broadcast add: faster than a masked fill
