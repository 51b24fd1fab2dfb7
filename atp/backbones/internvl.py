"""InternVL (2.5 / 3, ``InternVLForConditionalGeneration``): dynamic tiles of ``image_seq_length``
tokens each (a square grid after pixel shuffle, 16 x 16 for 448 px tiles), the thumbnail last.

The prompt wraps each image's tiles in ``<img> ... </img>``; the tokens right before and after
a run of image tokens are those markers and are structural (never pruned, not instruction
tokens). Each tile is its own grid for the spatial score.
"""

from __future__ import annotations

import math

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, runs


class InternVLAdapter(BackboneAdapter):
    family = "internvl"
    model_types = ("internvl",)
    positions = "1d-rope"

    def check(self) -> None:
        per_tile = int(self.model.config.image_seq_length)
        if math.isqrt(per_tile) ** 2 != per_tile:
            raise ValueError(
                f"this InternVL model's image_seq_length={per_tile} is not a square grid of tokens per tile, "
                "which the spatial score needs"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        config = self.model.config
        visual = input_ids == config.image_token_id
        per_tile = int(config.image_seq_length)
        side = math.isqrt(per_tile)
        structural = torch.zeros_like(visual)
        grids = []
        for sample, spans in enumerate(runs(visual)):
            sample_grids = []
            for start, stop in spans:
                if (stop - start) % per_tile:
                    raise ValueError(
                        f"an image has {stop - start} tokens, not a multiple of image_seq_length={per_tile}: "
                        "build input_ids with the model's processor, and pass the whole prompt in one forward"
                    )
                sample_grids += [(side, side)] * ((stop - start) // per_tile)
                structural[sample, max(start - 1, 0)] = start > 0
                if stop < visual.shape[1]:
                    structural[sample, stop] = True
            grids.append(sample_grids)
        return VisualLayout(visual, structural & ~visual, grids)
