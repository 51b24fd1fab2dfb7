"""Every supported model family as a test case: a tiny random model and a two-sample batch.

Adding a family to the invariant suite is one entry in FAMILIES.

A generic prompt layout (for the property tests) is a list of segments: text id lists and
:class:`Media`; ``Family.layout_batch`` turns layouts into the family's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atp.host.attach import resolve_adapter
from atp.tiny.models import (
    aya_vision_batch,
    gemma3_batch,
    gemma4_batch,
    idefics3_batch,
    internvl_batch,
    lfm2_vl_batch,
    llava_batch,
    llava_next_batch,
    mistral3_batch,
    ovis2_batch,
    qwen_batch,
    tiny_aya_vision,
    tiny_gemma3,
    tiny_gemma4,
    tiny_glm4v,
    tiny_glm46v,
    tiny_idefics3,
    tiny_internvl,
    tiny_lfm2_vl,
    tiny_llava,
    tiny_llava_next,
    tiny_mistral3,
    tiny_ovis2,
    tiny_qwen2_vl,
    tiny_qwen3_5,
    tiny_qwen3_vl,
)

# text ids that are no family's special token (pad / bos / eos 0-2, Mistral 3's break / end
# 12-13, InternVL's markers 124-125, image / video ids 126-127, Qwen's vision ids 151-154, Gemma 3's 150-152, Gemma 4's 150-156)
TEXT_IDS = range(14, 124)


@dataclass(frozen=True)
class Media:
    """An image or a video in a generic prompt layout; ``size`` picks one of the family's sizes."""

    kind: str = "image"
    size: int = 0

    def __repr__(self) -> str:
        return f"Media({self.kind!r}, {self.size})"


@dataclass
class Family:
    name: str
    build: Callable[..., torch.nn.Module]  # (num_layers=4, seed=0) -> model in eval mode
    samples: list  # two sample specs, different lengths and images
    make: Callable  # (model, specs, seeds) -> batch dict
    media: dict[str, list]  # kind -> the family's media part of each size, smallest first
    # mixture of experts: a token's output depends on its batch in the last bits (the experts' matmul
    # shapes follow where every token, padding included, is routed), so "equal" means within the
    # rounding of another reduction order (tests/numerics.py's REORDERED)
    routed: bool = False
    variant: str = ""  # a second model of the same family (its adapter's family is ``name``)

    @property
    def key(self) -> str:
        """The family's name in test ids and lookups (``name``, or ``name_variant``)."""
        return f"{self.name}_{self.variant}" if self.variant else self.name

    def model(self, seed: int = 0, num_layers: int = 4) -> torch.nn.Module:
        return self.build(num_layers=num_layers, seed=seed)

    def batch(self, model) -> dict:
        return self.make(model, self.samples, [0, 1])

    def single(self, model, b: int) -> dict:
        return self.make(model, [self.samples[b]], [b])

    def spec(self, layout: list) -> list:
        """A generic layout (text id lists and :class:`Media`) as this family's sample spec."""
        return [list(part) if isinstance(part, list) else self.media[part.kind][part.size] for part in layout]

    def layout_batch(self, model, layouts: list[list], seeds: list[int], padding: int = 0) -> dict:
        """Left-padded inputs of one generic layout per sample (pixels of sample i from ``seeds[i]``),
        with ``padding`` more pad columns on the left of every sample."""
        return pad_left(self.make(model, [self.spec(layout) for layout in layouts], seeds), padding)


def pad_left(batch: dict, columns: int) -> dict:
    """``batch`` with ``columns`` more padding on the left of every sample (ids, mask, token types)."""
    out = dict(batch)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if name in batch:
            out[name] = torch.nn.functional.pad(batch[name], (columns, 0), value=0)
    return out


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


QWEN_MEDIA = {  # patches (h x w gives h * w / 4 tokens; frames x h x w for a video)
    "image": [("image", 4, 4), ("image", 4, 8), ("image", 8, 8)],
    "video": [("video", 2, 4, 4), ("video", 4, 4, 8)],
}
NEXT_IMAGES = [("image", 32, 32), ("image", 40, 70), ("image", 64, 32)]  # pixels (anyres tiles)

