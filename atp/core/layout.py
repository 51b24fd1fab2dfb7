"""Pure tensor helpers for moving between the original sequence and a pruned one.

The pruned ("compacted") sequence of a sample is described by ``slot_index`` (B, S): the
original position of each slot, and ``slot_valid`` (B, S): False for filler slots that pad
a sample which keeps fewer tokens than the largest one in the batch. Fillers sit at the
*left*, like left padding, and point at position 0; they are masked out as keys.
"""

from __future__ import annotations

import math

import torch


def mask_to_index(mask: torch.Tensor, align: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, ascending.

    Parameters
    ----------
    mask : BoolTensor (B, L)
    align : "right" puts padding after the positions (``[p0, p1, pad]``), "left" before
        (``[pad, p0, p1]``).

    Returns
    -------
    index : LongTensor (B, K), K = max True count per row; padding entries are 0.
    valid : BoolTensor (B, K), False at padding entries.
    """
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', got {align!r}")
    batch, length = mask.shape
    counts = mask.sum(dim=1)
    if not (batch and length):
        return mask.new_zeros(batch, 0, dtype=torch.long), mask.new_zeros(batch, 0)
    low, width = torch.stack(torch.aminmax(counts)).tolist()  # one device sync
    if low == width:  # no padding either way: the True positions in order, row by row
        return mask.nonzero()[:, 1].view(batch, width), torch.ones(
            batch, width, dtype=torch.bool, device=mask.device
        )
    if align == "right":  # True entries first, in order
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=mask.device) < counts[:, None]
    else:  # False entries first, True entries last, in order
        order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, length - width :]
        valid = torch.arange(width, device=mask.device) >= (width - counts)[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))  # the sorted order is the positions
    return index, valid


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` gathered along its sequence axis ``dim`` with a per-sample index.

    Parameters
    ----------
    x : Tensor (B or 1, ..., L, ...) with batch at axis 0 and sequence at ``dim``.
    index : LongTensor (B, S)

    Returns
    -------
    Tensor with axis ``dim`` of size S and batch B.
    """
    dim = dim % x.dim()
    batch = index.shape[0]
    row = math.prod(x.shape[dim + 1 :])
    if row >= 16 and x.is_contiguous() and x.shape[0] in (1, batch):
        # whole rows (a hidden state, a head's query): one index_select copies them, much faster
        # than an element-wise gather
        length, outer = x.shape[dim], math.prod(x.shape[1:dim])
        start = torch.arange(batch * outer, device=index.device).view(batch, outer, 1) * length
        if x.shape[0] != batch:  # one shared row block for every sample
            start = start % (outer * length)
        flat = (start + index[:, None, :]).reshape(-1)
        picked = x.reshape(-1, row).index_select(0, flat)
        return picked.view(batch, *x.shape[1:dim], index.shape[1], *x.shape[dim + 1 :])
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = batch, index.shape[1]
    expanded = index.view(shape).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, expanded)


def scatter_seq(
    full: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, values: torch.Tensor, fillers: bool = True
) -> torch.Tensor:
    """``full`` (B, L, D) with ``values`` (B, S, D) written at ``index`` where ``valid``; out of place.
    ``fillers=False`` promises that every slot is valid (a layout without fillers: no extra row)."""
    batch, length, width = full.shape
    start = torch.arange(batch, device=index.device)[:, None] * length
    if not fillers:
        target = (start + index).reshape(-1)
        return (
            full.reshape(batch * length, width)
            .index_copy(0, target, values.to(full.dtype).reshape(-1, width))
            .view(batch, length, width)
        )
    rows = torch.cat(
        [full.reshape(batch * length, width), full.new_zeros(1, width)]
    )  # the last takes fillers
    target = torch.where(valid, start + index, batch * length).reshape(-1)
    rows = rows.index_copy(0, target, values.to(full.dtype).reshape(-1, width))
    return rows[: batch * length].view(batch, length, width)


