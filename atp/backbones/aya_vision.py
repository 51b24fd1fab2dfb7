"""Aya Vision (``AyaVisionForConditionalGeneration``): SigLIP tiles after pixel shuffle, each a
square grid, in a Cohere language model with sliding-window and global layers.

The processor writes an image as ``<|START_OF_IMG|>``, then for a tiled image ``TILE_i`` and the
tokens of tile i, then ``TILE_GLOBAL`` and the tokens of the whole image (the thumbnail, last in
``pixel_values`` too), then ``<|END_OF_IMG|>``. Only the patch token's id is in the config; the
markers are text (their ids are the tokenizer's), as Idefics3's are. Each tile is a
``side x side`` grid, ``side = image_size / patch_size / downsample_factor`` (13 x 13 = 169 for the
released 364 px towers with patch 14 and pixel shuffle 2).

The language model is built from ``text_config`` by ``AutoModel``: Cohere2 (Aya Vision 8B) runs
sliding-window layers with RoPE and, every ``sliding_window_pattern``-th layer, global layers without
positions (NoPE: they ignore the cos / sin they receive); Cohere (Aya Vision 32B) global layers only.
atp follows the layer types as it does Gemma 3's: each type gets its own mask, the window is measured
in original positions, and the sliding layers' caches keep their last ``sliding_window - 1`` tokens.
Only ``positions="keep"`` (the default) is followed: Cohere rotates interleaved pairs of channels
(not the two halves the ``rope2d`` keeper builds) and its global layers take no positions at all.
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, ConfigLayerTypes, VisualLayout, square_tiles
from atp.backbones.llava import image_per_grid


class AyaVisionAdapter(ConfigLayerTypes, BackboneAdapter):
    family = "aya_vision"
    model_types = ("aya_vision",)
    positions = "1d-rope-per-layer-type"  # RoPE (interleaved) or none per layer type: positions='keep' only
    cache_layers = ("DynamicLayer", "DynamicSlidingWindowLayer")

    def uses_sliding_window(self) -> bool:
        if getattr(self.text_config(), "layer_types", None):
            return False  # followed: masks per layer type, windows in original positions
        return super().uses_sliding_window()

    def grid_side(self) -> int:
        config = self.model.config
        patches = config.vision_config.image_size // config.vision_config.patch_size
        return patches // config.downsample_factor

    def check(self) -> None:
        config = self.model.config
        patches = config.vision_config.image_size // config.vision_config.patch_size
        if patches % config.downsample_factor:
            raise ValueError(
                f"this Aya Vision model's {patches} x {patches} patches per tile do not divide by its "
                f"downsample_factor={config.downsample_factor}, so a tile's tokens are not the square grid the "
                "spatial score needs"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        visual = input_ids == self.model.config.image_token_id
        grids = square_tiles(visual, self.grid_side())
        return VisualLayout(visual, torch.zeros_like(visual), grids)

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """One ``pixel_values`` crop per grid, in order (the tiles, then the thumbnail)."""
        found = image_per_grid(inputs.get("pixel_values"), grids)
        return found if found is not None else super().grid_pixels(inputs, grids)
