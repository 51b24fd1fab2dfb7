"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP patches as one square grid per image."""

from __future__ import annotations

import math

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout
from atp.backbones.mistral3 import pixtral_layout


class LlavaAdapter(BackboneAdapter):
    """Each ``<image>`` placeholder expands to ``image_seq_length`` tokens (576 = 24 x 24 for
    CLIP ViT-L/14 at 336 px); several images in one prompt are several consecutive grids.

    LLaVA checkpoints with a Pixtral vision tower (e.g. Pixtral-12B) lay images out as Mistral 3
    does (rows closed by break tokens, a variable number of tokens): that layout is read instead.
    """

    family = "llava"
    model_types = ("llava",)
    positions = "1d-rope"

    def pixtral(self) -> bool:
        return getattr(self.model.config.vision_config, "model_type", "") == "pixtral"

    def num_visual_tokens(self) -> int | None:
        return None if self.pixtral() else int(self.model.config.image_seq_length)

    def check(self) -> None:
        if self.pixtral():
            return
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        tower = getattr(self.model.config.vision_config, "model_type", "")
        if strategy == "full" and tower == "clip_vision_model":  # SigLIP towers have no CLS token
            raise ValueError(
                "this LLaVA model's vision_feature_select_strategy='full' keeps the CLIP tower's CLS token, so "
                "its image tokens are not a grid of patches, which the spatial score and 2D positions need; "
                "atp supports the 'default' strategy (patches only, no CLS token)"
            )
        per_image = self.num_visual_tokens()
        if math.isqrt(per_image) ** 2 != per_image:
            strategy = getattr(self.model.config, "vision_feature_select_strategy", None)
            raise ValueError(
                f"this LLaVA model's {per_image} image tokens (image_seq_length, "
                f"vision_feature_select_strategy={strategy!r}) are not a square grid of patches, which the "
                "spatial score and 2D positions need; atp supports the 'default' strategy (patches only, "
                "no CLS token)"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        if self.pixtral():
            return pixtral_layout(input_ids, self.model.config.image_token_id)
        visual = input_ids == self.model.config.image_token_id
        per_image = self.num_visual_tokens()
        side = math.isqrt(per_image)
        grids = []
        for count in visual.sum(dim=1).tolist():
            if count % per_image:
                raise ValueError(
                    f"a sample has {count} image tokens, not a multiple of image_seq_length={per_image}: "
                    f"each <image> must be expanded to {per_image} tokens; build input_ids with the model's "
                    "processor (AutoProcessor), and pass the whole prompt in one forward"
                )
            grids.append([(side, side)] * (count // per_image))
        return VisualLayout(visual, torch.zeros_like(visual), grids)

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """One ``pixel_values`` image per grid, in order (CLIP: one square image per grid)."""
        found = None if self.pixtral() else image_per_grid(inputs.get("pixel_values"), grids)
        return found if found is not None else super().grid_pixels(inputs, grids)


def image_per_grid(pixels, grids: list[list[tuple[int, int]]]):
    """``pixels`` (N, C, H, W) one image per grid in order, or None when the counts disagree."""
    if pixels is None or pixels.dim() != 4 or pixels.shape[0] != sum(len(sample) for sample in grids):
        return None
    images = iter(pixels)
    return [[next(images) for _ in sample] for sample in grids]
