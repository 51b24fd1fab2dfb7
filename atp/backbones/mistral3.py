"""Mistral 3 (Mistral-Small-3.1 vision, ``Mistral3ForConditionalGeneration``): Pixtral patches
merged 2 x 2, one row of image tokens per patch row, rows closed by ``[IMG_BREAK]`` and the last
by ``[IMG_END]``.

The break and end tokens are structural (never pruned, not instruction tokens). An image is a
group of rows separated by single break tokens; the end token is recognised as the separator
that is followed by text, so images placed back to back are told apart. The grid of an image
is (rows, row length).
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, runs


def pixtral_layout(input_ids: torch.Tensor, image_token_id: int) -> VisualLayout:
    """Rows of image tokens closed by break tokens, an image ending with an end token (Pixtral)."""
    visual = input_ids == image_token_id
    structural = torch.zeros_like(visual)
    ids = input_ids.tolist()
    grids = []
    for sample, spans in enumerate(runs(visual)):
        row = ids[sample]
        followers = [row[stop] if stop < len(row) else None for _, stop in spans]
        # an end token is a separator that is followed by text (not by another row)
        end_ids = {
            followers[i]
            for i, (_, stop) in enumerate(spans)
            if followers[i] is not None and (i + 1 == len(spans) or spans[i + 1][0] != stop + 1)
        }
        sample_grids, group = [], []
        for i, (start, stop) in enumerate(spans):
            group.append(stop - start)
            if followers[i] is not None:
                structural[sample, stop] = True
            continues = i + 1 < len(spans) and spans[i + 1][0] == stop + 1 and followers[i] not in end_ids
            if not continues:
                if len(set(group)) != 1:
                    raise ValueError(f"an image's rows have different lengths {group}")
                sample_grids.append((len(group), group[0]))
                group = []
        grids.append(sample_grids)
    return VisualLayout(visual, structural, grids)


class Mistral3Adapter(BackboneAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    positions = "1d-rope"

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        return pixtral_layout(input_ids, self.model.config.image_token_id)
