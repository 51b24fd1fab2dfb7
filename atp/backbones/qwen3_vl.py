"""Qwen3-VL (dense and MoE): Qwen2-VL's layout, interleaved M-RoPE, per-frame video blocks and
DeepStack.

A video is one ``<|vision_start|> ... <|vision_end|>`` block per temporal patch of frames, each
after its timestamp text, so ``video_grid_thw`` rows are split per frame before they are read.

DeepStack adds features of intermediate vision layers to the visual tokens' hidden states after
each of the first LM layers (``_deepstack_process(hidden, visual_pos_masks, features)``, one
feature row per visual token in sequence order). After an ATP layer has dropped tokens the
hidden states are shorter than ``visual_pos_masks``: the adapter wraps the method so that the
features of the kept visual tokens, and only those, are added at their compacted places.
"""

from __future__ import annotations

import torch

from atp.backbones.qwen2_vl import Qwen2VLAdapter
from atp.core.layout import gather_seq


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def visual_layout(self, input_ids, inputs, language_inputs):
        thw = inputs.get("video_grid_thw")
        if thw is not None:  # one block per temporal patch: (t, h, w) -> t rows of (1, h, w)
            frames = torch.repeat_interleave(thw, thw[:, 0], dim=0)
            frames[:, 0] = 1
            inputs = {**inputs, "video_grid_thw": frames}
        return super().visual_layout(input_ids, inputs, language_inputs)

    def install(self, runtime) -> list:
        language = self.language_model()
        if not callable(getattr(type(language), "_deepstack_process", None)):
            return []  # a release without DeepStack in the language model: nothing to follow
        return [KeptDeepstack(language, runtime)]


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)

    def check(self) -> None:
        if getattr(self.text_config(), "output_router_logits", False):
            raise ValueError(
                "this Qwen3-VL MoE model returns router logits (output_router_logits=True): transformers' "
                "load-balancing loss reads one attention mask for every layer, which pruned layers do not "
                "match; set model.config.text_config.output_router_logits = False to attach atp"
            )

    def check_call(self, kwargs: dict) -> None:
        if kwargs.get("output_router_logits"):
            raise ValueError(
                "output_router_logits=True is not supported with atp on this Qwen3-VL MoE model: transformers' "
                "load-balancing loss reads one attention mask for every layer, which pruned layers do not "
                "match; call the model without output_router_logits"
            )


class KeptDeepstack:
    """``language_model._deepstack_process`` while atp is attached: after a drop-mode ATP layer,
    the features of the kept visual tokens only, added where those tokens now are.

    An object in the module's ``__dict__`` (not a closure): a copy of the model gets its own,
    bound to the copy's runtime. ``remove()`` restores the class's method.
    """

    def __init__(self, module, runtime):
        self.module = module
        self.runtime = runtime
        module.__dict__["_deepstack_process"] = self

    def __call__(self, hidden_states, visual_pos_masks, visual_embeds):
        original = type(self.module)._deepstack_process
        p = self.runtime.prefill
        if p is None or p.layout is None:  # nothing dropped yet (or mask mode): the sequence is whole
            return original(self.module, hidden_states, visual_pos_masks, visual_embeds)
        layout = p.layout  # kept positions of the full sequence, in order, fillers invalid
        if tuple(visual_pos_masks.shape) != (p.visual_valid.shape[0], p.length):
            raise ValueError(
                f"DeepStack's visual mask {tuple(visual_pos_masks.shape)} does not match the prefill atp "
                f"pruned (batch {p.visual_valid.shape[0]}, length {p.length})"
            )
        kept = torch.zeros_like(visual_pos_masks)
        rows = torch.arange(kept.shape[0], device=kept.device)[:, None].expand_as(layout.index)
        kept[rows[layout.valid], layout.index[layout.valid]] = True
        survivors = kept[visual_pos_masks]  # one per feature row, in the same (sample, position) order
        compact = gather_seq(visual_pos_masks, layout.index) & layout.valid
        return original(self.module, hidden_states, compact, visual_embeds[survivors])

    def remove(self) -> None:
        if self.module.__dict__.get("_deepstack_process") is self:
            del self.module.__dict__["_deepstack_process"]
