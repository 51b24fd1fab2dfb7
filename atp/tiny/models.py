"""Tiny random models built from configs (no download), for tests, the demo and benchmarks."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# the tiny language models' shared settings (ids 0 / 1 / 2: pad / bos / eos)
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _width(hidden_size: int) -> dict:
    """The text config's widths for ``hidden_size`` (4 heads, 2 KV heads: head_dim hidden_size / 4)."""
    if hidden_size % 8:
        raise ValueError(f"hidden_size must be a multiple of 8 (4 heads of an even width), got {hidden_size}")
    return {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size}


def _build(model_class, config, seed: int):
    """A model with random weights from ``seed``, in eval mode, padding with token 0."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = 0
    return model.eval()


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name ``model.forward`` takes its KV cache by in the installed
    transformers (``cache`` from 5.24, ``past_key_values`` before)."""
    from atp.host import compat

    return {compat.cache_argument(model): cache}


def tiny_llava(
    num_layers: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    seed: int = 0,
    vocab_size: int = 128,
    image_token_id: int = 127,
    vision_hidden_size: int = 32,
    initializer_range: float = 0.02,
):
    """A random ``LlavaForConditionalGeneration``: CLIP tower (``vision_hidden_size``, 2 layers) + Llama LM
    (hidden ``hidden_size``, ``num_layers`` layers, 4 heads, 2 KV heads), eval mode, SDPA.

    ``(image_size / patch_size) ** 2`` visual tokens per image (16 by default; 576 with
    image_size=336, patch_size=14 as in LLaVA-1.5). ``initializer_range`` is the weights' init
    standard deviation (transformers' 0.02 suits widths in the thousands; a model trained from
    scratch at width 100 learns far faster near 1 / sqrt(width)).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        initializer_factor=initializer_range / 0.02,  # CLIP scales its own 0.02 by this factor
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return _build(LlavaForConditionalGeneration, config, seed)


def llava_prompt(model, text_before: list[int], text_after: list[int], images: int = 1) -> list[int]:
    """Token ids ``text_before + <image> * n + text_after`` for a tiny LLaVA."""
    config = model.config
    return text_before + [config.image_token_id] * (config.image_seq_length * images) + text_after


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (B, L) for prompts of different lengths."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :] = torch.tensor(prompt)
        mask[b, width - len(prompt) :] = 1
    return ids, mask


def prompt_parts(sample) -> list:
    """A sample of the batch builders below as a list of parts (text id lists and media
    entries, in prompt order): ``(text_before, text_after, media)`` is
    ``[text_before, *media, text_after]``; a list is taken as it is, so text can sit
    between images and an image can open or close the prompt."""
    if isinstance(sample, tuple):
        before, after, media = sample
        return [list(before), *(media if isinstance(media, list) else [media]), list(after)]
    return list(sample)


class TinyTokenizer:
    """Whitespace words hashed into a small vocabulary: no files, no download.

    Ids 0, 1, 2 are pad, bos, eos; words map to ``3 .. vocab_size - 2`` (the last id is left
    for the image token of :func:`tiny_llava`).
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + zlib.crc32(word.encode()) % (self.vocab_size - 4) for word in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids) -> str:
        """Not invertible (words are hashed): ``w<id>`` per token, enough for text-side tests."""
        return " ".join(f"w{int(i)}" for i in ids)

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "tiny_tokenizer.json").write_text(json.dumps({"vocab_size": self.vocab_size}))


def clip_pixel_values(image, size: int) -> torch.Tensor:
    """CLIP preprocessing by hand: RGB, resize to size x size, normalise. (3, size, size)."""
    array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


class TinyImageProcessor:
    """``processor(images=[...], return_tensors="pt")["pixel_values"]`` without a download."""

    image_mean = CLIP_MEAN

    def __init__(self, size: int = 32):
        self.size = size

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        return {"pixel_values": torch.stack([clip_pixel_values(image, self.size) for image in images])}


QWEN_IDS = {"image": 151, "video": 152, "start": 153, "end": 154}


def tiny_qwen2_vl(num_layers: int = 4, seed: int = 0, version: str = "2", hidden_size: int = 64):
    """A random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``): 2-layer vision tower with
    patch 2 and merge 2 (an (h x w)-patch image gives h * w / 4 tokens), Qwen2 LM of hidden
    ``hidden_size`` (4 heads; M-RoPE sections 1/4, 3/8, 3/8 of the rotary half)."""
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = {"depth": 2, "embed_dim": 32, "hidden_size": hidden_size, "num_heads": 2}
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = {
            "depth": 2,
            "hidden_size": 32,
            "out_hidden_size": hidden_size,
            "num_heads": 2,
            "intermediate_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 8,
        }
    vision.update(patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    half = hidden_size // 4 // 2  # the rotary half of a head
    sections = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]  # [2, 3, 3] at hidden 64
    text = {
        **_TEXT,
        **_width(hidden_size),
        "num_hidden_layers": num_layers,
        "vocab_size": 160,  # room for the vision ids 151..154
        "rope_parameters": {"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0},
    }
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IDS["image"],
        video_token_id=QWEN_IDS["video"],
        vision_start_token_id=QWEN_IDS["start"],
        vision_end_token_id=QWEN_IDS["end"],
    )
    model = _build(Model, config, seed)
    model.generation_config.eos_token_id = 2
    return model


