"""``clip_relevance``: CLIP similarity between the prompt and the image patch under each visual token."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

from atp.scorers.base import AttentionView, Scorer

TINY = "atp-tiny-clip"  # a small random config shipped with the plugin, for tests and demos


class ClipRelevanceScorer(Scorer):
    """Scores ``s_clip`` (B, N): cosine similarity, in CLIP space, between the prompt and each
    visual token's patch (its cell of the image's token grid, resized to CLIP's input size).

    The score does not depend on the layer, so it is computed once per prefill and reused.

    Parameters
    ----------
    tokenizer : the VLM's tokenizer (``decode(ids)``), to read the instruction text.
    model_name : an open_clip model name (default "ViT-B-32"), or "atp-tiny-clip".
    weights : a local ``.safetensors`` state dict for that model (nothing is unpickled); None
        gives random weights and a warning.
    batch_size : patches per CLIP forward.
    """

    name = "clip_relevance"

    def __init__(
        self, tokenizer=None, model_name: str = "ViT-B-32", weights: str | None = None, batch_size: int = 256
    ):
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise ValueError(
                "clip_relevance needs the VLM's tokenizer: scorer_options={'tokenizer': processor.tokenizer}"
            )
        if weights is not None and not str(weights).endswith(".safetensors"):
            raise ValueError(f"clip_relevance loads weights from a .safetensors file only, got {weights!r}")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights = weights
        self.batch_size = batch_size
        self._clip = None
        self._cache: tuple | None = None

    def _load(self, device):
        import open_clip

        if self.model_name == TINY:
            open_clip.add_model_config(Path(__file__).with_name(f"{TINY}.json"))
        model = open_clip.create_model(self.model_name, pretrained=None, device=device)
        if self.weights is None:
            warnings.warn(
                "clip_relevance runs an untrained CLIP (no weights=...): its scores are arbitrary",
                UserWarning,
                stacklevel=3,
            )
        else:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(self.weights, device=str(device)))
        self._clip = (model.eval(), open_clip.get_tokenizer(self.model_name))
        return self._clip

    @torch.no_grad()
    def relevance(self, pixel_values: torch.Tensor, grids, texts: list[str]) -> torch.Tensor:
        """(B, N) similarities for images ``pixel_values`` (I, 3, H, W) laid out by ``grids``."""
        model, clip_tokenizer = self._clip or self._load(pixel_values.device)
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        width = max(sum(h * w for h, w in sample) for sample in grids)
        scores = torch.zeros(len(grids), width, device=pixel_values.device)
        text = F.normalize(model.encode_text(clip_tokenizer(texts).to(pixel_values.device)).float(), dim=-1)
        image_index = 0
        for b, sample in enumerate(grids):
            crops = []
            for h, w in sample:
                image = pixel_values[image_index].float()
                image_index += 1
                cell_h, cell_w = image.shape[1] // h, image.shape[2] // w
                cells = (
                    image[:, : cell_h * h, : cell_w * w].unfold(1, cell_h, cell_h).unfold(2, cell_w, cell_w)
                )
                cells = cells.permute(1, 2, 0, 3, 4).reshape(h * w, 3, cell_h, cell_w)  # row-major tokens
                crops.append(F.interpolate(cells, size=size, mode="bilinear", align_corners=False))
            if not crops:
                continue
            crops = torch.cat(crops)
            embeds = torch.cat([model.encode_image(chunk).float() for chunk in crops.split(self.batch_size)])
            scores[b, : len(crops)] = F.normalize(embeds, dim=-1) @ text[b]
        return scores

    def score(self, view: AttentionView) -> dict[str, torch.Tensor]:
        context = view.context or {}
        inputs = context.get("inputs", {})
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.dim() != 4:
            raise ValueError(
                "clip_relevance needs the images as pixel_values (I, 3, H, W), one grid per image (LLaVA-1.5)"
            )
        if self._cache is None or self._cache[0] is not context:  # one computation per prefill
            ids, instruction = inputs["input_ids"], context["instruction"]
            texts = [self.tokenizer.decode(ids[b][instruction[b]].tolist()) for b in range(ids.shape[0])]
            self._cache = (context, self.relevance(pixels, context["grids"], texts))
        return {"s_clip": self._cache[1].gather(1, view.visual_ids)}
