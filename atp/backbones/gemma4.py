"""Gemma 4: Gemma 3's sliding and full layers, plus per-layer inputs and keys shared across layers.

Each image is ``<boi>`` + its soft tokens + ``<eoi>``. The processor cuts an image into patches (up
to a fixed budget, padded with (-1, -1) positions) and the vision tower pools k x k patches into one
token: an image of ``rows x cols`` patches gives a ``rows / k x cols / k`` grid, not necessarily
square, read from ``image_position_ids`` (``generate`` encodes the images before the prefill and
passes no positions, so the adapter also reads them from the vision tower's input).

The language model interleaves sliding-window and full layers with a mask and a rotary (different
head widths) per layer type, as Gemma 3; sliding layers attend both ways inside an image, full
layers stay causal: the masks transformers built are gathered at the kept tokens, as for Gemma 3.

* **Per-layer inputs.** Decoder layer i receives a (B, L, d) slice of a per-token tensor as its
  second positional argument; in drop mode it is gathered at the kept tokens with the hidden states
  (``token_arguments``).
* **KV sharing.** The last ``num_kv_shared_layers`` layers compute no keys or values: they attend to
  those the last unshared layer of their type wrote (their cache entry is empty). atp keeps a
  sharing group in one segment: no ATP layer may sit after a layer whose keys are shared and before
  (or at) a layer reading them (:meth:`check_layers`), so readers and writer hold the same kept
  tokens, and a reader's masks, decode keys and cache checks are those of its writer (``kv_layer``).
* **Generate's prefill** (transformers >= 5.24) hands the shared layers the last token only
  (``_maybe_slice_kv_shared_inputs``); atp gives them the last query row of its masks and positions.
"""

from __future__ import annotations

import torch

from atp.backbones.base import BackboneAdapter, ConfigLayerTypes, VisualLayout, runs