GLM_IDS = {"image": 151, "video": 152, "start": 153, "end": 154, "video_start": 155, "video_end": 156}


def tiny_glm4v(num_layers: int = 4, seed: int = 0):
    """A random GLM-4.1V: a 2-layer vision tower (patch 2, merge 2: an (h x w)-patch image gives
    h * w / 4 tokens), a GLM-4 LM of hidden 64 with 3D M-RoPE on half of each head (partial rotary)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    return _glm(Glm4vConfig, Glm4vForConditionalGeneration, num_layers, seed)


def tiny_glm46v(num_layers: int = 4, seed: int = 0):
    """A random GLM-4.6V: :func:`tiny_glm4v`'s tower, ids and dense GLM-4.1V text model, in
    ``Glm46VForConditionalGeneration`` (its language model built by ``AutoModel`` from the text config)."""
    from transformers import Glm46VConfig, Glm46VForConditionalGeneration

    return _glm(Glm46VConfig, Glm46VForConditionalGeneration, num_layers, seed)


def _glm(config_class, model_class, num_layers: int, seed: int):
    text = {
        **_TEXT,
        "num_hidden_layers": num_layers,
        "vocab_size": 160,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [1, 1, 2],
            "partial_rotary_factor": 0.5,
            "rope_theta": 10000.0,
        },
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 2,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "image_size": 16,
    }
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=GLM_IDS["image"],
        video_token_id=GLM_IDS["video"],
        image_start_token_id=GLM_IDS["start"],
        image_end_token_id=GLM_IDS["end"],
        video_start_token_id=GLM_IDS["video_start"],
        video_end_token_id=GLM_IDS["video_end"],
    )
    model = _build(model_class, config, seed)
    model.generation_config.eos_token_id = 2
    return model


def tiny_qwen3_vl(num_layers: int = 4, seed: int = 0, deepstack: tuple[int, ...] = (0, 1), moe: bool = False):
    """A random Qwen3-VL (``moe``: Qwen3-VL-MoE, 4 experts, 2 per token): a 3-layer vision tower (patch 2, merge 2: an (h x w)-patch image gives
    h * w / 4 tokens) whose layers ``deepstack`` also feed the LM (DeepStack: added to the visual
    tokens' hidden states after LM layers 0 .. len(deepstack) - 1), a Qwen3 LM of hidden 64 with
    interleaved M-RoPE."""
    if moe:
        from transformers import Qwen3VLMoeConfig as Config
        from transformers import Qwen3VLMoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

    text = {
        **_TEXT,
        "num_hidden_layers": num_layers,
        "head_dim": 16,
        "vocab_size": 160,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "rope_theta": 10000.0,
        },
    }
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 2,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": list(deepstack),
    }
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IDS["image"],
        video_token_id=QWEN_IDS["video"],
        vision_start_token_id=QWEN_IDS["start"],
        vision_end_token_id=QWEN_IDS["end"],
    )
    model = _build(Model, config, seed)
    model.generation_config.eos_token_id = 2
    return model


def qwen_batch(
    samples: list[list], seeds: list[int] | None = None, frame_blocks: bool = False, glm: bool = False
) -> dict:
    """Left-padded Qwen2-VL inputs. Each sample is a list of parts: a list of text ids,
    ``("image", h, w)`` (h x w patches, even) or ``("video", frames, h, w)`` (frames even).
    The pixels of sample i come from ``seeds[i]`` (default i), so a sample alone gets the
    same pixels as in a batch. ``frame_blocks``: Qwen3-VL's video layout, each temporal patch of
    frames its own ``<|vision_start|> ... <|vision_end|>`` block after a timestamp (text id 13).
    ``glm``: GLM-4.1V's layout, a video's frames written as images (the image token in
    ``<|begin_of_image|> ... <|end_of_image|>`` blocks after a timestamp) between the video's own
    begin / end tokens (:data:`GLM_IDS`)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    prompts, types, images, image_grids, videos, video_grids = [], [], [], [], [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids, kinds = [], []
        for part in sample:
            if isinstance(part, list):
                ids += part
                kinds += [0] * len(part)
                continue
            kind, *shape = part
            t, h, w = (1, *shape) if kind == "image" else (shape[0] // 2, shape[1], shape[2])
            tokens = t * h * w // 4
            blocks = t if kind == "video" and (frame_blocks or glm) else 1
            if glm and kind == "video":
                ids.append(GLM_IDS["video_start"])
                kinds.append(0)
            for _ in range(blocks):
                stamp = [13] if kind == "video" and (frame_blocks or glm) else []
                start, end = (
                    (GLM_IDS["start"], GLM_IDS["end"]) if glm else (QWEN_IDS["start"], QWEN_IDS["end"])
                )
                token = GLM_IDS["image"] if glm else QWEN_IDS[kind]
                ids += stamp + [start] + [token] * (tokens // blocks) + [end]
                kinds += [0] * len(stamp) + [0] + [1 if kind == "image" else 2] * (tokens // blocks) + [0]
            if glm and kind == "video":
                ids.append(GLM_IDS["video_end"])
                kinds.append(0)
            patches = torch.randn(t * h * w, 3 * 2 * 2 * 2, generator=generator)
            (images if kind == "image" else videos).append(patches)
            (image_grids if kind == "image" else video_grids).append([t, h, w])
        prompts.append(ids)
        types.append(kinds)
    input_ids, attention_mask = left_pad(prompts)
    token_types, _ = left_pad(types)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": token_types.int()}
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.tensor(video_grids)
    return batch


QWEN3_5_LAYERS = ("full_attention",) * 3 + ("linear_attention",) * 2 + ("full_attention",)


def tiny_qwen3_5(
    num_layers: int = 6, seed: int = 0, layer_types: tuple[str, ...] | str | None = None, moe: bool = False
):
    """A random Qwen3.5 (``moe``: Qwen3.5-MoE, 4 experts, 2 per token, a shared expert): a 2-layer
    vision tower (patch 2, merge 2: an (h x w)-patch image gives h * w / 4 tokens, no DeepStack) and
    a hybrid LM of hidden 64 whose ``layer_types`` mix full attention (head 32, output gate, a
    partial interleaved M-RoPE on half of each head) with Gated-DeltaNet linear attention (2 key /
    4 value heads of 16, conv width 4). The default types (:data:`QWEN3_5_LAYERS`: F, F, F, L, L, F,
    cut or continued with full layers to ``num_layers``) let ATP layers 1-3 score from a full layer
    and put linear layers after them; ``layer_types="released"`` uses the released pattern (L, L, L,
    F, repeated)."""
    if moe:
        from transformers import Qwen3_5MoeConfig as Config
        from transformers import Qwen3_5MoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3_5Config as Config
        from transformers import Qwen3_5ForConditionalGeneration as Model

    if layer_types == "released":
        layer_types = tuple("full_attention" if i % 4 == 3 else "linear_attention" for i in range(num_layers))
    elif layer_types is None:
        layer_types = (QWEN3_5_LAYERS + ("full_attention",) * num_layers)[:num_layers]
    text = {
        **_TEXT,
        "num_hidden_layers": num_layers,
        "layer_types": list(layer_types),
        "head_dim": 32,
        "vocab_size": 160,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.5,
            "rope_theta": 10000.0,
        },
    }
    if moe:  # experts only, as the released configs (no dense intermediate_size)
        del text["intermediate_size"]
        text.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
        )
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 2,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "num_position_embeddings": 64,
    }
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IDS["image"],
        video_token_id=QWEN_IDS["video"],
        vision_start_token_id=QWEN_IDS["start"],
        vision_end_token_id=QWEN_IDS["end"],
    )
    model = _build(Model, config, seed)
    model.generation_config.eos_token_id = 2
    return model


GEMMA_IDS = {"boi": 150, "eoi": 151, "image": 152}


def tiny_gemma3(num_layers: int = 6, seed: int = 0, sliding_window: int = 8):
    """A random Gemma 3: a 2-layer SigLIP tower (32 px, 4 px patches) pooled to 16 tokens (4 x 4) per
    image, a Gemma 3 LM of hidden 64 whose layers alternate sliding-window (``sliding_window``
    tokens, shorter than the test prompts) and global attention: pattern S, S, F repeated."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
    text = {
        **_TEXT,
        "num_hidden_layers": num_layers,
        "head_dim": 16,
        "vocab_size": 160,
        "sliding_window": sliding_window,
        "layer_types": types,
        "query_pre_attn_scalar": 16,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 4,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=GEMMA_IDS["boi"],
        eoi_token_index=GEMMA_IDS["eoi"],
        image_token_index=GEMMA_IDS["image"],
    )
    model = _build(Gemma3ForConditionalGeneration, config, seed)
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = 2
    return model


def gemma3_batch(samples: list[list], seeds: list[int] | None = None) -> dict:
    """Left-padded Gemma 3 inputs with ``token_type_ids`` (1 on image tokens: bidirectional inside
    each image). Each sample is a list of parts: text id lists and image counts (images back to
    back, each ``<start_of_image>`` + 16 tokens + ``<end_of_image>``); pixels of sample i from
    ``seeds[i]`` (default i)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    prompts, pixels = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in sample:
            if isinstance(part, list):
                ids += part
                continue
            for _ in range(part):
                ids += [GEMMA_IDS["boi"]] + [GEMMA_IDS["image"]] * 16 + [GEMMA_IDS["eoi"]]
                pixels.append(torch.randn(3, 32, 32, generator=generator))
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (input_ids == GEMMA_IDS["image"]).long(),
    }
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


