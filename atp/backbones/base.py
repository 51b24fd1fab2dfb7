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
    token_arguments : decoder-layer arguments beyond the hidden states that hold one row per token
        (B, L, ...), as positions in ``args`` or keyword names; drop mode gathers them at the kept
        tokens like the hidden states (e.g. Gemma 4's per-layer input).
    """

    family = ""
    model_types: tuple[str, ...] = ()
    attention_implementations: tuple[str, ...] = ("sdpa",)
    positions = "1d-rope"
    visual_inputs: tuple[str, ...] = ("pixel_values",)
    cache_layers: tuple[str, ...] = ("DynamicLayer",)  # not StaticLayer, sliding-window or quantized layers
    token_arguments: tuple[int | str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    def check(self) -> None:
        """Called by ``attach`` before anything is touched, and again at every prefill (the config
        may change after attach): raise ``ValueError`` (saying what to do instead) for a config
        variant the forward could not lay out."""

    def default_layers(self, paper: list[int]) -> list[int]:
        """The ATP layers ``attach`` uses when none are given, from the paper's scaled to this depth.
        With recurrent layers (Qwen3.5, LFM2-VL) each moves to the nearest layer right after an
        attention layer past the first one (the earlier on a tie): where a scoring policy reads
        queries and keys, and after the layer transformers counts the cache by."""
        kinds = [self.recurrent(i) for i in range(len(self.decoder_layers()))]
        if not any(kinds) or all(kinds):
            return paper  # all alike (attach's checks refuse what cannot work)
        first = kinds.index(False)
        allowed = [i + 1 for i in range(first, len(kinds) - 1) if not kinds[i]]
        if not allowed:
            return paper
        return sorted({min(allowed, key=lambda a: (abs(a - layer), a)) for layer in paper})

    def check_layers(self, layers: tuple[int, ...]) -> None:
        """Called by ``attach`` with the ATP layers before anything is touched: raise ``ValueError``
        (saying which layers work) where the family cannot prune before one of them."""

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

    def kv_layer(self, layer: int) -> int:
        """The decoder layer whose keys and values (and cache entry) layer ``layer`` attends to:
        itself, unless the family shares them across layers (Gemma 4's last layers)."""
        return layer

    def recurrent(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` mixes tokens through a recurrent state (linear attention,
        state space) instead of attention: it has no attention map to score with, takes a 2D keep
        mask (B, L) multiplied into its input, and caches a fixed-size state, not keys. atp runs it
        on the kept tokens only in both modes (docs/backbones.md, Qwen3.5)."""
        return False

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


class ConfigLayerTypes:
    """``layer_type`` / ``sliding_window`` read from the text config's ``layer_types``
    (``sliding_attention`` layers use its ``sliding_window``): Gemma 3, Gemma 4, Aya Vision's Cohere2.
    Mixed in before :class:`BackboneAdapter`."""

    def layer_type(self, layer: int) -> str | None:
        types = getattr(self.text_config(), "layer_types", None)
        return types[layer] if types else None

    def sliding_window(self, layer: int) -> int | None:
        if self.layer_type(layer) != "sliding_attention":
            return None
        return self.text_config().sliding_window


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


def square_tiles(visual: torch.Tensor, side: int) -> list[list[tuple[int, int]]]:
    """Per row of a BoolTensor (B, L) of visual tokens, one ``side x side`` grid per ``side**2`` tokens
    of each run (tiles of a fixed size written back to back or between markers). A run that is not a
    whole number of tiles raises: the prompt was not built by the model's processor."""
    per_tile = side * side
    grids = []
    for sample, spans in enumerate(runs(visual)):
        sample_grids = []
        for start, stop in spans:
            if (stop - start) % per_tile:
                raise ValueError(
                    f"sample {sample} has a run of {stop - start} image tokens, not a multiple of the {per_tile} "
                    f"tokens of a tile ({side} x {side}): build input_ids with the model's processor, and pass "
                    "the whole prompt in one forward"
                )
            sample_grids += [(side, side)] * ((stop - start) // per_tile)
        grids.append(sample_grids)
    return grids
