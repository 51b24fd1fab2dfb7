"""LLaVA-NeXT-Video: LLaVA-NeXT's images (tiles and row newlines), plus videos: every frame's
patch grid pooled by ``spatial_pool_stride`` (a ``side // stride`` square per frame), frames back
to back with no newline or separator."""

from __future__ import annotations

from atp.backbones.llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    visual_inputs = ("pixel_values", "pixel_values_videos")

    def run_grids(self, kind: str, is_newline: list[bool]) -> list[tuple[int, int]]:
        if kind == "image":
            return super().run_grids(kind, is_newline)
        side = self.base_side() // int(self.model.config.spatial_pool_stride)
        if len(is_newline) % (side * side):
            raise ValueError(
                f"a run of {len(is_newline)} video tokens is not a whole number of {side} x {side} frames "
                f"(spatial_pool_stride={self.model.config.spatial_pool_stride}): build input_ids with the "
                "model's processor"
            )
        return [(side, side)] * (len(is_newline) // (side * side))