GEMMA4_IDS = {"boi": 150, "eoi": 151, "image": 152, "video": 153, "audio": 154, "boa": 155, "eoa": 156}


def tiny_gemma4(
    num_layers: int = 7, seed: int = 0, sliding_window: int = 8, kv_shared: int = 2, moe: bool = False
):
    """A random Gemma 4 like the small released variants: per-layer inputs and the last ``kv_shared``
    layers reading the keys and values of earlier ones. A 2-layer vision tower of 4 px patches pooled
    2 x 2 (a ``rows / 2 x cols / 2`` grid per image, read from the patch positions), a language model
    of hidden 64 whose layers are S, S, F, S, F, ... with the last full: sliding layers (window
    ``sliding_window``, head dim 16, bidirectional inside an image) and full ones (head dim 32, a
    quarter of it rotated). With 7 layers and 2 shared, layers 5 (S) and 6 (F) read the keys of
    layers 3 (S) and 4 (F). ``moe``: every layer's feed-forward also runs a mixture of 4 experts, 2
    per token (``enable_moe_block``, the 26B-A4B variant's)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    types = ["full_attention" if i % 2 == 0 and i > 1 else "sliding_attention" for i in range(num_layers)]
    types[-1] = "full_attention"
    text = {
        **_TEXT,
        "num_hidden_layers": num_layers,
        "head_dim": 16,
        "global_head_dim": 32,
        "vocab_size": 160,
        "vocab_size_per_layer_input": 160,
        "hidden_size_per_layer_input": 8,
        "sliding_window": sliding_window,
        "layer_types": types,
        "num_kv_shared_layers": kv_shared,
        "use_bidirectional_attention": "vision",
    }
    if moe:
        text.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "patch_size": 4,
        "pooling_kernel_size": 2,
        "position_embedding_size": 64,
    }
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=GEMMA4_IDS["boi"],
        eoi_token_id=GEMMA4_IDS["eoi"],
        image_token_id=GEMMA4_IDS["image"],
        video_token_id=GEMMA4_IDS["video"],
        audio_token_id=GEMMA4_IDS["audio"],
        boa_token_id=GEMMA4_IDS["boa"],
        eoa_token_index=GEMMA4_IDS["eoa"],
    )
    model = _build(Gemma4ForConditionalGeneration, config, seed)
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = 2
    return model


def gemma4_batch(samples: list[list], seeds: list[int] | None = None) -> dict:
    """Left-padded Gemma 4 inputs as its processor makes them: each image is ``<boi>`` + one token per
    2 x 2 patches + ``<eoi>``, its patches flattened (images, max_patches, 48) with their (x, y)
    positions in ``image_position_ids`` ((-1, -1) pads an image to the batch's largest), and
    ``mm_token_type_ids`` 1 on image tokens. Each sample is a list of parts: text id lists and
    images as ``("image", rows, cols)`` in patches (even: a ``rows / 2 x cols / 2`` token grid);
    pixels of sample i from ``seeds[i]`` (default i)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    prompts, images = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in sample:
            if isinstance(part, list):
                ids += part
                continue
            _, rows, cols = part
            ids += [GEMMA4_IDS["boi"]] + [GEMMA4_IDS["image"]] * (rows // 2 * cols // 2) + [GEMMA4_IDS["eoi"]]
            images.append((rows, cols, torch.randn(rows * cols, 48, generator=generator)))
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == GEMMA4_IDS["image"]).long(),
    }
    if images:
        most = max(rows * cols for rows, cols, _ in images)
        pixels = torch.zeros(len(images), most, 48)
        positions = torch.full((len(images), most, 2), -1, dtype=torch.long)
        for index, (rows, cols, patches) in enumerate(images):
            y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            pixels[index, : rows * cols] = patches
            positions[index, : rows * cols] = torch.stack([x.flatten(), y.flatten()], dim=1)
        batch["pixel_values"] = pixels
        batch["image_position_ids"] = positions
    return batch


