"""Position keepers: what the positions of the tokens become around pruning.

The runtime asks a keeper for the rotary cos / sin (and position ids) of

* every layer at the prefill, when it changes positions from layer 0 on (``from_layer_zero``);
* the layers after an ATP layer in drop mode (``select``: the kept slots);
* the new tokens of a decode step in those layers (``decode``).
"""

from __future__ import annotations

import torch

from atp.core.layout import gather_seq


class KeepPositions:
    """Kept tokens keep their original positions (the paper's choice, Sec. 3.3.1). Works in both
    modes and for 1D RoPE and M-RoPE alike: cos / sin are gathered at the kept slots."""

    name = "keep"
    from_layer_zero = False
    drop_only = False
    positions = ("1d-rope", "mrope", "1d-rope-per-layer-type")

    def __init__(self, adapter=None):
        self.adapter = adapter

    def prefill(self, position_embeddings, prefill, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of every token from layer 0 on (``position_ids`` (B or 1, L): the layer's)."""
        return position_embeddings

    def select(self, kwargs: dict, index: torch.Tensor, shift: torch.Tensor, seq_dim: int = 1) -> dict:
        """Replacements for the kwargs of a layer in the pruned sequence (slots ``index`` (B, S))."""
        from atp.host import compat  # transformers' argument names (imported when used)

        cos, sin = kwargs[compat.POSITION_EMBEDDINGS]
        seq_dim = compat.rotary_seq_dim(cos, seq_dim)
        out = {compat.POSITION_EMBEDDINGS: (gather_seq(cos, index, seq_dim), gather_seq(sin, index, seq_dim))}
        if kwargs.get(compat.POSITION_IDS) is not None:
            out[compat.POSITION_IDS] = gather_seq(kwargs[compat.POSITION_IDS], index, seq_dim)
        return out

    def decode(self, kwargs: dict, shift: torch.Tensor, past: int) -> dict:
        """Replacements for a decode step's kwargs in a pruned segment (``shift`` (B,) tokens removed)."""
        return {}


def _position_ids(kwargs: dict, batch: int, length: int, past: int, device) -> torch.Tensor:
    from atp.host import compat  # transformers' argument names (imported when used)

    ids = kwargs.get(compat.POSITION_IDS)
    if ids is None:
        ids = torch.arange(past, past + length, device=device)[None]
    return ids.expand(batch, -1)


class RenumberPositions(KeepPositions):
    """Kept tokens are renumbered contiguously (the gaps of pruned tokens close), as most pruning
    methods do; an ablation of the paper's choice. Drop mode and 1D RoPE only; new cos / sin come
    from the language model's own rotary embedding."""

    name = "renumber"
    drop_only = True
    positions = ("1d-rope",)

    def _rotary(self, ids: torch.Tensor, like: torch.Tensor):
        return self.adapter.rotary_embedding()(like, ids)

    def select(self, kwargs: dict, index: torch.Tensor, shift: torch.Tensor, seq_dim: int = 1) -> dict:
        from atp.host import compat  # transformers' argument names (imported when used)

        cos = kwargs[compat.POSITION_EMBEDDINGS][0]
        batch, length = index.shape[0], shift.shape[1]
        ids = _position_ids(kwargs, batch, length, 0, index.device)
        renumbered = gather_seq(ids - shift, index)  # (B, S)
        out = {compat.POSITION_EMBEDDINGS: self._rotary(renumbered, cos)}
        if kwargs.get(compat.POSITION_IDS) is not None:
            out[compat.POSITION_IDS] = renumbered
        return out

    def decode(self, kwargs: dict, shift: torch.Tensor, past: int) -> dict:
        from atp.host import compat  # transformers' argument names (imported when used)

        cos = kwargs[compat.POSITION_EMBEDDINGS][0]
        ids = _position_ids(kwargs, shift.shape[0], cos.shape[1], past, cos.device) - shift[:, None]
        out = {compat.POSITION_EMBEDDINGS: self._rotary(ids, cos)}
        if kwargs.get(compat.POSITION_IDS) is not None:
            out[compat.POSITION_IDS] = ids
        return out


class Rope2DPositions(KeepPositions):
    """The paper's pruning positional embedding (PP, Sec. 3.3.1): the visual tokens of each image
    get 2D rotary positions, the row on one half of the rotary frequency bands and the column on
    the other (offset by the image's first position), built with timm's 2D rotary helper; text
    keeps 1D positions, and kept tokens keep these positions after pruning. Each image's grid
    starts at the position id of its first token, so left padding does not move it.

    This changes the model from layer 0 on: a model must be fine-tuned with it (the paper leaves
    it out of the frozen-LM runs). 1D-RoPE families only (Qwen's M-RoPE is 2D already).
    """

    name = "rope2d"
    from_layer_zero = True
    positions = ("1d-rope",)

    def prefill(self, position_embeddings, prefill, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.layers.pos_embed_sincos import build_rotary_pos_embed

        from atp.host import compat  # transformers' argument names (imported when used)

        cos, sin = position_embeddings
        batch, length = prefill.visual_id.shape
        _check_padding_free(position_ids, prefill.real)
        cos, sin = cos.expand(batch, -1, -1).clone(), sin.expand(batch, -1, -1).clone()
        inv_freq, scaling = compat.rotary_bands(self.adapter.rotary_embedding())
        bands = inv_freq.float()[0::2]  # half of the bands per axis, spread over the whole range
        starts = prefill.context["visual_positions"]
        for b, grids in enumerate(prefill.context["grids"]):
            offset = 0
            for height, width in grids:
                slots = starts[b, offset : offset + height * width]
                first = int(slots[0]) if len(slots) else 0
                if position_ids is not None:  # the image's first position, not its slot (left padding)
                    first = int(position_ids[min(b, position_ids.shape[0] - 1), first])
                grid_sin, grid_cos = build_rotary_pos_embed(
                    [height, width],
                    bands=bands,
                    in_pixels=False,
                    grid_type="index",
                    grid_offset=first,
                    rotate_half=True,
                    device=cos.device,
                )
                cos[b, slots] = (grid_cos * scaling).to(cos.dtype)
                sin[b, slots] = (grid_sin * scaling).to(sin.dtype)
                offset += height * width
        return cos, sin


def _check_padding_free(position_ids, real: torch.Tensor) -> None:
    """2D positions are absolute (text and visual tokens rotate at different frequencies), so
    they must not move with left padding: each real token's position is the number of real
    tokens before it, as generate computes them from the attention mask."""
    if position_ids is None:  # the language model's default: positions 0 .. L-1, padding counted
        position_ids = torch.arange(real.shape[1], device=real.device)[None]
    expected = real.long().cumsum(dim=1) - 1
    if not torch.equal(position_ids.expand_as(expected)[real], expected[real]):
        raise ValueError(
            "positions='rope2d' needs position ids that skip the left padding (2D positions are absolute, "
            "so padding would move them): pass position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0) "
            "to a padded forward, as generate does"
        )
