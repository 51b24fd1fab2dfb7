"""Requests -> batches, prompts and images (no lmms-eval import: pure bookkeeping)."""

from __future__ import annotations

import json


def batches(requests, batch_size: int, settings_index: int | None):
    """``(indices, gen_kwargs)`` per batch: requests with equal generation settings (at
    ``args[settings_index]``; None for log-likelihood requests) together, longest context first
    (so a batch's padding stays small), each index answered once."""
    generation = settings_index is not None
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        settings = request.args[settings_index] if generation else None
        key = json.dumps(settings, sort_keys=True, default=str) if generation else ""
        groups.setdefault(key, []).append(index)
    for key, indices in groups.items():
        indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
        gen_kwargs = requests[indices[0]].args[settings_index] if generation else {}
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size], (gen_kwargs if key else {})


def visuals_of(model, arg) -> list:
    """The request's images (RGB), from its ``doc_to_visual`` and the task's document."""
    doc_to_visual = arg[2]
    if doc_to_visual is None:
        return []
    visuals = doc_to_visual(model._doc(arg)) or []
    images = []
    for visual in visuals:
        if not hasattr(visual, "convert"):
            raise ValueError(
                f"the atp model takes images (PIL) from doc_to_visual, got {type(visual).__name__}"
            )
        images.append(visual.convert("RGB"))
    return images


def prompt_for(processor, context: str, num_images: int) -> tuple[str, list[dict]]:
    """The processor's chat template over one user turn: ``num_images`` images, then ``context``."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            "the checkpoint's processor has no chat template; the atp model builds prompts with it "
            "(save one with processor.chat_template = ... and processor.save_pretrained(folder))"
        )
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": context}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), messages