IDEFICS_IDS = {"image": 152, "fake": 140, "global": 143, "tile": (141, 142)}  # row / column markers


def tiny_idefics3(num_layers: int = 4, seed: int = 0, smolvlm: bool = False):
    """A random Idefics3 (``smolvlm``: SmolVLM): a 2-layer SigLIP tower on 32-px tiles of 4-px
    patches, pixel shuffle by 2 (16 tokens, 4 x 4, per tile), a Llama LM of hidden 64."""
    if smolvlm:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
    text = {"model_type": "llama", **_TEXT, "num_hidden_layers": num_layers, "vocab_size": 160}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 4,
    }
    config = Config(
        text_config=text, vision_config=vision, scale_factor=2, image_token_id=IDEFICS_IDS["image"]
    )
    model = _build(Model, config, seed)
    model.generation_config.eos_token_id = 2
    return model


def idefics3_batch(samples: list[list], seeds: list[int] | None = None) -> dict:
    """Left-padded Idefics3 / SmolVLM inputs. Each sample is a list of parts: text id lists and
    ``("image", tiles)``: ``tiles`` 0 is the global image alone, ``n`` is n tiles in one row (each
    ``<fake><row_1_col_j>`` + 16 tokens) then the global image (``<fake><global-img>`` + 16 tokens +
    ``<fake>``), as the processor writes them. ``pixel_values`` (B, max tiles, 3, 32, 32), all-zero
    tiles padding the samples with fewer; pixels of sample i from ``seeds[i]`` (default i)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    ids_all, tiles_all = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids, tiles = [], []
        for part in sample:
            if isinstance(part, list):
                ids += part
                continue
            _, count = part
            for column in range(count):
                ids += [IDEFICS_IDS["fake"], IDEFICS_IDS["tile"][column % 2]] + [IDEFICS_IDS["image"]] * 16
            if count:
                ids += [13]  # the newline after a row of tiles
            ids += (
                [IDEFICS_IDS["fake"], IDEFICS_IDS["global"]]
                + [IDEFICS_IDS["image"]] * 16
                + [IDEFICS_IDS["fake"]]
            )
            tiles += [torch.randn(3, 32, 32, generator=generator) for _ in range(count + 1)]
        ids_all.append(ids)
        tiles_all.append(tiles)
    input_ids, attention_mask = left_pad(ids_all)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    most = max(len(t) for t in tiles_all)
    if most:
        pixels = torch.zeros(len(samples), most, 3, 32, 32)
        for row, tiles in enumerate(tiles_all):
            for index, tile in enumerate(tiles):
                pixels[row, index] = tile
        batch["pixel_values"] = pixels
    return batch


def llava_batch(
    model, samples: list[tuple[list[int], list[int], int] | list], seeds: list[int] | None = None
) -> dict:
    """Left-padded LLaVA inputs from ``(text_before, text_after, images)`` per sample, or a
    list of parts (text id lists and image counts, see :func:`prompt_parts`); the pixels of
    sample i come from ``seeds[i]`` (default i)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    config = model.config
    size = config.vision_config.image_size
    prompts, pixels = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in prompt_parts(sample):
            if isinstance(part, list):
                ids += part
                continue
            ids += [config.image_token_id] * (config.image_seq_length * part)
            pixels += [torch.randn(3, size, size, generator=generator) for _ in range(part)]
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def tiny_llava_next(
    num_layers: int = 4, seed: int = 0, onevision: bool = False, video: bool = False, hidden_size: int = 64
):
    """A random LLaVA-NeXT (``onevision``: LLaVA-OneVision, ``video``: LLaVA-NeXT-Video, frames pooled
    by 2 to 2 x 2) with 32 px tiles of 8 px patches (4 x 4 base grid), pinpoints up to 64 x 64 and a
    Llama (NeXT) or Qwen2 (OneVision) LM of hidden ``hidden_size`` (4 heads)."""
    text = {**_TEXT, "num_hidden_layers": num_layers, **_width(hidden_size)}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    if onevision:
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        config = LlavaOnevisionConfig(
            vision_config={"model_type": "siglip_vision_model", **vision},
            text_config={"model_type": "qwen2", **text},
            image_token_index=126,
            video_token_index=127,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
        )
        model_class = LlavaOnevisionForConditionalGeneration
    elif video:
        from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

        config = LlavaNextVideoConfig(
            vision_config={"model_type": "clip_vision_model", **vision},
            text_config={"model_type": "llama", **text},
            image_token_index=127,
            video_token_index=126,
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            spatial_pool_stride=2,
        )
        model_class = LlavaNextVideoForConditionalGeneration
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        config = LlavaNextConfig(
            vision_config={"model_type": "clip_vision_model", **vision},
            text_config={"model_type": "llama", **text},
            image_token_index=127,
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        model_class = LlavaNextForConditionalGeneration
    return _build(model_class, config, seed)


def llava_next_batch(
    model, samples: list[tuple[list[int], list[int], list[tuple]]], seeds: list[int] | None = None
) -> dict:
    """Left-padded LLaVA-NeXT / OneVision inputs. A sample is ``(text_before, text_after, media)``
    or a list of parts (:func:`prompt_parts`), with media ``("image", height, width)`` (pixels)
    or ``("video", frames)``; the placeholder counts are what the model's own feature packing
    produces."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    seeds = list(range(len(samples))) if seeds is None else seeds
    config = model.config
    tile = config.vision_config.image_size
    prompts, images, sizes, videos = [], [], [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in prompt_parts(sample):
            if isinstance(part, list):
                ids += part
                continue
            kind, *shape = part
            if kind == "image":
                patches = image_size_to_num_patches(shape, config.image_grid_pinpoints, tile)
                pixels = torch.randn(patches, 3, tile, tile, generator=generator)
                with torch.no_grad():
                    count = (
                        model.model.get_image_features(pixels[None], torch.tensor([shape]))
                        .pooler_output[0]
                        .shape[0]
                    )
                images.append(pixels)
                sizes.append(list(shape))
                ids += [config.image_token_id] * count
            else:
                frames = shape[0]
                videos.append(torch.randn(frames, 3, tile, tile, generator=generator))
                patches = tile // config.vision_config.patch_size
                if config.model_type == "llava_next_video":  # pooled frames back to back, no newline
                    side = patches // config.spatial_pool_stride
                    ids += [config.video_token_id] * (frames * side * side)
                else:  # OneVision: bilinear halving, one newline after the frames
                    side = -(-patches // 2)
                    ids += [config.video_token_id] * (frames * side * side + 1)
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        most = max(p.shape[0] for p in images)
        batch["pixel_values"] = torch.stack(
            [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in images]
        )
        batch["image_sizes"] = torch.tensor(sizes)
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


def tiny_internvl(num_layers: int = 4, seed: int = 0):
    """A random InternVL: 32 px tiles of 4 px patches, pixel shuffle 0.5 -> 16 tokens (4 x 4) per tile,
    Qwen2 LM of hidden 64. Image token 127; ``<img>`` 125, ``</img>`` 124 in :func:`internvl_batch`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": [32, 32],
            "patch_size": [4, 4],
        },
        text_config={"model_type": "qwen2", "num_hidden_layers": num_layers, **_TEXT},
        image_token_id=127,
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    return _build(InternVLForConditionalGeneration, config, seed)