FAMILIES = [
    Family(
        "llava",
        tiny_llava,
        [([1, 5, 6], [7, 8, 9, 10], 1), ([1, 11], [12, 13, 14, 15, 16, 17], 1)],
        llava_batch,
        {"image": [1]},  # one size: 16 tokens
    ),
    Family(
        "qwen2_vl",
        lambda num_layers, seed: tiny_qwen2_vl(num_layers, seed, "2"),
        [  # two images of different sizes in one prompt; an image and a video
            [[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]],
            [[1], ("image", 8, 12), [4, 5], ("video", 4, 4, 4), [6, 7, 8, 9, 10]],
        ],
        lambda model, specs, seeds: qwen_batch(specs, seeds),
        QWEN_MEDIA,
    ),
    Family(
        "qwen2_5_vl",
        lambda num_layers, seed: tiny_qwen2_vl(num_layers, seed, "2.5"),
        [[[1, 5], ("image", 8, 8), [7, 8, 9]], [[1], ("image", 4, 12), [4, 5], ("video", 4, 4, 4), [6, 7]]],
        lambda model, specs, seeds: qwen_batch(specs, seeds),
        QWEN_MEDIA,
    ),
    Family(
        "qwen3_vl",  # DeepStack after LM layers 0 and 1: the ATP layer at 1 drops before the second addition
        lambda num_layers, seed: tiny_qwen3_vl(num_layers, seed),
        [
            [[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]],
            [[1], ("image", 8, 12), [4, 5], ("video", 4, 4, 4), [6, 7, 8, 9, 10]],
        ],
        lambda model, specs, seeds: qwen_batch(specs, seeds, frame_blocks=True),
        QWEN_MEDIA,
    ),
    Family(
        "qwen3_vl_moe",
        lambda num_layers, seed: tiny_qwen3_vl(num_layers, seed, moe=True),
        [[[1, 5], ("image", 8, 8), [7, 8, 9]], [[1], ("image", 4, 12), [4, 5], ("video", 4, 4, 4), [6, 7]]],
        lambda model, specs, seeds: qwen_batch(specs, seeds, frame_blocks=True),
        QWEN_MEDIA,
        routed=True,
    ),
    Family(
        "llava_next",
        lambda num_layers, seed: tiny_llava_next(num_layers, seed),
        [([1, 5], [7, 8, 9], [("image", 32, 32)]), ([1], [4, 5, 6, 7], [("image", 40, 70)])],
        llava_next_batch,
        {"image": NEXT_IMAGES},
    ),
    Family(
        "llava_onevision",
        lambda num_layers, seed: tiny_llava_next(num_layers, seed, onevision=True),
        [([1, 5], [7, 8, 9], [("image", 32, 32)]), ([1], [4, 5, 6], [("image", 40, 70), ("video", 2)])],
        llava_next_batch,
        {"image": NEXT_IMAGES, "video": [("video", 2)]},  # a batch's videos have one frame count
    ),
    Family(
        "internvl",
        tiny_internvl,
        [([1, 5], [7, 8, 9], [1]), ([1], [4, 5, 6, 7], [3])],  # one tile; two tiles and a thumbnail
        internvl_batch,
        {"image": [1, 3]},  # tiles
    ),
    Family(
        "mistral3",
        tiny_mistral3,
        [([1, 5], [7, 8, 9], [(32, 32)]), ([1], [4, 5], [(32, 48), (16, 24)])],  # two images back to back
        mistral3_batch,
        {"image": [(8, 16), (16, 24), (32, 32)]},  # pixels: 1 x 2, 2 x 3 and 4 x 4 tokens
    ),
]

FAMILIES.append(
    Family(  # sliding window 8 < every prompt; layers S, S, F, S, S, F
        "gemma3",
        lambda num_layers, seed: tiny_gemma3(max(num_layers, 6), seed),
        [[[1, 5, 6], 1, [7, 8, 9, 10]], [[1], 2, [4, 5, 6, 7, 8, 9, 10, 11]]],
        lambda model, specs, seeds: gemma3_batch(specs, seeds),
        {"image": [1]},
    )
)

for _name, _smol in (("idefics3", False), ("smolvlm", True)):
    FAMILIES.append(
        Family(  # tiles in a row plus the global image; the global image alone
            _name,
            lambda num_layers, seed, smol=_smol: tiny_idefics3(num_layers, seed, smolvlm=smol),
            [[[1, 5], ("image", 2), [7, 8, 9]], [[1], ("image", 0), [4, 5, 6, 7]]],
            lambda model, specs, seeds: idefics3_batch(specs, seeds),
            {"image": [("image", 0), ("image", 1), ("image", 2)]},
        )
    )

FAMILIES.append(
    Family(
        "llava_next_video",
        lambda num_layers, seed: tiny_llava_next(num_layers, seed, video=True),
        [([1, 5], [7, 8, 9], [("image", 32, 32)]), ([1], [4, 5, 6], [("image", 40, 70), ("video", 3)])],
        llava_next_batch,
        {"image": NEXT_IMAGES, "video": [("video", 2)]},
    )
)

