"""The checks of a call against the state atp keeps: never silently wrong.

A forward that atp cannot place (a cache it did not prune, a continuation whose mask does not cover
the tokens seen, settings changed since ``attach``) raises with the cause and what to do instead,
before any layer writes to the cache.
"""

from __future__ import annotations

import sys

from atp.core.state import Layout
from atp.host import compat
from atp.host.attention import ATTENTION_NAME


def original_past(rt, past: int) -> int:
    """Tokens seen so far in original coordinates. Layer 0's cache holds them all unless a pre-LLM
    policy pruned it; then its prefill width tells how many were removed."""
    p = rt.prefill
    first = p.segments.get(0) if rt.layers[0] == 0 else None
    if isinstance(first, Layout):
        return p.length + past - first.index.shape[1]
    return past


def check_settings(rt, kwargs: dict) -> None:
    """What ``attach`` checked, checked again where it is used (every prefill): settings changed
    since (the attention implementation, the config, hub kernels swapped by ``train()`` /
    ``eval()``) and per-call outputs the pruned layers cannot give."""
    implementation = compat.attention_implementation(rt.adapter.text_config())
    if implementation != ATTENTION_NAME:
        raise ValueError(
            f"the language model's attention implementation is {implementation!r}, set after atp.attach "
            f"(atp scores and prunes through its own {ATTENTION_NAME!r}); call handle.remove(), change the "
            "implementation, and attach again"
        )
    rt.adapter.check()
    rt.adapter.check_call(kwargs)
    if "kernels" in sys.modules:  # nothing can swap a layer for a hub kernel without it
        if rt.kernel_targets is None:  # the marked layers, found once (not at every prefill)
            rt.kernel_targets = compat.kernel_targets(rt.adapter.model)
        compat.check_hub_kernels(rt.adapter.model, rt.kernel_targets)


def check_new_prompt(cache, step: int | None, input_ids, attention_mask) -> None:
    """A forward that looks like a new prompt (no cache, or an empty one) must not continue
    earlier tokens: atp would take it for a new prefill and prune (or count) nothing."""
    where = "among the multimodal model's arguments" if cache is None else "(an empty one arrived)"
    if step:
        raise compat.CompatibilityError(
            f"generate is at decode step {step}, but atp found no KV cache with the prompt {where}"
        )
    if (
        attention_mask is not None
        and attention_mask.dim() == 2
        and attention_mask.shape[1] > input_ids.shape[1]
    ):
        raise compat.CompatibilityError(
            f"the attention mask covers {attention_mask.shape[1]} tokens and input_ids only "
            f"{input_ids.shape[1]}, so this forward continues earlier tokens, but atp found no KV cache "
            f"with them {where}"
        )


def check_decode_cache(rt, layer: int, segment: int, args, kwargs) -> None:
    """A decode step's layer must see the cache atp pruned, at the width its masks assume."""
    cache = compat.find_cache(args, kwargs)
    if cache is None:
        raise compat.CompatibilityError(f"decoder layer {layer} received no KV cache in a decode step")
    if rt.adapter.recurrent(layer) or rt.adapter.kv_layer(layer) != layer:  # a fixed-size state: no width
        return  # to compare; or keys another layer stored, checked at that layer this step (same segment)
    p = rt.prefill
    kept = p.segments.get(segment)
    width = (kept.index.shape[1] if isinstance(kept, Layout) else p.length) + rt.step_past - p.length
    held = compat.cache_length(cache, layer)
    if held != width:
        raise compat.CompatibilityError(
            f"decoder layer {layer}'s KV cache holds {held} tokens, but atp's decode mask for it covers "
            f"{width} (the cache was not pruned the way atp pruned the prefill)"
        )


def check_continuation(rt, args: tuple, kwargs: dict) -> None:
    """Before ``generate`` runs on a cache whose layer 0 a pre-LLM policy pruned (drop mode):
    generate counts a cache by its layer 0 (``cache.get_seq_length()``) to find the new tokens
    and positions, so it must be given the new tokens alone, with the 2D attention mask over
    every token. Refused before generate prepares anything (Qwen's ``rope_deltas``, say)."""
    p = rt.prefill
    cache = next((kwargs[name] for name in compat.CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    first = p.segments.get(0) if p is not None and rt.layers[0] == 0 else None
    if cache is None or not isinstance(first, Layout) or p.cache is None or p.cache() is not cache:
        return
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    mask = kwargs.get("attention_mask")
    seen = original_past(rt, compat.cache_length(cache))
    if ids is not None and mask is not None and mask.dim() == 2 and mask.shape[1] == seen + ids.shape[1]:
        return
    raise ValueError(
        f"generate cannot continue this KV cache as called: a pre-LLM policy pruned its layer 0 (drop mode), "
        f"and generate counts the cache by that layer, so it would take tokens the cache holds for new ones. "
        f"Pass only the tokens after the first {seen} (input_ids[:, {seen}:]) with the 2D attention_mask over "
        "all of them, or attach with prune_mode='mask'"
    )


def check_step_mask(rt, args, kwargs) -> None:
    """A continuation's 2D attention mask covers every token seen and the new ones (transformers'
    contract). Checked before any layer writes to the cache: after a pre-LLM policy pruned layer 0
    in drop mode, ``generate`` counts the cache by that layer and would feed tokens it holds."""
    padding = rt.step_padding
    hidden = kwargs.get("inputs_embeds")
    hidden = kwargs.get("input_ids", args[0] if args else None) if hidden is None else hidden
    if padding is None or padding.dim() != 2 or hidden is None:
        return
    seen, new = rt.step_past, hidden.shape[1]
    if padding.shape[1] == seen + new:
        return
    hint = ""
    first = rt.prefill.segments.get(0) if rt.layers[0] == 0 else None
    if isinstance(first, Layout):
        hint = (
            ". Layer 0's cache holds only the prompt tokens a pre-LLM policy kept, and generate (like "
            "cache.get_seq_length()) counts the cache by it: give generate only the tokens after the "
            f"first {seen} (input_ids[:, {seen}:]) with the attention_mask over all of them, or attach with "
            "prune_mode='mask'"
        )
    raise ValueError(
        f"the attention_mask covers {padding.shape[1]} tokens, but the KV cache continues {seen} (counted before "
        f"atp pruned it) and this forward adds {new}: a continuation's mask covers every token seen and the "
        f"new ones{hint}"
    )


def check_cache(rt, cache, past: int, batch: int) -> None:
    p = rt.prefill
    ok = p.visual_valid.shape[0] == batch and past >= p.length
    ok = ok and (p.cache is None or p.cache() is cache)
    last = p.segments.get(len(rt.layers) - 1)
    # the first layer from the last ATP layer on that caches keys (recurrent layers hold a state)
    keyed = next((i for i in range(rt.layers[-1], rt.num_layers) if not rt.adapter.recurrent(i)), None)
    if ok and isinstance(last, Layout) and keyed is not None:
        ok = compat.cache_length(cache, rt.adapter.kv_layer(keyed)) == last.index.shape[1] + past - p.length
    if not ok:
        raise ValueError(
            "this KV cache does not continue the last prefill atp pruned (another cache object, or its "
            "batch or lengths differ); continue the cache of the last prefill, right after it (beam "
            "search, cache reordering and caches built elsewhere are not supported yet)"
        )