def internvl_batch(
    model, samples: list[tuple[list[int], list[int], list[int]] | list], seeds: list[int] | None = None
) -> dict:
    """Left-padded InternVL inputs from ``(text_before, text_after, tiles per image)`` per sample,
    or a list of parts (text id lists and tile counts, see :func:`prompt_parts`)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    per_tile = model.config.image_seq_length
    prompts, tiles = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in prompt_parts(sample):
            if isinstance(part, list):
                ids += part
                continue
            ids += [125] + [model.config.image_token_id] * (per_tile * part) + [124]
            tiles.append(torch.randn(part, 3, 32, 32, generator=generator))
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if tiles:
        batch["pixel_values"] = torch.cat(tiles)
    return batch


def _pixtral_parts(num_layers: int, patch_size: int) -> tuple[dict, dict]:
    """A tiny Pixtral vision config and Mistral text config (no sliding window)."""
    vision = {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": patch_size,
        "head_dim": 8,
    }
    text = {
        "model_type": "mistral",
        "sliding_window": None,
        "head_dim": 16,
        "num_hidden_layers": num_layers,
        **_TEXT,
    }
    return vision, text


def tiny_mistral3(num_layers: int = 4, seed: int = 0):
    """A random Mistral 3: Pixtral tower with 4 px patches merged 2 x 2 (an 8 px cell per token),
    Mistral LM of hidden 64 without sliding window. Image 127, ``[IMG_BREAK]`` 12, ``[IMG_END]`` 13."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vision, text = _pixtral_parts(num_layers, patch_size=4)
    config = Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=127, spatial_merge_size=2
    )
    return _build(Mistral3ForConditionalGeneration, config, seed)


