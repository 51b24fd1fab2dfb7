"""What kind of call a forward is: a new prompt (prefill), a decode step, a continuation.

* The multimodal model's forward (:func:`model_input`) sees ``input_ids`` and the cache: an empty
  cache starts a prefill (its inputs wait for the language model), a filled one is a decode step or
  a continuation of the last prefill's cache (checked in :mod:`atp.host.checks`).
* The language model's forward (:func:`language_model_input`) reads the visual layout (the adapter
  knows the family) and starts the :class:`~atp.core.state.Prefill` state.
"""

from __future__ import annotations

import warnings

import torch

from atp.core.state import Prefill
from atp.core.stats import empty_stats
from atp.host import checks, compat
from atp.host.attention import COMPILE_MESSAGE
from atp.host.distributed import check_zero3_modalities, zero3_params

# the multimodal model's arguments a prefill keeps for the adapter and the scorers
PREFILL_INPUTS = (
    "attention_mask",
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "image_sizes",
    "image_position_ids",
)


def model_input(rt, module, args, kwargs) -> None:
    """The multimodal model's forward: a prefill (empty cache) or a decode step."""
    if torch.compiler.is_compiling() or getattr(rt.adapter.model, "_compiled_call_impl", None) is not None:
        raise RuntimeError(COMPILE_MESSAGE)
    rt.pending = None  # whatever an earlier, failed call left
    if module.training and torch.is_grad_enabled() and zero3_params(rt.policy):
        check_zero3_modalities(kwargs.get("pixel_values") is not None, kwargs.get("input_ids"))
    labels, rt.labels = rt.labels, None  # from the outer model's forward (the loss reads them)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = compat.find_cache(args, kwargs)
    if cache is not None and not compat.is_dynamic_cache(cache, rt.adapter.cache_layers):
        raise ValueError(
            f"atp supports transformers' DynamicCache only, got {type(cache).__name__} "
            "(StaticCache, sliding-window, offloaded and quantized caches are not supported yet); "
            "use the default cache (cache_implementation=None)"
        )
    past = compat.cache_length(cache) if cache is not None else 0
    rt.step_cache = {}
    if input_ids is None:
        raise ValueError(
            "atp needs input_ids to find the visual tokens; pass input_ids (and pixel_values) "
            "instead of inputs_embeds"
        )
    step = rt.generate_step  # forwards of the generate call in progress so far (None: not in one)
    if step is not None:
        rt.generate_step = step + 1
    images_given = any(kwargs.get(name) is not None for name in rt.adapter.visual_inputs) or any(
        kwargs.get(name) for name in compat.ENCODED_VISUAL_ARGUMENTS
    )
    if past == 0:  # the layout is read when the language model starts (embeddings are known)
        checks.check_settings(rt, kwargs)
        checks.check_new_prompt(cache, step, input_ids, kwargs.get("attention_mask"))
        rt.decoding = False
        rt.prefill = None
        rt.pending = {"input_ids": input_ids, **{name: kwargs.get(name) for name in PREFILL_INPUTS}}
        rt.pending["labels"] = kwargs.get("labels", labels)
        rt.pending["images_given"] = images_given
        return
    if images_given:
        raise ValueError(
            "visual inputs arrived after the prefill (chunked prefill or images in a continuation); "
            "atp needs the whole multimodal prompt in one forward: put every image in the first forward "
            "(a new prompt), and continue a cache with text only (no pixel_values)"
        )
    if rt.prefill is None and cache in rt.pruned_caches:
        raise ValueError(
            "this KV cache was pruned by an earlier prefill, but the last forward (without images) "
            "replaced atp's state; continue a cache right after its own prefill"
        )
    if rt.prefill is not None:
        past = checks.original_past(rt, past)
        checks.check_cache(rt, cache, past, input_ids.shape[0])
        if past != compat.cache_length(cache) and kwargs.get(compat.POSITION_IDS) is None:
            raise ValueError(
                "layer 0's cache was pruned by a pre-LLM policy, so decode steps need position_ids "
                "(and the growing 2D attention_mask), as generate passes them"
            )
    rt.decoding = True
    rt.step_past = past
    rt.step_padding = kwargs.get("attention_mask")  # 2D, original columns (layer 0 may be pruned)


def language_model_input(rt, args, kwargs) -> None:
    """Prefill: the adapter reads the visual layout from the multimodal model's inputs and the
    language model's (``inputs_embeds``, M-RoPE ``position_ids``)."""
    pending, rt.pending = rt.pending, None
    if pending is None:
        cache = compat.find_cache(args, kwargs)
        if cache is None or compat.cache_length(cache) == 0:  # the language model called on its own
            rt.prefill, rt.decoding, rt.step_cache = None, False, {}
        elif rt.decoding and rt.prefill is not None:
            checks.check_step_mask(rt, args, kwargs)
        return
    input_ids = pending["input_ids"]
    layout = rt.adapter.visual_layout(input_ids, pending, kwargs)
    if bool(layout.visual.any()) and not pending["images_given"] and rt.latest_pixels is None:
        raise ValueError(
            f"the prompt has {int(layout.visual.sum())} image placeholder tokens but no images reached the "
            "model (no pixel_values); pass the images, or leave the placeholders out of a text prompt"
        )
    if pending.get("pixel_values") is None and rt.latest_pixels is not None:
        pending["pixel_values"] = rt.latest_pixels  # generate encodes the images before the prefill
    rt.latest_pixels = None
    rt.prefill = start_prefill(rt, layout, pending)
    if rt.prefill is None:
        rt.last_stats = empty_stats(rt.layers, rt.num_layers, input_ids.shape[0], input_ids.device)


def start_prefill(rt, layout, inputs: dict) -> Prefill | None:
    """The prefill state (None without visual tokens), its mode and whether its masks are soft."""
    if not bool(layout.visual.any()):
        return None
    mode = rt.prune_mode
    training = rt.policy.training
    if mode == "auto":
        mode = "mask" if training else "drop"
    if mode == "mask" and rt.keeper.drop_only:
        raise ValueError(
            f"positions={rt.keeper.name!r} renumbers removed tokens, so it needs prune_mode='drop' "
            "(mask mode keeps every token in place; the model is in training mode here)"
        )
    soft = mode == "mask" and (not rt.hard_masks if rt.hard_masks is not None else training)
    learning = training and torch.is_grad_enabled() and any(p.requires_grad for p in rt.policy.parameters())
    layers = rt.adapter.decoder_layers()
    if soft and learning and compat.reentrant_checkpointing(layers):
        raise ValueError(
            "soft masks need non-reentrant gradient checkpointing: call "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
        )
    if learning and not soft and not rt.warned_hard:
        rt.warned_hard = True
        warnings.warn(
            f"training with prune_mode={mode!r} and binary masks: the threshold heads get no gradient; "
            "use prune_mode='mask' (or 'auto') with soft masks to train them",
            UserWarning,
            stacklevel=2,
        )
    spatial_options = (getattr(rt.policy, "lambda_sample", 1.0), getattr(rt.policy, "spatial_strides", None))
    prefill = Prefill.start(layout, inputs, mode, soft, *spatial_options)
    prefill.replays = torch.is_grad_enabled() and compat.checkpointing_replays_hooks(layers)
    return prefill
