"""vLLM model classes that prune with atp: vLLM's own classes with the language model's forward run
by :class:`atp_vllm.host.VllmHost`. Chosen per engine with ``hf_overrides={"architectures": [...],
"atp": {...}}`` (:mod:`atp_vllm.settings`)."""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from atp_vllm.host import VllmHost
from atp_vllm.settings import build_policy, read_settings


def check_engine(vllm_config) -> None:
    """Refuse, at engine start, the settings under which atp cannot follow the requests."""
    cache = vllm_config.cache_config
    if getattr(cache, "enable_prefix_caching", False):
        raise ValueError(
            "atp prunes each prompt's KV cache, so a cached prefix would hold another prompt's kept tokens: "
            "start the engine with enable_prefix_caching=False (vllm serve --no-enable-prefix-caching)"
        )
    scheduler, model = vllm_config.scheduler_config, vllm_config.model_config
    if scheduler.max_num_batched_tokens < model.max_model_len:
        raise ValueError(
            f"max_num_batched_tokens={scheduler.max_num_batched_tokens} is below max_model_len="
            f"{model.max_model_len}, so chunked prefill may split a multimodal prompt, which atp scores in one "
            "forward: set max_num_batched_tokens >= max_model_len"
        )
    if not model.enforce_eager:
        raise ValueError(
            "atp-vllm runs in eager mode only so far (the pruned layers' shapes change per request): "
            "start the engine with enforce_eager=True (vllm serve --enforce-eager)"
        )


class AtpLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 with atp's in-LLM pruning."""

    requires_raw_input_tokens = True  # the host finds the image placeholders in the token ids

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_engine(vllm_config)
        config = vllm_config.model_config.hf_config
        layers = self.language_model.model.layers
        settings = read_settings(config, len(layers))
        vision = config.vision_config
        num_visual = (vision.image_size // vision.patch_size) ** 2
        policy = build_policy(settings, len(layers), num_visual)
        names = [layer.self_attn.attn.layer_name for layer in layers]
        self.atp = VllmHost(layers, names, policy, settings.layers, config.image_token_index)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        model = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = model.embed_input_ids(input_ids)
        return self.atp.forward(model, input_ids, positions, inputs_embeds)