FAMILIES.append(
    Family(  # images only: transformers' GLM-4.1V cannot take images and videos in one forward
        "glm4v",
        tiny_glm4v,
        [[[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]], [[1], ("image", 8, 12), [4, 5, 6, 7]]],
        lambda model, specs, seeds: qwen_batch(specs, seeds, glm=True),
        {"image": QWEN_MEDIA["image"]},
    )
)

FAMILIES.append(
    Family(  # GLM-4.1V's layout and text model inside Glm46VForConditionalGeneration (AutoModel-built LM)
        "glm46v",
        tiny_glm46v,
        [[[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]], [[1], ("image", 8, 12), [4, 5, 6, 7]]],
        lambda model, specs, seeds: qwen_batch(specs, seeds, glm=True),
        {"image": QWEN_MEDIA["image"]},
    )
)

FAMILIES.append(
    Family(  # a global image alone; the global image and 2 x 2 tiles (rows and columns marked)
        "ovis2",
        tiny_ovis2,
        [[[1, 5], ("image", 1, 1), [7, 8, 9]], [[1], ("image", 2, 2), [4, 5, 6, 7]]],
        lambda model, specs, seeds: ovis2_batch(specs, seeds),
        {"image": [("image", 1, 1), ("image", 1, 2), ("image", 2, 2)]},
    )
)

for _moe in (False, True):  # the MoE variant: 4 experts, 2 per token, in every layer
    FAMILIES.append(
        Family(  # layers S, S, F, S, F, S, F: 5 and 6 read the keys of 3 and 4 (KV sharing), per-layer
            # inputs; images of 4 x 3 and 2 x 4 tokens (not square), two back to back; sliding window 8
            "gemma4",
            lambda num_layers, seed, moe=_moe: tiny_gemma4(max(num_layers, 7), seed, moe=moe),
            [
                [[1, 5, 6], ("image", 8, 6), [7, 8, 9, 10]],
                [[1], ("image", 4, 8), ("image", 4, 4), [4, 5, 6, 7, 8]],
            ],
            lambda model, specs, seeds: gemma4_batch(specs, seeds),
            {"image": [("image", 4, 4), ("image", 4, 6), ("image", 8, 6)]},  # patches: 2x2, 2x3, 4x3 tokens
            routed=_moe,
            variant="moe" if _moe else "",
        )
    )

FAMILIES.append(
    Family(  # the thumbnail alone; three tiles and the thumbnail. Cohere2: S, S, S, F with a window of 8
        "aya_vision",
        tiny_aya_vision,
        [[[1, 5], ("image", 1), [7, 8, 9]], [[1], ("image", 3), [4, 5, 6, 7, 8, 9, 10, 11]]],
        lambda model, specs, seeds: aya_vision_batch(specs, seeds),
        {"image": [("image", 1), ("image", 2), ("image", 3)]},
    )
)

for _name, _moe in (("qwen3_5", False), ("qwen3_5_moe", True)):
    FAMILIES.append(
        Family(  # layers F, F, F, L, L, F: linear layers after every suite ATP layer, full ones to score from
            _name,
            lambda num_layers, seed, moe=_moe: tiny_qwen3_5(max(num_layers, 6), seed, moe=moe),
            [
                [[1, 5], ("image", 8, 8), [6], ("image", 4, 8), [7, 8, 9]],
                [[1], ("image", 8, 12), [4, 5], ("video", 4, 4, 4), [6, 7, 8, 9, 10]],
            ],
            lambda model, specs, seeds: qwen_batch(specs, seeds, frame_blocks=True),
            QWEN_MEDIA,
            routed=_moe,
        )
    )

FAMILIES.append(
    Family(  # layers F, F, F, C, C, F: convolutions after every suite ATP layer; crops of different shapes
        "lfm2_vl",
        lambda num_layers, seed: tiny_lfm2_vl(max(num_layers, 6), seed),
        [[[1, 5], ("image", 12, 8), [7, 8, 9]], [[1], ("image", 8, 12, 1, 2), [4, 5, 6, 7]]],
        lambda model, specs, seeds: lfm2_vl_batch(specs, seeds),
        {"image": [("image", 8, 8), ("image", 12, 8), ("image", 8, 12, 1, 2)]},
    )
)

BY_NAME_FAMILIES = {family.key: family for family in FAMILIES}
