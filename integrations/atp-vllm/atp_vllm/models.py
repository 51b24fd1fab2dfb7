"""vLLM model classes that prune with atp: vLLM's own classes with the language model's forward run
by :class:`atp_vllm.host.VllmHost`. Chosen per engine with ``hf_overrides={"architectures": [...],
"atp": {...}}`` (:mod:`atp_vllm.settings`)."""

from __future__ import annotations

import torch
from vllm.config import CompilationMode, CUDAGraphMode
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

from atp.backbones.base import runs
from atp.core.state import VisualLayout
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
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError(
            "atp scores the visual tokens from all attention heads of a layer, and under tensor or pipeline "
            "parallelism a process holds only some heads or layers: use tensor_parallel_size=1 and "
            "pipeline_parallel_size=1 (data parallel replicas are fine)"
        )
    scheduler = vllm_config.scheduler_config
    if scheduler.enable_chunked_prefill or getattr(scheduler, "long_prefill_token_threshold", 0):
        raise ValueError(
            "chunked prefill may split a prompt when other requests share the step's token budget, and atp "
            "scores and prunes a whole prompt in one forward: start the engine with enable_chunked_prefill=False "
            "(vllm serve --no-enable-chunked-prefill) and no long_prefill_token_threshold"
        )
    compiling = vllm_config.compilation_config
    if compiling.mode not in (
        CompilationMode.NONE,
        CompilationMode.DYNAMO_TRACE_ONCE,
        CompilationMode.VLLM_COMPILE,
    ):
        raise ValueError(
            f"compilation mode {compiling.mode.name} compiles the whole model forward as one graph, and atp's "
            "pruning steps between the layers are per-request Python: use vLLM's default compilation "
            "(mode VLLM_COMPILE) or enforce_eager=True"
        )
    if getattr(compiling, "cudagraph_mode", None) not in (None, CUDAGraphMode.NONE):
        raise ValueError(
            "CUDA graphs replay a captured forward with its shapes and attention metadata fixed, and atp prunes "
            "each request inside the forward: start the engine with compilation_config={'cudagraph_mode': 'NONE'} "
            '(vllm serve -cc \'{"cudagraph_mode": "NONE"}\') or enforce_eager=True'
        )


def compile_options(vllm_config) -> dict | None:
    """``torch.compile``'s backend and options for the language model's layer runs, as vLLM would
    compile the model (its backend and inductor settings), or None in eager mode."""
    compiling = vllm_config.compilation_config
    if vllm_config.model_config.enforce_eager or compiling.mode == CompilationMode.NONE:
        return None
    backend = compiling.backend or "inductor"
    if backend != "inductor":
        return {"backend": backend}
    return {"backend": backend, "options": dict(compiling.inductor_compile_config)}


def llava_layout(config):
    """LLaVA-1.5: each run of image placeholders is one image's (side x side) grid."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    token = config.image_token_index

    def read(input_ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor) -> VisualLayout:
        visual = input_ids == token
        count = int(visual.sum())
        if count % (side * side):
            raise ValueError(
                f"{count} image tokens are not whole {side} x {side} grids; atp-vllm reads LLaVA-1.5"
            )
        return VisualLayout(
            visual[None], torch.zeros_like(visual)[None], [[(side, side)] * (count // (side * side))]
        )

    return read


def qwen_layout(config):
    """Qwen2-VL / Qwen2.5-VL: as atp's Qwen adapter reads it, the grids from the M-RoPE positions."""
    from atp.backbones.qwen2_vl import Qwen2VLAdapter

    image, video = config.image_token_id, config.video_token_id
    markers = (config.vision_start_token_id, config.vision_end_token_id)

    def read(input_ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor) -> VisualLayout:
        visual = (input_ids == image) | (input_ids == video)
        structural = (input_ids == markers[0]) | (input_ids == markers[1])
        grids = (
            Qwen2VLAdapter._grids_from_positions(visual[None], positions[:, None])
            if bool(visual.any())
            else [[]]
        )
        return VisualLayout(visual[None], structural[None], grids)

    return read


def llava_next_layout(config, newline: torch.Tensor):
    """LLaVA-NeXT: as atp's LLaVA-NeXT adapter reads it. Each image is its base grid, then its
    unpadded high-resolution grid with the learned ``image_newline`` closing every row; the
    newlines are found by their embedding, are structural (never pruned), and give the grid."""
    from atp.backbones.llava_next import newline_positions, tiled_grids

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    token = config.image_token_index

    def read(input_ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor) -> VisualLayout:
        tokens = (input_ids == token)[None]
        structural = newline_positions({"inputs_embeds": embeds[None]}, tokens, newline)
        flags = structural[0].tolist()
        grids = [grid for start, stop in runs(tokens)[0] for grid in tiled_grids(flags[start:stop], side)]
        return VisualLayout(tokens & ~structural, structural, [grids])

    return read


class AtpPruning:
    """What every atp model class adds to vLLM's: the host, built and checked at engine start."""

    requires_raw_input_tokens = True  # the host finds the image placeholders in the token ids

    def _attach_atp(self, vllm_config, read_layout, family: str, num_visual: int | None) -> None:
        check_engine(vllm_config)
        config = vllm_config.model_config.hf_config
        layers = self.language_model.model.layers
        identity = {
            "family": family,
            "hidden_size": config.get_text_config().hidden_size,
            "num_layers": len(layers),
            "num_visual_tokens": num_visual,
        }
        settings = read_settings(config, len(layers), identity)
        policy = build_policy(settings, len(layers), num_visual)
        names = [layer.self_attn.attn.layer_name for layer in layers]
        self.atp = VllmHost(layers, names, policy, settings.layers, read_layout, compile_options(vllm_config))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        model = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = model.embed_input_ids(input_ids)
        return self.atp.forward(model, input_ids, positions, inputs_embeds)


class AtpLlavaForConditionalGeneration(AtpPruning, LlavaForConditionalGeneration):
    """LLaVA-1.5 with atp's in-LLM pruning."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self._attach_atp(vllm_config, llava_layout(config), "llava", int(config.image_seq_length))


class AtpLlavaNextForConditionalGeneration(AtpPruning, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (LLaVA-1.6) with atp's in-LLM pruning; the newline features are never pruned."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy == "full" and getattr(config.vision_config, "model_type", "") == "clip_vision_model":
            raise ValueError(
                "vision_feature_select_strategy='full' with a CLIP tower keeps the CLS token in every tile, "
                "so the tiles are not grids of patches; atp-vllm serves the 'default' strategy"
            )
        self._attach_atp(vllm_config, llava_next_layout(config, self.image_newline), "llava_next", None)


class AtpQwen2VLForConditionalGeneration(AtpPruning, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with atp's in-LLM pruning (M-RoPE positions kept)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_atp(vllm_config, qwen_layout(vllm_config.model_config.hf_config), "qwen2_vl", None)


class AtpQwen2_5_VLForConditionalGeneration(AtpPruning, Qwen2_5_VLForConditionalGeneration):  # noqa: N801 (vLLM's name)
    """Qwen2.5-VL with atp's in-LLM pruning (M-RoPE positions kept)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_atp(vllm_config, qwen_layout(vllm_config.model_config.hf_config), "qwen2_5_vl", None)
