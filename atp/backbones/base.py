"""The backbone adapter interface: everything atp needs to know about one model family."""

from __future__ import annotations

import torch
from torch import nn


class BackboneAdapter:
    """Knows one VLM family. Subclasses fill in the class attributes and methods below.

    Attributes
    ----------
    family : short name shown to users ("llava").
    model_types : the ``config.model_type`` values the adapter handles.
    attention_implementations : text attention implementations that work.
    positions : how positions are built ("1d-rope", "mrope").
    """

    family = ""
    model_types: tuple[str, ...] = ()
    attention_implementations: tuple[str, ...] = ("sdpa",)
    positions = "1d-rope"
    visual_inputs: tuple[str, ...] = ("pixel_values",)  # forward kwargs that carry images

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    # structure -------------------------------------------------------------------------
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` and calls the language model."""
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def text_config(self):
        return self.model.config.text_config

    def text_config_key(self) -> str:
        """Key of the text sub-config in ``set_attn_implementation`` dicts."""
        return "text_config"

    # visual tokens ---------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor (B, L): positions filled with image (or video) features."""
        raise NotImplementedError

    def num_visual_tokens(self) -> int | None:
        """Visual tokens per sample when the family fixes it (None when it varies)."""
        return None

    def grids(self, visual_counts: list[int]) -> list[list[tuple[int, int]]]:
        """Per sample, the (height, width) token grid of each image in visual order."""
        raise NotImplementedError

    # positions -------------------------------------------------------------------------
    def position_seq_dim(self) -> int:
        """Sequence axis of ``position_ids`` and of the rotary cos / sin tensors."""
        return 1
