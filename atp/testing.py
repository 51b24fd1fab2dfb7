"""Tiny random models built from configs (no download), for tests, the demo and benchmarks."""

from __future__ import annotations

import torch


def tiny_llava(
    num_layers: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    seed: int = 0,
    vocab_size: int = 128,
    image_token_id: int = 127,
):
    """A random ``LlavaForConditionalGeneration``: CLIP tower (hidden 32, 2 layers) + Llama LM
    (hidden ``hidden_size``, ``num_layers`` layers, 4 heads, 2 KV heads), eval mode, SDPA.

    ``(image_size / patch_size) ** 2`` visual tokens per image (16 by default; 576 with
    image_size=336, patch_size=14 as in LLaVA-1.5).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
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
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    return model.eval()


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
