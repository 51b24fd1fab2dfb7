"""Idefics3 and SmolVLM: image splitting into square tiles plus a global image, pixel shuffle.

The processor writes each tile as ``<fake_token_around_image><row_i_col_j>`` + ``N`` image tokens
(the global image: ``<global-img>`` instead of the row / column marker), so every run of image
tokens is one tile: a row-major ``sqrt(N) x sqrt(N)`` grid after the connector's pixel shuffle
(N = 169 for Idefics3-8B, 64 for SmolVLM-256M / 500M, 81 for the 2.2B). The marker tokens' ids are
the tokenizer's, not the config's: they stay text (never pruned, never counted as visual).
The language model is a plain ``text_model`` (Llama), the vision tower ``vision_model``.
"""

from __future__ import annotations

import math

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, square_tiles


class Idefics3Adapter(BackboneAdapter):
    family = "idefics3"
    model_types = ("idefics3",)

    def multimodal_model(self):
        return self.model.model

    def language_model(self):
        return self.multimodal_model().text_model

    def vision_tower(self):
        return self.multimodal_model().vision_model

    def tile_tokens(self) -> int:
        return int(self.multimodal_model().image_seq_len)

    def check(self) -> None:
        tokens = self.tile_tokens()
        if math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"this {self.family} model's {tokens} tokens per tile are not a square grid")

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        visual = input_ids == self.model.config.image_token_id
        grids = square_tiles(visual, math.isqrt(self.tile_tokens()))
        return VisualLayout(visual, torch.zeros_like(visual), grids)

    def grid_pixels(self, inputs: dict, grids):
        """Tile i of the non-padding tiles of ``pixel_values`` (B, tiles, C, H, W) is grid i."""
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.dim() != 5:
            return super().grid_pixels(inputs, grids)
        flat = pixels.flatten(0, 1)
        real = flat[(flat != 0).flatten(1).any(1)]  # all-zero tiles pad the batch
        if real.shape[0] != sum(len(sample) for sample in grids):
            return super().grid_pixels(inputs, grids)
        tiles = iter(real)
        return [[next(tiles) for _ in sample] for sample in grids]


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
