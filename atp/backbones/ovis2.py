"""Ovis2 (``Ovis2ForConditionalGeneration``): tiles of visual words, each a square grid, marked
by the visual indicator tokens.

The processor writes an image as ``<IMG_START>``, the global image's tokens, ``<IMG_GRID>``, then
(for a tiled image) each tile's tokens with ``<IMG_COL>`` between the tiles of a row and
``<IMG_ROW>`` between rows, and ``<IMG_END>``. Those five markers are the config's
``visual_indicator_token_ids`` (the model gives them learned embeddings of their own): they are
structural, never pruned and not instruction tokens. Each tile and the global image is one
``side x side`` grid, ``side = image_size / patch_size / hidden_stride`` (the vision tower merges
``stride x stride`` patches into one token): 16 x 16 for the released 448 px towers with patch 14
and stride 2. The language model is built from ``text_config`` by ``AutoModel`` (Qwen2 in the
released models), 1D RoPE.
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, square_tiles
from atp.backbones.llava import image_per_grid


class Ovis2Adapter(BackboneAdapter):
    family = "ovis2"
    model_types = ("ovis2",)
    positions = "1d-rope"

    def patches(self) -> int:
        """Patches per side of a crop."""
        vision = self.model.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        return (size if isinstance(size, int) else size[0]) // (patch if isinstance(patch, int) else patch[0])

    def grid_side(self) -> int:
        return self.patches() // self.model.config.vision_config.hidden_stride

    def check(self) -> None:
        vision = self.model.config.vision_config
        for name in ("image_size", "patch_size"):
            value = getattr(vision, name)
            if not isinstance(value, int) and len(set(value)) != 1:
                raise ValueError(
                    f"this Ovis2 model's vision_config.{name}={value} is not square; atp reads each crop as a "
                    "square grid, as the vision tower lays it out"
                )
        if self.patches() % vision.hidden_stride:
            raise ValueError(
                f"this Ovis2 model's {self.patches()} patches per side do not divide by its "
                f"hidden_stride={vision.hidden_stride}, so a crop's tokens are not a whole square grid (transformers' "
                "tower cannot merge them either); atp needs image_size / patch_size to be a multiple of hidden_stride"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        config = self.model.config
        visual = input_ids == config.image_token_id
        structural = torch.zeros_like(visual)
        for marker in config.visual_indicator_token_ids:
            structural |= input_ids == marker
        grids = square_tiles(visual, self.grid_side())
        return VisualLayout(visual, structural, grids)

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """One ``pixel_values`` crop per grid, in order (the processor's global image, then the tiles)."""
        found = image_per_grid(inputs.get("pixel_values"), grids)
        return found if found is not None else super().grid_pixels(inputs, grids)
