"""The backbone adapter interface: everything atp needs to know about one model family."""

from __future__ import annotations

import torch
from torch import nn

from atp.core.state import VisualLayout  # the layout an adapter reads: the core's input


class BackboneAdapter:
    """Knows one VLM family. Subclasses fill in the class attributes and methods below.

    Attributes
    ----------
    family : short name shown to users ("llava").
    model_types : the ``config.model_type`` values the adapter handles.
    attention_implementations : text attention implementations that work.
    positions : how positions are built ("1d-rope", "mrope").
    visual_inputs : forward kwargs that carry images / videos (refused after the prefill).
    cache_layers : the transformers cache layer classes (by name) the family works with.
    """

    family = ""
    model_types: tuple[str, ...] = ()
    attention_implementations: tuple[str, ...] = ("sdpa",)
    positions = "1d-rope"
    visual_inputs: tuple[str, ...] = ("pixel_values",)
    cache_layers: tuple[str, ...] = ("DynamicLayer",)  # not StaticLayer, sliding-window or quantized layers

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    def check(self) -> None:
        """Called by ``attach`` before anything is touched, and again at every prefill (the config
        may change after attach): raise ``ValueError`` (saying what to do instead) for a config
        variant the forward could not lay out."""

    def check_call(self, kwargs: dict) -> None:
        """Called at every prefill with the multimodal model's keyword arguments: raise
        ``ValueError`` for a per-call option the pruned forward cannot serve."""

    # structure -------------------------------------------------------------------------
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` and calls the language model."""
        inner = getattr(self.model, "model", None)
        return inner if inner is not None and hasattr(inner, "language_model") else self.model

    def language_model(self) -> nn.Module:
        return self.multimodal_model().language_model

    def vision_tower(self) -> nn.Module | None:
        """The image encoder (its input pixels are kept for scorers that look at the image)."""
        return getattr(self.multimodal_model(), "vision_tower", None)

    def rotary_embedding(self) -> nn.Module:
        """The language model's rotary embedding module (positions -> cos, sin)."""
        return self.language_model().rotary_emb

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def text_config(self):
        return self.model.config.text_config

    def text_config_key(self) -> str:
        """Key of the text sub-config in ``set_attn_implementation`` dicts."""
        return "text_config"

    def uses_sliding_window(self) -> bool:
        text = self.text_config()
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            return True
        return (
            bool(getattr(text, "sliding_window", None))
            and getattr(text, "use_sliding_window", True) is not False
        )

    def layer_type(self, layer: int) -> str | None:
        """The attention type of decoder layer ``layer`` when layers differ (each type gets its own
        mask and rotary cos / sin, e.g. Gemma 3's sliding and full layers); None when all are alike."""
        return None

    def sliding_window(self, layer: int) -> int | None:
        """The window (in tokens, the query included) of a sliding-window layer atp follows, else None."""
        return None

    def install(self, runtime) -> list:
        """Called when atp attaches, after its hooks: anything the family needs beyond them (e.g.
        a wrapped language-model method). Returns objects with ``remove()``, called on detach."""
        return []

    # visual tokens ---------------------------------------------------------------------
    def num_visual_tokens(self) -> int | None:
        """Visual tokens per sample when the family fixes it (None when it varies)."""
        return None

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        """The visual tokens of a prefill.

        ``inputs`` are the multimodal model's forward kwargs (``input_ids``, ``pixel_values``,
        ``image_sizes``, grids ...); ``language_inputs`` the language model's (``inputs_embeds``
        with the image features in place, ``position_ids``).
        """
        raise NotImplementedError

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """Per sample, per grid of :meth:`visual_layout`: the normalised pixels (C, H, W) the grid's
        tokens cover, as the model saw them (``H / height == W / width`` pixels per token), or None
        where the family cannot say. ``atp visualize`` draws on them; the default knows none."""
        return [[None] * len(sample) for sample in grids]

    # positions -------------------------------------------------------------------------
    def position_seq_dim(self) -> int:
        """Sequence axis of ``position_ids`` and of the rotary cos / sin tensors."""
        return 1


def runs(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of a BoolTensor (B, L), the (start, stop) of each run of True values."""
    out = []
    for row in mask.tolist():
        spans, start = [], None
        for index, value in enumerate(row + [False]):
            if value and start is None:
                start = index
            elif not value and start is not None:
                spans.append((start, index))
                start = None
        out.append(spans)
    return out
