"""Pre-LLM pooling: a 2 x 2 average of the visual tokens before the language model.

Simple downsampling is a strong baseline that any adaptive method must beat. Here it runs
under the same API: ``atp.attach(model, policy="pool")`` averages every ``stride x stride``
block of each image's token grid into one token before layer 0 (the block's top-left token
carries the mean and keeps its position; ``positions="renumber"`` makes them contiguous) and
drops the rest, so every layer, including layer 0's KV cache, sees a quarter of the tokens.
"""

from __future__ import annotations

import torch

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.options import OptionCheck


def block_targets(grids: list[list[tuple[int, int]]], width: int, stride: int, device=None) -> torch.Tensor:
    """LongTensor (B, width): for each visual token, the visual index of its block's top-left token."""
    out = torch.arange(width).repeat(len(grids), 1)
    for b, sample in enumerate(grids):
        offset = 0
        for height, columns in sample:
            rows = torch.arange(height)[:, None] // stride * stride
            cols = torch.arange(columns)[None, :] // stride * stride
            out[b, offset : offset + height * columns] = (offset + rows * columns + cols).flatten()
            offset += height * columns
    return out.to(device)


class PoolPolicy(Policy):
    """Average ``stride x stride`` blocks of visual tokens before the language model.

    Options
    -------
    stride : block side, an int >= 2 (default 2: 576 -> 144 tokens for LLaVA-1.5).
    """

    name = "pool"
    pre_llm = True

    def __init__(self, context: PolicyContext, stride: int = 2):
        super().__init__(context)
        self.stride = OptionCheck(self.name).integer("stride", stride, 2)

    def decide(self, inputs: PolicyInput) -> Decision:
        width = inputs.live.shape[1]
        targets = block_targets(inputs.grids, width, self.stride, inputs.live.device)
        is_target = targets == torch.arange(width, device=targets.device)[None]
        return Decision((is_target & inputs.live).float(), merge=targets)
