"""The vLLM general plugin (entry point ``vllm.general_plugins``): runs in every vLLM process."""

from __future__ import annotations

ARCHITECTURES = {
    name: f"atp_vllm.models:{name}"
    for name in (
        "AtpLlavaForConditionalGeneration",
        "AtpLlavaNextForConditionalGeneration",
        "AtpQwen2VLForConditionalGeneration",
        "AtpQwen2_5_VLForConditionalGeneration",
    )
}


def register() -> None:
    """Register atp's model classes with vLLM; an engine uses one only when its ``hf_overrides`` ask."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
