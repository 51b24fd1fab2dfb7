"""LLaVA-OneVision: LLaVA-NeXT's tiles and newlines (high-resolution grids may be downsampled
to ``anyres_max_N`` tiles), plus videos: every frame pooled to a ``ceil(s/2) x ceil(s/2)`` grid,
all frames followed by one newline feature (structural, as for images)."""

from __future__ import annotations

import math

from atp.backbones.llava_next import LlavaNextAdapter


class LlavaOneVisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    visual_inputs = ("pixel_values", "pixel_values_videos")

    def run_grids(self, kind: str, is_newline: list[bool]) -> list[tuple[int, int]]:
        if kind == "image":
            return super().run_grids(kind, is_newline)
        side = math.ceil(self.base_side() / 2)
        grids, frames = [], 0  # videos back to back: each is frames of pooled grids, then a newline
        for flag in is_newline:
            if flag:
                grids += [(side, side)] * (frames // (side * side))
                frames = 0
            else:
                frames += 1
        return grids + [(side, side)] * (frames // (side * side))
