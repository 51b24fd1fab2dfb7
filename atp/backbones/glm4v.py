"""GLM-4.1V: Qwen2-VL's patch merging and 3D M-RoPE (on part of each head), and videos written as
images.

Each image is ``<|begin_of_image|>`` + its tokens + ``<|end_of_image|>``; a video is
``<|begin_of_video|>``, then per temporal patch a timestamp and an image block of the *image*
token, then ``<|end_of_video|>``. Only ``mm_token_type_ids`` (1 image, 2 video) tells a video's
frames from images, so atp needs it whenever a video is in the prompt; ``video_grid_thw`` rows
are read one frame per block. All begin / end tokens are structural.
"""

from __future__ import annotations

import torch

from atp.backbones.base import VisualLayout
from atp.backbones.qwen2_vl import Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_types = ("glm4v",)

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        config = self.model.config
        tokens = input_ids == config.image_token_id
        markers = (
            config.image_start_token_id,
            config.image_end_token_id,
            config.video_start_token_id,
            config.video_end_token_id,
        )
        structural = torch.zeros_like(tokens)
        for marker in markers:
            structural |= input_ids == marker
        types = inputs.get("mm_token_type_ids")
        videos = inputs.get("video_grid_thw")
        if videos is not None and types is None:
            raise ValueError(
                "GLM-4.1V writes a video's frames with the image token: atp needs mm_token_type_ids (what the "
                "processor returns) to tell them from images"
            )
        video = tokens & (types == 2) if types is not None else torch.zeros_like(tokens)
        image = tokens & ~video
        merge = config.vision_config.spatial_merge_size
        if inputs.get("image_grid_thw") is not None or videos is not None:
            split = dict(inputs)
            if videos is not None:  # one image block per temporal patch: (t, h, w) -> t rows of (1, h, w)
                frames = torch.repeat_interleave(videos, videos[:, 0], dim=0)
                frames[:, 0] = 1
                split["video_grid_thw"] = frames
            grids = self._grids_from_thw(image, video, split, merge)
        elif (
            positions := language_inputs.get("position_ids", inputs.get("position_ids"))
        ) is not None and positions.dim() == 3:
            grids = self._grids_from_positions(tokens, positions)
        elif bool(tokens.any()):
            raise ValueError(
                "atp needs image_grid_thw / video_grid_thw (or M-RoPE position_ids) to know the grid of "
                "each image; pass what the processor returns"
            )
        else:
            grids = [[] for _ in range(input_ids.shape[0])]
        return VisualLayout(tokens, structural, grids)
