"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, several images, video, M-RoPE positions.

Each image (or video) sits between ``<|vision_start|>`` and ``<|vision_end|>`` and gives
``t * h * w / merge**2`` tokens: ``t`` frames of an ``(h / merge) x (w / merge)`` grid. The
markers are structural (never pruned, not instruction tokens). Kept tokens keep their
original (t, h, w) M-RoPE positions: the rotary cos / sin are gathered like 1D ones, and the
decoding positions (``rope_deltas``) stay right because ATP layers never prune layer 0's cache.
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, runs


class Qwen2VLAdapter(BackboneAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    positions = "mrope"
    visual_inputs = ("pixel_values", "pixel_values_videos")

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        config = self.model.config
        image = input_ids == config.image_token_id
        video = input_ids == config.video_token_id
        structural = (input_ids == config.vision_start_token_id) | (input_ids == config.vision_end_token_id)
        merge = config.vision_config.spatial_merge_size
        if inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None:
            grids = self._grids_from_thw(image, video, inputs, merge)
        elif (
            positions := language_inputs.get("position_ids", inputs.get("position_ids"))
        ) is not None and positions.dim() == 3:
            grids = self._grids_from_positions(image | video, positions)
        elif bool((image | video).any()):
            raise ValueError(
                "atp needs image_grid_thw / video_grid_thw (or M-RoPE position_ids) to know the grid of "
                "each image; pass what the processor returns"
            )
        else:
            grids = [[] for _ in range(input_ids.shape[0])]
        return VisualLayout(image | video, structural, grids)

    @staticmethod
    def _grids_from_thw(image, video, inputs, merge: int) -> list[list[tuple[int, int]]]:
        queues = {
            "image": [
                tuple(int(v) for v in row)
                for row in (inputs.get("image_grid_thw") if inputs.get("image_grid_thw") is not None else [])
            ],
            "video": [
                tuple(int(v) for v in row)
                for row in (inputs.get("video_grid_thw") if inputs.get("video_grid_thw") is not None else [])
            ],
        }
        grids = []
        for sample, (image_runs, video_runs) in enumerate(zip(runs(image), runs(video))):
            spans = sorted(
                [(start, stop, "image") for start, stop in image_runs]
                + [(start, stop, "video") for start, stop in video_runs]
            )
            sample_grids = []
            for start, stop, kind in spans:
                remaining = stop - start
                while remaining > 0:
                    if not queues[kind]:
                        raise ValueError(
                            f"sample {sample} has more {kind} tokens than {kind}_grid_thw describes"
                        )
                    t, h, w = queues[kind].pop(0)
                    frame = (h // merge, w // merge)
                    sample_grids += [frame] * t
                    remaining -= t * frame[0] * frame[1]
                if remaining < 0:
                    raise ValueError(f"sample {sample}: {kind}_grid_thw does not match its {kind} tokens")
            grids.append(sample_grids)
        return grids

    @staticmethod
    def _grids_from_positions(visual, position_ids) -> list[list[tuple[int, int]]]:
        rows, cols = position_ids[-2], position_ids[-1]  # (B, L) height and width positions
        grids = []
        for sample, spans in enumerate(runs(visual)):
            sample_grids = []
            for start, stop in spans:
                h = rows[sample, start:stop]
                w = cols[sample, start:stop]
                height, width = int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1
                frames = (stop - start) // (height * width)
                sample_grids += [(height, width)] * max(frames, 1)
            grids.append(sample_grids)
        return grids

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """Images only (no video): each grid's patches of ``pixel_values`` put back in place (the
        processor flattens each image as (h / m, w / m, m, m) patches of (C, T, P, P) pixels)."""
        out = super().grid_pixels(inputs, grids)
        pixels, thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is None or thw is None or inputs.get("video_grid_thw") is not None:
            return out
        vision = self.model.config.vision_config
        merge, patch = vision.spatial_merge_size, vision.patch_size
        temporal = getattr(vision, "temporal_patch_size", 2)
        flat = [
            (sample, index) for sample, sample_grids in enumerate(grids) for index in range(len(sample_grids))
        ]
        if len(flat) != thw.shape[0] or any(int(t) != 1 for t in thw[:, 0]):
            return out
        start = 0
        for (sample, index), (_, h, w) in zip(flat, thw.tolist()):
            count = h * w
            block = pixels[start : start + count].reshape(
                h // merge, w // merge, merge, merge, -1, temporal, patch, patch
            )
            start += count
            image = block[..., 0, :, :].permute(4, 0, 2, 5, 1, 3, 6)  # (C, h/m, m, P, w/m, m, P)
            out[sample][index] = image.reshape(block.shape[4], h * patch, w * patch)
        return out


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
