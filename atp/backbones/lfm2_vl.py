"""LFM2-VL (``Lfm2VlForConditionalGeneration``): SigLIP2 NaFlex crops of any shape after pixel
unshuffle, in an LFM2 language model that mixes attention with gated short convolutions.

The processor writes an image as ``<|image_start|>``, then for a tiled image a
``<|img_row_r_col_c|>`` marker and the tokens of each tile and ``<|img_thumbnail|>`` and the tokens
of the thumbnail, then ``<|image_end|>`` (a small image is one crop). The markers are text (their
ids are the tokenizer's, not the config's), as Idefics3's are. A crop of ``h x w`` patches
(``spatial_shapes``, one row per crop in ``pixel_values`` order: the tiles, then the thumbnail) gives
an ``(h / f) x (w / f)`` grid of tokens, ``f = downsample_factor``, not necessarily square; atp reads
the grids from ``spatial_shapes``, so the prefill needs it (what the processor returns).

LFM2's ``conv`` layers are recurrent for atp (``recurrent``): a causal depthwise convolution over
the last ``conv_L_cache`` tokens, with its state in the cache instead of keys, and no attention map.
They run on the kept tokens only in both modes, as Qwen3.5's linear-attention layers do
(docs/backbones.md): the scoring layer before an ATP layer must be an attention layer, and every
ATP layer after layer 0 comes after the first attention layer (transformers counts the cache by it).
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, VisualLayout, runs
from atp.host import recurrent

ATTENTION, CONV = "full_attention", "conv"


class Lfm2VlAdapter(BackboneAdapter):
    family = "lfm2_vl"
    model_types = ("lfm2_vl",)
    positions = "1d-rope"
    cache_layers = ("DynamicLayer", "LinearAttentionLayer")

    def __init__(self, model):
        super().__init__(model)
        self.seen_shapes: torch.Tensor | None = None  # the crop shapes the vision tower last saw

    def install(self, runtime) -> list:
        """The convolution layers' mask-mode hooks (they run on the kept tokens only), and a hook that
        remembers the crop shapes the vision tower sees: ``generate`` encodes the images before the
        prefill and passes the language model neither pixels nor ``spatial_shapes``."""

        def remember(module, args, kwargs):
            self.seen_shapes = kwargs.get("spatial_shapes", args[1] if len(args) > 1 else None)

        tower = self.vision_tower()
        seen = [tower.register_forward_pre_hook(remember, with_kwargs=True)] if tower is not None else []
        return [*seen, *recurrent.install(runtime)]

    def layer_types(self) -> list[str]:
        return list(self.text_config().layer_types)

    def layer_type(self, layer: int) -> str | None:
        return self.layer_types()[layer]

    def recurrent(self, layer: int) -> bool:
        return self.layer_types()[layer] == CONV

    def uses_sliding_window(self) -> bool:
        return False  # attention and convolution layers only (checked)

    def check(self) -> None:
        unknown = sorted(set(self.layer_types()) - {ATTENTION, CONV})
        if unknown:
            raise ValueError(
                f"this LFM2-VL model has layer types {unknown}; atp follows full_attention and conv layers only"
            )

    def check_layers(self, layers: tuple[int, ...]) -> None:
        types = self.layer_types()
        first = types.index(ATTENTION) if ATTENTION in types else len(types)
        early = [layer for layer in layers if 0 < layer <= first]
        if early:
            after = [i + 1 for i, kind in enumerate(types[:-1]) if kind == ATTENTION]
            raise ValueError(
                f"ATP layer(s) {early} come at or before layer {first}, the first attention layer of this LFM2-VL "
                "model: transformers counts the KV cache by that layer, so it must see every token. Put ATP "
                f"layers after it (right after an attention layer for a policy that scores: "
                f"{', '.join(map(str, after[:6]))}, ...)"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        visual = input_ids == self.model.config.image_token_id
        shapes = inputs.get("spatial_shapes")
        shapes = self.seen_shapes if shapes is None else shapes
        if shapes is None:
            if bool(visual.any()):
                raise ValueError(
                    "atp needs spatial_shapes (what the processor returns) to know the grid of each crop"
                )
            return VisualLayout(visual, torch.zeros_like(visual), [[] for _ in range(input_ids.shape[0])])
        factor = self.model.config.downsample_factor
        queue = [(int(h) // factor, int(w) // factor) for h, w in shapes.tolist()]
        grids = []
        for sample, spans in enumerate(runs(visual)):
            sample_grids = []
            for start, stop in spans:
                remaining = stop - start
                while remaining > 0:
                    if not queue:
                        raise ValueError(
                            f"sample {sample} has more image tokens than spatial_shapes describes"
                        )
                    grid = queue.pop(0)
                    sample_grids.append(grid)
                    remaining -= grid[0] * grid[1]
                if remaining < 0:
                    raise ValueError(f"sample {sample}: spatial_shapes does not match its image tokens")
            grids.append(sample_grids)
        return VisualLayout(visual, torch.zeros_like(visual), grids)
