"""Every supported model family as a test case: a tiny random model and a two-sample batch.

Adding a family to the invariant suite is one entry in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atp.attach import resolve_adapter
from atp.testing import (
    internvl_batch,
    llava_batch,
    llava_next_batch,
    mistral3_batch,
    qwen_batch,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_mistral3,
    tiny_qwen2_vl,
)


@dataclass
class Family:
    name: str
    build: Callable[..., torch.nn.Module]  # (num_layers=4, seed=0) -> model in eval mode
    samples: list  # two sample specs, different lengths and images
    make: Callable  # (model, specs, seeds) -> batch dict

    def model(self, seed: int = 0, num_layers: int = 4) -> torch.nn.Module:
        return self.build(num_layers=num_layers, seed=seed)

    def batch(self, model) -> dict:
        return self.make(model, self.samples, [0, 1])

    def single(self, model, b: int) -> dict:
        return self.make(model, [self.samples[b]], [b])


def visual_mask(model, batch: dict) -> torch.Tensor:
    """The visual tokens of a batch, as atp sees them (from a forward of the model itself)."""
    seen = {}
    adapter = resolve_adapter(model)
    original = adapter.visual_layout

    def spy(hook_module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")
        seen["positions"] = kwargs.get("position_ids")

    hook = adapter.language_model().register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return original(
        batch["input_ids"], batch, {"inputs_embeds": seen["embeds"], "position_ids": seen["positions"]}
    ).visual


FAMILIES = [
    Family(
        "llava",
        tiny_llava,
        [([1, 5, 6], [7, 8, 9, 10], 1), ([1, 11], [12, 13, 14, 15, 16, 17], 1)],
        llava_batch,
    ),
    Family(
        "qwen2_vl",
        lambda num_layers, seed: tiny_qwen2_vl(num_layers, seed, "2"),
        [  # two images of different sizes in one prompt; an image and a video
            [[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]],
            [[1], ("image", 8, 12), [4, 5], ("video", 4, 4, 4), [6, 7, 8, 9, 10]],
        ],
        lambda model, specs, seeds: qwen_batch(specs, seeds),
    ),
    Family(
        "qwen2_5_vl",
        lambda num_layers, seed: tiny_qwen2_vl(num_layers, seed, "2.5"),
        [[[1, 5], ("image", 8, 8), [7, 8, 9]], [[1], ("image", 4, 12), [4, 5], ("video", 4, 4, 4), [6, 7]]],
        lambda model, specs, seeds: qwen_batch(specs, seeds),
    ),
    Family(
        "llava_next",
        lambda num_layers, seed: tiny_llava_next(num_layers, seed),
        [([1, 5], [7, 8, 9], [("image", 32, 32)]), ([1], [4, 5, 6, 7], [("image", 40, 70)])],
        llava_next_batch,
    ),
    Family(
        "llava_onevision",
        lambda num_layers, seed: tiny_llava_next(num_layers, seed, onevision=True),
        [([1, 5], [7, 8, 9], [("image", 32, 32)]), ([1], [4, 5, 6], [("image", 40, 70), ("video", 2)])],
        llava_next_batch,
    ),
    Family(
        "internvl",
        tiny_internvl,
        [([1, 5], [7, 8, 9], [1]), ([1], [4, 5, 6, 7], [3])],  # one tile; two tiles and a thumbnail
        internvl_batch,
    ),
    Family(
        "mistral3",
        tiny_mistral3,
        [([1, 5], [7, 8, 9], [(32, 32)]), ([1], [4, 5], [(32, 48), (16, 24)])],  # two images back to back
        mistral3_batch,
    ),
]

BY_NAME_FAMILIES = {family.name: family for family in FAMILIES}
