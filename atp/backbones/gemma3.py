"""Gemma 3: sliding-window and global layers, bidirectional attention inside each image.

Each image is ``<start_of_image>`` + ``mm_tokens_per_image`` tokens (a square grid: 256 = 16 x 16
in the released models) + ``<end_of_image>``; the two markers are structural. The language model
interleaves sliding-window layers (a window of ``sliding_window`` tokens) with global ones, and
each layer type gets its own attention mask and its own rotary cos / sin: atp builds the
replacements of a pruned segment per layer type. The window is measured in original positions
(the mask transformers builds for the whole prompt is gathered at the kept tokens, and decode
masks are rebuilt in original coordinates), so drop and mask modes attend to the same tokens;
the sliding layers' caches keep their last ``sliding_window - 1`` kept tokens.
"""

from __future__ import annotations

import math

import torch

from atp.backbones.base import BackboneAdapter, ConfigLayerTypes, VisualLayout
from atp.backbones.llava import image_per_grid


class Gemma3Adapter(ConfigLayerTypes, BackboneAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    positions = "1d-rope-per-layer-type"  # a rotary per layer type: positions='keep' only
    cache_layers = ("DynamicLayer", "DynamicSlidingWindowLayer")

    def uses_sliding_window(self) -> bool:
        return False  # followed: masks per layer type, windows in original positions

    def num_visual_tokens(self) -> int | None:
        return None  # Pan & Scan crops add images of their own: the count varies per prompt

    def check(self) -> None:
        per_image = int(self.model.config.mm_tokens_per_image)
        if math.isqrt(per_image) ** 2 != per_image:
            raise ValueError(
                f"this Gemma 3 model's {per_image} tokens per image (mm_tokens_per_image) are not a square grid, "
                "which the spatial score needs"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        config = self.model.config
        visual = input_ids == config.image_token_id
        structural = (input_ids == config.boi_token_id) | (input_ids == config.eoi_token_id)
        per_image = int(config.mm_tokens_per_image)
        side = math.isqrt(per_image)
        grids = []
        for count in visual.sum(dim=1).tolist():
            if count % per_image:
                raise ValueError(
                    f"a sample has {count} image tokens, not a multiple of mm_tokens_per_image={per_image}: build "
                    "input_ids with the model's processor (AutoProcessor), and pass the whole prompt in one forward"
                )
            grids.append([(side, side)] * (count // per_image))
        return VisualLayout(visual, structural, grids)

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """One ``pixel_values`` image per grid, in order (SigLIP: one square image per grid)."""
        found = image_per_grid(inputs.get("pixel_values"), grids)
        return found if found is not None else super().grid_pixels(inputs, grids)
