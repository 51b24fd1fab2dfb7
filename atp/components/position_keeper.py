"""Position keepers: what the positions of kept tokens become after pruning."""

from __future__ import annotations

import torch

from atp.layout import gather_seq


class KeepPositions:
    """Kept tokens keep their original positions (the paper's choice, Sec. 3.3.1).

    ``select`` gathers per-token position tensors (rotary cos/sin, position ids) at the
    kept slots along the sequence axis.
    """

    name = "keep"

    def select(self, tensor: torch.Tensor, slot_index: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """``tensor`` (B or 1, L, ...) -> (B, S, ...) at the original positions ``slot_index`` (B, S)."""
        return gather_seq(tensor, slot_index, dim=seq_dim)