def mistral3_batch(
    model,
    samples: list[tuple[list[int], list[int], list[tuple[int, int]]] | list],
    seeds: list[int] | None = None,
) -> dict:
    """Left-padded Mistral 3 inputs from ``(text_before, text_after, [(height, width) pixels])``
    per sample, or a list of parts (text id lists and ``(height, width)``, see :func:`prompt_parts`)."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    prompts, images, sizes = [], [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in prompt_parts(sample):
            if isinstance(part, list):
                ids += part
                continue
            height, width = part
            rows, columns = height // 8, width // 8
            for r in range(rows):
                ids += [model.config.image_token_id] * columns + [12 if r < rows - 1 else 13]
            images.append(torch.randn(3, height, width, generator=generator))
            sizes.append([height, width])
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        tall, wide = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        padded = torch.zeros(len(images), 3, tall, wide)
        for k, image in enumerate(images):
            padded[k, :, : image.shape[1], : image.shape[2]] = image
        batch["pixel_values"] = padded
        batch["image_sizes"] = torch.tensor(sizes)
    return batch


def write_toy_conversations(folder, images: int = 4, text_only: int = 4) -> Path:
    """A tiny LLaVA-format dataset in ``folder``: ``data.json`` and ``images/`` with random
    pictures, plus text-only conversations. Returns the JSON path (for ``atp train``)."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(images):
        pixels = rng.integers(0, 255, (36 + 4 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        records.append(
            {
                "id": f"img{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nDescribe picture {i}"},
                    {"from": "gpt", "value": f"Noise number {i}"},
                ],
            }
        )
    for i in range(text_only):
        records.append(
            {
                "id": f"txt{i}",
                "conversations": [
                    {"from": "human", "value": f"Count to {i}"},
                    {"from": "gpt", "value": " ".join(map(str, range(i + 1)))},
                ],
            }
        )
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def tiny_pixtral_llava(num_layers: int = 4, seed: int = 0):
    """A random LLaVA with a Pixtral tower (Pixtral-12B's layout): 8 px patches, no merge, rows of
    image tokens closed by break tokens; build inputs with :func:`mistral3_batch`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = _pixtral_parts(num_layers, patch_size=8)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=127,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return _build(LlavaForConditionalGeneration, config, seed)


OVIS_IDS = {"image": 151, "start": 153, "grid": 154, "col": 155, "row": 156, "end": 157}  # markers in order


def tiny_ovis2(num_layers: int = 4, seed: int = 0, image_size: int = 16):
    """A random Ovis2: a 2-layer vision tower over 16 px crops (patch 2, hidden stride 2: a 4 x 4
    grid of 16 visual words per crop, 32 visual words of which 5 are the indicators' embeddings),
    a Qwen2 LM of hidden 64 built by ``AutoModel``. :func:`ovis2_batch` builds 16 px crops only."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 2,
        "hidden_stride": 2,
        "vocab_size": 32,
    }
    text = {**_TEXT, "model_type": "qwen2", "num_hidden_layers": num_layers, "vocab_size": 160}
    config = Ovis2Config(
        vision_config=vision,
        text_config=text,
        image_token_id=OVIS_IDS["image"],
        visual_indicator_token_ids=[OVIS_IDS[name] for name in ("start", "grid", "col", "row", "end")],
        vocab_size=160,
        hidden_size=64,
    )
    model = _build(Ovis2ForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = 2
    return model


def ovis2_batch(samples: list[list], seeds: list[int] | None = None) -> dict:
    """Left-padded Ovis2 inputs. Each sample is a list of parts: text id lists and
    ``("image", rows, cols)``, written as the processor writes it: ``<IMG_START>``, the global
    image's 16 tokens, ``<IMG_GRID>``, and for more than one tile each tile's 16 tokens with
    ``<IMG_COL>`` between the columns and ``<IMG_ROW>`` between the rows, then ``<IMG_END>``.
    The crops of sample i (global image first, then the tiles) come from ``seeds[i]``."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    image = [OVIS_IDS["image"]] * 16
    prompts, crops = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in sample:
            if isinstance(part, list):
                ids += part
                continue
            _, rows, cols = part
            ids += [OVIS_IDS["start"], *image, OVIS_IDS["grid"]]
            tiles = rows * cols if rows * cols > 1 else 0
            for tile in range(tiles):
                ids += image
                if tile % cols < cols - 1:
                    ids.append(OVIS_IDS["col"])
                elif tile < tiles - 1:
                    ids.append(OVIS_IDS["row"])
            ids.append(OVIS_IDS["end"])
            crops += [torch.randn(3, 16, 16, generator=generator) for _ in range(1 + tiles)]
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if crops:
        batch["pixel_values"] = torch.stack(crops)
    return batch


AYA_IDS = {"image": 151, "start": 153, "end": 154, "tile": 155, "global": 156}  # markers: the tokenizer's


def tiny_aya_vision(num_layers: int = 4, seed: int = 0, sliding_window: int = 8, text_model: str = "cohere2"):
    """A random Aya Vision: a 2-layer SigLIP tower over 16 px crops (patch 2, pixel shuffle 2: a 4 x 4
    grid of 16 tokens per crop), a Cohere2 LM of hidden 64 with a sliding window of ``sliding_window``
    in three of every four layers (S, S, S, F: the global layers have no positions), or with
    ``text_model="cohere"`` Aya Vision 32B's Cohere LM (global layers with RoPE only)."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 2,
        "vision_use_head": False,
    }
    text = {**_TEXT, "model_type": text_model, "num_hidden_layers": num_layers, "vocab_size": 160}
    if text_model == "cohere2":
        text["sliding_window"] = sliding_window
    config = AyaVisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=AYA_IDS["image"],
        downsample_factor=2,
    )
    model = _build(AyaVisionForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = 2
    return model


def aya_vision_batch(samples: list[list], seeds: list[int] | None = None) -> dict:
    """Left-padded Aya Vision inputs. Each sample is a list of parts: text id lists and
    ``("image", tiles)``, written as the processor writes it: ``<|START_OF_IMG|>``, for ``tiles > 1``
    a ``TILE_i`` marker and 16 tokens per tile, ``TILE_GLOBAL`` and the thumbnail's 16 tokens,
    ``<|END_OF_IMG|>`` (a marker is one token here). The crops of sample i (the tiles, then the
    thumbnail) come from ``seeds[i]``."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    image = [AYA_IDS["image"]] * 16
    prompts, crops = [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in sample:
            if isinstance(part, list):
                ids += part
                continue
            tiles = part[1] if part[1] > 1 else 0
            ids.append(AYA_IDS["start"])
            for _ in range(tiles):
                ids += [AYA_IDS["tile"], *image]
            ids += [AYA_IDS["global"], *image, AYA_IDS["end"]]
            crops += [torch.randn(3, 16, 16, generator=generator) for _ in range(tiles + 1)]
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if crops:
        batch["pixel_values"] = torch.stack(crops)
    return batch


# markers: the tokenizer's (tile r, c: one id per tile from 156)
LFM2_VL_IDS = {"image": 151, "start": 153, "end": 154, "thumbnail": 155, "tile": 156}
LFM2_LAYERS = ("full_attention",) * 3 + ("conv",) * 2 + ("full_attention",)
LFM2_VL_PATCHES = 96  # every crop padded to 96 patches: a sample's pixels do not depend on its batch


def tiny_lfm2_vl(num_layers: int = 6, seed: int = 0, layer_types: tuple[str, ...] | None = None):
    """A random LFM2-VL: a 2-layer SigLIP2 (NaFlex) tower over crops of h x w patches of 2 px (a
    variable grid; pixel unshuffle 2: (h / 2) x (w / 2) tokens), an LFM2 LM of hidden 64 whose
    ``layer_types`` mix full attention with gated short convolutions (width 3). The default types
    (:data:`LFM2_LAYERS`: F, F, F, C, C, F, cut or continued with full layers to ``num_layers``) let ATP
    layers 1-3 score from an attention layer and put convolution layers after them."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    layer_types = layer_types or (LFM2_LAYERS + ("full_attention",) * num_layers)[:num_layers]
    text = {
        **_TEXT,
        "model_type": "lfm2",
        "num_hidden_layers": num_layers,
        "layer_types": list(layer_types),
        "vocab_size": 160,
        "conv_L_cache": 3,
        "block_auto_adjust_ff_dim": False,
    }
    vision = {
        "model_type": "siglip2_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 2,
        "num_patches": 64,
        "vision_use_head": False,
    }
    config = Lfm2VlConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=LFM2_VL_IDS["image"],
        projector_hidden_size=64,
        downsample_factor=2,
    )
    model = _build(Lfm2VlForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = 2
    return model


def lfm2_vl_batch(samples: list[list], seeds: list[int] | None = None) -> dict:
    """Left-padded LFM2-VL inputs. Each sample is a list of parts: text id lists and
    ``("image", h, w)`` (one crop of h x w patches, both even: (h / 2) x (w / 2) tokens) or
    ``("image", h, w, rows, cols)`` (rows x cols tiles of 8 x 8 patches and a thumbnail of h x w), written
    as the processor writes them: ``<|image_start|>``, for tiles a ``<|img_row_r_col_c|>`` marker before
    each tile and ``<|img_thumbnail|>`` before the thumbnail, ``<|image_end|>``. The crops of sample i
    (the tiles, then the thumbnail) come from ``seeds[i]``, flattened to patches with their
    ``spatial_shapes`` and ``pixel_attention_mask`` as SigLIP2's NaFlex processor returns them."""
    seeds = list(range(len(samples))) if seeds is None else seeds
    prompts, crops, shapes = [], [], []
    for sample, seed in zip(samples, seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        ids = []
        for part in sample:
            if isinstance(part, list):
                ids += part
                continue
            _, h, w, *tiles = part
            rows, cols = tiles or (0, 0)
            ids.append(LFM2_VL_IDS["start"])
            for tile in range(rows * cols):
                ids += [LFM2_VL_IDS["tile"] + tile] + [LFM2_VL_IDS["image"]] * 16
                shapes.append((8, 8))
            if rows * cols:
                ids.append(LFM2_VL_IDS["thumbnail"])
            ids += [LFM2_VL_IDS["image"]] * (h // 2 * w // 2) + [LFM2_VL_IDS["end"]]
            shapes.append((h, w))
            count = rows * cols + 1
            crops += [torch.randn(LFM2_VL_PATCHES, 3 * 2 * 2, generator=generator) for _ in range(count)]
        prompts.append(ids)
    input_ids, attention_mask = left_pad(prompts)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if crops:
        spatial = torch.tensor(shapes)
        real = torch.arange(LFM2_VL_PATCHES)[None] < spatial.prod(-1)[:, None]
        batch["pixel_values"] = torch.stack(crops) * real[..., None]
        batch["pixel_attention_mask"] = real
        batch["spatial_shapes"] = spatial
    return batch