def place(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, width: int, fill) -> torch.Tensor:
    """A (B, width) tensor holding ``values`` (B, K) at columns ``index`` where ``valid``, ``fill`` elsewhere."""
    out = torch.full((values.shape[0], width + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, torch.where(valid, index, width), values)[:, :width]


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, 1, Q, K): key position <= query position (original coordinates)."""
    return k_positions[:, None, None, :] <= q_positions[:, None, :, None]


def compact_mask(
    base: torch.Tensor | None,
    q_index: torch.Tensor | None,
    k_index: torch.Tensor,
    k_valid: torch.Tensor,
    q_valid: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The boolean attention mask of a pruned sequence.

    Parameters
    ----------
    base : BoolTensor (B or 1, 1, Q0, K0) built for the full sequence (True = attend), or
        None for plain causal attention (prefill) / full attention (one decode token).
    q_index : LongTensor (B, Q) original row of each query slot, or None to keep the rows.
    k_index, k_valid : LongTensor / BoolTensor (B, K): original column of each key slot.
    q_valid : BoolTensor (B, Q), False for filler query slots (they attend to themselves
        only, so no row is ever fully masked).

    Returns
    -------
    BoolTensor (B, 1, Q, K), or None when ``base`` is None and every key is valid
    (SDPA's ``is_causal`` / unmasked fast path stays correct on the pruned sequence).
    """
    batch = k_index.shape[0]
    if base is None:
        if bool(k_valid.all()):
            return None
        if q_index is None:  # decode: every past key is visible
            mask = k_valid[:, None, None, :]
        else:
            mask = causal_mask(q_index, k_index) & k_valid[:, None, None, :]
    else:
        if base.dtype != torch.bool:
            raise TypeError(f"expected a boolean attention mask, got {base.dtype}")
        mask = base.expand(batch, *base.shape[1:])
        if q_index is not None:
            mask = gather_seq(mask, q_index, dim=2)
        mask = gather_seq(mask, k_index, dim=3) & k_valid[:, None, None, :]
    if q_valid is not None and q_index is not None and not bool(q_valid.all()):
        eye = torch.eye(q_index.shape[1], k_index.shape[1], dtype=torch.bool, device=k_index.device)
        mask = torch.where(q_valid[:, None, :, None], mask, eye)
    return mask.expand(batch, 1, *mask.shape[2:])


def additive_mask(
    base: torch.Tensor | None, bias: torch.Tensor, q_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """A float mask (B, 1, Q, K): ``bias`` (B, K) where ``base`` allows attention, dtype-min elsewhere.

    ``base`` is None (causal when Q == K, all visible when Q == 1), or a boolean mask
    (B or 1, 1, Q, K). The floor is finite, so no row is ever all ``-inf`` (no NaN).
    """
    batch, k_len = bias.shape
    floor = torch.finfo(dtype).min
    if base is None:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=bias.device)[:, None] + offset
        base = (torch.arange(k_len, device=bias.device)[None, :] <= rows)[None, None]
    elif base.dtype != torch.bool:
        raise TypeError(f"expected a boolean attention mask, got {base.dtype}")
    bias = bias.to(dtype).clamp_min(floor)
    return torch.where(base, bias[:, None, None, :], torch.tensor(floor, dtype=dtype, device=bias.device))


def compact_padding(
    base: torch.Tensor | None, index: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The 2D mask (B, S) of a pruned sequence for a recurrent layer (linear attention), which
    multiplies it into its input: ``base`` (B, L) gathered at the slots, 0 at fillers, times the
    slots' soft keep ``weight`` (B, S) when given.

    A zeroed slot is not a removed one for such a layer (it still decays the state and sits in the
    conv window), so fillers must sit before every real token (left, as :func:`mask_to_index`'s
    ``align="left"`` puts them), where the state is still zero. None when ``base`` is None, no slot
    is a filler and no weight is given (the layer's unmasked fast path, as for the full sequence).
    """
    if base is None:
        if weight is None and bool(valid.all()):
            return None
        mask = valid.long()
    else:
        mask = gather_seq(base, index) * valid
    return mask if weight is None else mask * weight
