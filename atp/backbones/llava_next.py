"""LLaVA-NeXT (LLaVA-1.6): any-resolution tiles with a newline feature after every row.

Each ``<image>`` expands to the base image (an ``s x s`` grid, s = image_size / patch_size)
followed by the unpadded high-resolution grid, ``H`` rows of ``W`` tokens, each row closed by
the learned ``image_newline`` feature (a single trailing newline when the image is not tiled).

**Newline tokens are structural**: they are recognised by their embedding (the
``image_newline`` vector the model scatters into the prompt), are never pruned and are not
instruction tokens. They keep the row structure the language model was trained on, and they
cost one token per row. The base image and the high-resolution grid are two grids for the
spatial score.
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, runs
from atp.host import compat


def newline_positions(language_inputs: dict, tokens: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, L): positions of ``tokens`` whose input embedding is the ``newline`` vector.

    The model scatters the newline in the dtype its image features had, which is lower than the
    embedding's under autocast, so the vector is also matched after a bf16 / fp16 round trip.
    """
    embeds = language_inputs.get("inputs_embeds")
    if embeds is None:
        raise ValueError("atp needs the language model's inputs_embeds to find the image newline features")
    found = torch.zeros_like(tokens)
    for dtype in {embeds.dtype, torch.bfloat16, torch.float16}:
        candidate = newline.detach().to(dtype).to(embeds.dtype)
        found |= (embeds == candidate).all(dim=-1)
    return tokens & found


def tiled_grids(is_newline: list[bool], side: int) -> list[tuple[int, int]]:
    """Grids of a run of image tokens holding one or more images back to back.

    Each image is its base ``side x side`` grid, then either one newline (not tiled) or rows of
    equal length each closed by a newline; a row that does not follow the pattern starts the
    next image.
    """
    grids, position, total = [], 0, len(is_newline)
    while position < total:
        base = side * side
        if position + base > total or any(is_newline[position : position + base]):
            raise ValueError("an image's tokens do not start with its base grid; is the layout LLaVA-NeXT's?")
        grids.append((side, side))
        position += base
        if position < total and is_newline[position]:
            # not tiled (one trailing newline), or a high-resolution grid unpadded to no column (a
            # very tall image): newlines only, as many as its rows, and no visual token
            while position < total and is_newline[position]:
                position += 1
            continue
        following = [k for k in range(position, total) if is_newline[k]]
        if not following:
            continue  # no newline feature (a model without image_newline): the base grid only
        width, rows = following[0] - position, 0
        while (
            position + width < total
            and is_newline[position + width]
            and not any(is_newline[position : position + width])
        ):
            rows += 1
            position += width + 1
        grids.append((rows, width))
    return grids


class LlavaNextAdapter(BackboneAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    positions = "1d-rope"
    visual_inputs = ("pixel_values",)

    def check(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        tower = getattr(self.model.config.vision_config, "model_type", "")
        if strategy == "full" and tower == "clip_vision_model":  # SigLIP towers have no CLS token
            raise ValueError(
                f"vision_feature_select_strategy='full' with a CLIP tower: this {self.family} model's image "
                "features keep the CLS token, so its tiles are not grids of patches; atp supports the "
                "'default' strategy with CLIP ('full' with SigLIP towers, which have no CLS token)"
            )

    def base_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def token_ids(self) -> dict[str, int]:
        """Placeholder token id of each kind of visual input (videos where the family takes them)."""
        config = self.model.config
        ids = {"image": config.image_token_id}
        if "pixel_values_videos" in self.visual_inputs:
            ids["video"] = config.video_token_id
        return ids

    def run_grids(self, kind: str, is_newline: list[bool]) -> list[tuple[int, int]]:
        """The grids of one run of placeholder tokens (``is_newline`` per token)."""
        return tiled_grids(is_newline, self.base_side())

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        kinds = {kind: input_ids == token for kind, token in self.token_ids().items()}
        tokens = torch.stack(list(kinds.values())).any(dim=0)
        structural = newline_positions(language_inputs, tokens, self.multimodal_model().image_newline)
        flags = structural.tolist()
        spans = {kind: runs(mask) for kind, mask in kinds.items()}
        grids = []
        for sample in range(input_ids.shape[0]):
            ordered = sorted((start, stop, kind) for kind in kinds for start, stop in spans[kind][sample])
            grids.append(
                [
                    grid
                    for start, stop, kind in ordered
                    for grid in self.run_grids(kind, flags[sample][start:stop])
                ]
            )
        if type(self) is LlavaNextAdapter and inputs.get("image_sizes") is not None:
            self.check_grids(grids, inputs["image_sizes"])
        return VisualLayout(tokens & ~structural, structural, grids)

    def check_grids(self, grids: list[list[tuple[int, int]]], sizes: torch.Tensor) -> None:
        """The grids read from the newline pattern must be the ones transformers lays out for the
        images' sizes (its own ``get_anyres_image_grid_shape`` and ``unpad_image``): a pattern can
        be read two ways when a grid is unpadded to nothing, and a wrong reading would be silent."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        config, side = self.model.config, self.base_side()
        tile = config.vision_config.image_size
        expected = []
        for size in sizes.tolist():
            rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
            height, width = unpad_image(torch.empty(1, rows * side, cols * side), size).shape[1:]
            expected += [(side, side)] + ([(height, width)] if height * width else [])
        read = [tuple(grid) for sample in grids for grid in sample if grid[0] * grid[1]]
        if read != expected:
            raise compat.CompatibilityError(
                f"atp read the image grids {read} from the prompt, but transformers lays out {expected} for "
                f"image_sizes {sizes.tolist()}"
            )

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """Per image: the base grid covers ``pixel_values[i, 0]``; the high-resolution grid covers
        the tiles ``pixel_values[i, 1:]`` laid out as the model lays out their features, cropped
        where the model unpads them (transformers' own ``unpad_image`` on a map of token indices)."""
        pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
        out = super().grid_pixels(inputs, grids)
        if pixels is None or sizes is None or pixels.dim() != 5 or set(self.token_ids()) != {"image"}:
            return out
        try:
            from transformers.models.llava_next.modeling_llava_next import (
                get_anyres_image_grid_shape,
                unpad_image,
            )
        except ImportError:
            return out
        side, image = self.base_side(), 0
        config = self.model.config
        for sample, sample_grids in enumerate(grids):
            position = 0
            while position < len(sample_grids) and image < pixels.shape[0]:
                out[sample][position] = pixels[image, 0]
                position += 1
                tile = config.vision_config.image_size
                size = [int(v) for v in sizes[image]]
                rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
                if position < len(sample_grids) and rows * cols >= 1 and 1 + rows * cols <= pixels.shape[1]:
                    tiles = pixels[image, 1 : 1 + rows * cols]  # (rows * cols, C, P, P) row-major
                    canvas = tiles.view(rows, cols, *tiles.shape[1:]).permute(2, 0, 3, 1, 4)
                    canvas = canvas.flatten(3, 4).flatten(1, 2)  # (C, rows * P, cols * P)
                    index = torch.arange(rows * side * cols * side).view(1, rows * side, cols * side)
                    kept = unpad_image(index, size)[0]  # the canvas tokens the model keeps
                    height, width = kept.shape
                    if (height, width) == tuple(sample_grids[position]):
                        top, left = divmod(int(kept[0, 0]), cols * side)
                        per = tile // side  # pixels per token
                        out[sample][position] = canvas[
                            :, top * per : (top + height) * per, left * per : (left + width) * per
                        ]
                        position += 1
                image += 1
        return out
