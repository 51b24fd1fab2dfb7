"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP patches as one square grid per image."""

from __future__ import annotations

import math

import torch

from atp.backbones.base import BackboneAdapter


class LlavaAdapter(BackboneAdapter):
    """Each ``<image>`` placeholder expands to ``image_seq_length`` tokens (576 = 24 x 24 for
    CLIP ViT-L/14 at 336 px); several images in one prompt are several consecutive grids."""

    family = "llava"
    model_types = ("llava",)
    attention_implementations = ("sdpa",)
    positions = "1d-rope"

    def multimodal_model(self):
        inner = getattr(self.model, "model", None)
        return inner if inner is not None and hasattr(inner, "language_model") else self.model

    def language_model(self):
        return self.multimodal_model().language_model

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.model.config.image_token_id

    def num_visual_tokens(self) -> int | None:
        return int(self.model.config.image_seq_length)

    def grids(self, visual_counts: list[int]) -> list[list[tuple[int, int]]]:
        per_image = self.num_visual_tokens()
        side = math.isqrt(per_image)
        if side * side != per_image:
            raise ValueError(f"LLaVA image_seq_length {per_image} is not a square grid")
        out = []
        for count in visual_counts:
            if count % per_image:
                raise ValueError(
                    f"a sample has {count} image tokens, not a multiple of image_seq_length={per_image}"
                )
            out.append([(side, side)] * (count // per_image))
        return out