class Gemma4Adapter(ConfigLayerTypes, BackboneAdapter):
    family = "gemma4"
    model_types = ("gemma4",)
    positions = "1d-rope-per-layer-type"  # a rotary per layer type: positions='keep' only
    visual_inputs = ("pixel_values", "pixel_values_videos", "input_features")
    # a KV-shared layer's cache entry is a DummyLayer (transformers >= 5.24; none before)
    cache_layers = ("DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer")
    token_arguments = (1, "per_layer_input")

    def __init__(self, model):
        super().__init__(model)
        self.seen_positions: torch.Tensor | None = None  # the patch positions the vision tower last saw

    def uses_sliding_window(self) -> bool:
        return False  # followed: masks per layer type, windows in original positions (as Gemma 3)

    # KV sharing ------------------------------------------------------------------------
    def shared_from(self) -> dict[int, int]:
        """Reading layer -> the layer whose keys and values it reads."""
        first = self._first_shared()
        return {layer: self.kv_layer(layer) for layer in range(first, len(self.text_config().layer_types))}

    def kv_layer(self, layer: int) -> int:
        """transformers' rule: a layer from the first shared one on reads the last unshared layer of
        its type."""
        first, types = self._first_shared(), self.text_config().layer_types
        return layer if layer < first else max(j for j in range(first) if types[j] == types[layer])

    def _first_shared(self) -> int:
        text = self.text_config()
        return len(text.layer_types) - int(getattr(text, "num_kv_shared_layers", 0) or 0)

    def check(self) -> None:
        text = self.text_config()
        shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
        types = text.layer_types
        if shared and not set(types[len(types) - shared :]) <= set(types[: len(types) - shared]):
            raise ValueError(
                f"this Gemma 4 model shares keys and values in {shared} of {len(types)} layers, leaving a layer "
                "type without a layer that computes them; atp cannot follow it"
            )
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise ValueError(
                "this Gemma 4 model attends both ways over the whole text (use_bidirectional_attention='all'); "
                "atp follows causal language models (the default, or 'vision')"
            )

    def default_layers(self, paper: list[int]) -> list[int]:
        """The paper's layers (scaled to this depth) scaled again into the layers before the first
        writer of shared keys, so that no sharing group is split (:meth:`check_layers`)."""
        readers = self.shared_from()
        if not readers:
            return paper
        last, total = min(readers.values()), len(self.decoder_layers())
        return sorted({min(last, max(1, round(layer * (last + 1) / total))) for layer in paper})

    def check_layers(self, layers: tuple[int, ...]) -> None:
        """An ATP layer after a layer whose keys are shared and at or before a layer reading them
        would give the reader more keys than queries' masks cover (drop) and split the group."""
        readers = self.shared_from()
        split = sorted({a for a in layers for j, s in readers.items() if s < a <= j})
        if split:
            last = min(readers.values())
            total = len(self.decoder_layers())
            suggested = self.default_layers([max(1, round(layer * total / 32)) for layer in (4, 14, 24)])
            raise ValueError(
                f"ATP layer(s) {split} fall inside Gemma 4's key / value sharing: layers {min(readers)}.."
                f"{max(readers)} attend to the keys of layers {sorted(set(readers.values()))}, and atp keeps each "
                f"such group in one pruned segment. Put every ATP layer at or before layer {last} "
                f"(e.g. layers={suggested})"
            )

    # visual tokens ---------------------------------------------------------------------
    def install(self, runtime) -> list:
        tower = self.vision_tower()
        if tower is None:
            return []

        def remember(module, args, kwargs):
            self.seen_positions = args[1] if len(args) > 1 else kwargs.get("pixel_position_ids")

        return [tower.register_forward_pre_hook(remember, with_kwargs=True)]

    def check_call(self, kwargs: dict) -> None:
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("input_features") is not None:
            raise ValueError(
                "atp prunes Gemma 4's image tokens; videos and audio are not followed yet: pass images only"
            )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict, language_inputs: dict) -> VisualLayout:
        config = self.model.config
        others = (input_ids == config.video_token_id) | (input_ids == config.audio_token_id)
        if bool(others.any()):
            raise ValueError(
                "the prompt has Gemma 4 video or audio placeholder tokens; atp prunes image tokens only: "
                "pass images only"
            )
        visual = input_ids == config.image_token_id
        structural = (input_ids == config.boi_token_id) | (input_ids == config.eoi_token_id)
        spans = runs(visual)
        grids = []
        if any(spans):
            shapes = iter(self.image_grids(inputs))
            for sample, row in enumerate(spans):
                grids.append([])
                for start, stop in row:
                    grid = next(shapes, None)
                    if grid is None or grid[0] * grid[1] != stop - start:
                        raise ValueError(
                            f"sample {sample}: an image of {stop - start} tokens does not match the next image's "
                            f"patch grid {grid} (image_position_ids); build the inputs with the model's processor "
                            "and pass the whole prompt in one forward"
                        )
                    grids[-1].append(grid)
        else:
            grids = [[] for _ in spans]
        return VisualLayout(visual, structural, grids)

    def grid_pixels(
        self, inputs: dict, grids: list[list[tuple[int, int]]]
    ) -> list[list[torch.Tensor | None]]:
        """Each image put back together from its patches (``pixel_values`` rows of ``p * p * 3``, at their
        (x, y) positions), as the processor made them, in grid order."""
        pixels, positions = inputs.get("pixel_values"), inputs.get("image_position_ids")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3 or positions is None:
            return super().grid_pixels(inputs, grids)
        side = int(self.model.config.vision_config.patch_size)
        token = side * int(self.model.config.vision_config.pooling_kernel_size)
        shapes = [grid for sample in grids for grid in sample]
        images = []
        for patches, where, (height, width) in zip(pixels, positions, shapes):
            real = (where >= 0).all(dim=-1)
            blocks = patches[real].float().reshape(-1, side, side, 3).permute(0, 3, 1, 2)  # (n, C, p, p)
            image = torch.zeros(3, height * token, width * token)
            for block, (x, y) in zip(blocks, where[real].tolist()):
                image[:, y * side : (y + 1) * side, x * side : (x + 1) * side] = block
            images.append(image)
        found = iter(images)
        return [[next(found, None) for _ in sample] for sample in grids]

    def image_grids(self, inputs: dict) -> list[tuple[int, int]]:
        """The (rows, columns) token grid of each image, in order: its patch positions' extent over the
        pooling kernel (padding patches are (-1, -1))."""
        positions, seen, self.seen_positions = inputs.get("image_position_ids"), self.seen_positions, None
        positions = seen if positions is None else positions  # read once: never an earlier prompt's
        if positions is None:
            raise ValueError(
                "atp reads each Gemma 4 image's token grid from image_position_ids, and none reached the model; "
                "pass the processor's image_position_ids with pixel_values"
            )
        kernel = int(self.model.config.vision_config.pooling_kernel_size)
        grids = []
        for image in positions:
            real = image[(image >= 0).all(dim=-1)]  # (patches, 2): x, y
            columns, rows = (int(real[:, axis].max()) + 1 for axis in (0, 1))
            grids.append((-(-rows // kernel), -(-columns // kernel)))
        return grids
