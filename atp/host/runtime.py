"""The per-model runtime: hooks that score, decide and prune inside the language model.

One :class:`Runtime` per attached model; all state lives on it (never global).

* A pre-hook on the multimodal model sees ``input_ids`` and the cache: a prefill (empty
  cache) starts a new :class:`Prefill` state, a decode step reuses it.
* The attention function hands (query, key, mask) of layer ``i_k - 1`` to the scorer.
* A pre-hook on every decoder layer from the first ATP layer on applies the decision of
  ATP layer ``i_k`` and gives each layer what it needs: in ``drop`` mode the kept hidden
  states, cos / sin, position ids and mask rows and columns (decode: key columns only);
  in ``mask`` mode the cumulative mask as a log bias over visual keys.
* A hook on the last decoder layer scatters a pruned output back to full length.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref

import torch

from atp.components.budget_loss import Budget, NormalizedBudgetLoss
from atp.components.position_keeper import KeepPositions
from atp.core.layout import additive_mask, compact_mask, gather_seq, mask_to_index, place, scatter_seq
from atp.core.measure import traced
from atp.core.state import Layout, Prefill
from atp.core.stats import PruningStats, empty_stats
from atp.host import compat
from atp.host.attention import ATTENTION_NAME, COMPILE_MESSAGE, SCORE_REQUEST, register_attention
from atp.policies.base import Policy, PolicyInput
from atp.scorers.base import AttentionView


def joinable(params):
    """The parameters a zero term may read outside their module's forward: not a DTensor (a shard
    of another FSDP unit, one this forward does not gather) and not partitioned by DeepSpeed
    ZeRO-3 (an empty placeholder outside its module's forward; ZeRO-3 reduces a missing gradient
    as zero by itself)."""
    return (p for p in params if type(p).__name__ != "DTensor" and not hasattr(p, "ds_id"))


def zero3_params(module: torch.nn.Module) -> list:
    """``module``'s parameters partitioned by DeepSpeed ZeRO-3."""
    return [param for param in module.parameters() if hasattr(param, "ds_id")]


def check_zero3_modalities(has_images: bool, input_ids) -> None:
    """Under ZeRO-3 every module gathers its weights with a collective when it runs, so a rank
    whose micro-batch has images (the vision tower and ATP heads run) and one without would wait
    in different collectives. Agree on it first (two tiny all-reduces) and raise instead."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flags = torch.tensor([float(has_images), -float(has_images)], device=input_ids.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] != -flags[1]:
        raise RuntimeError(
            "under DeepSpeed ZeRO-3 the ranks' micro-batches of one step must all have images or all have "
            "none (each module gathers its partitioned weights with a collective when it runs, so mixed "
            "steps would hang); group batches by modality: `atp train --group-by-modality-length` or "
            "AtpTrainer(group_by_modality_length=True), or use FSDP (configs/accelerate/fsdp.yaml), "
            "which trains mixed steps"
        )


class Runtime:
    """Hooks and state for one attached model."""

    def __init__(
        self,
        adapter,
        policy: Policy,
        layers: tuple[int, ...],
        prune_mode: str,
        hard_masks,
        budget: Budget | None = None,
        observers: list | None = None,
        keeper=None,
        budget_loss=None,
    ):
        self.adapter = adapter
        self.policy = policy
        self.layers = layers
        self.prune_mode = prune_mode
        self.hard_masks = hard_masks
        self.keeper = keeper or KeepPositions(adapter)
        self.atp_index = {layer: k for k, layer in enumerate(layers)}
        # layer -> index k of the last ATP layer at or before it (absent before the first)
        self.segment_of = {
            i: max(k for k, atp_layer in enumerate(layers) if atp_layer <= i)
            for i in range(layers[0], len(adapter.decoder_layers()))
        }
        self.score_index = {layer - 1: k for k, layer in enumerate(layers)} if policy.scorer else {}
        self.num_layers = len(adapter.decoder_layers())
        self.seq_dim = adapter.position_seq_dim()
        self.prefill: Prefill | None = None
        self.pending: dict | None = None  # the multimodal model's inputs of a prefill in progress
        self.latest_pixels = None  # the last images the vision tower saw
        self.labels = None  # labels of the outer model's forward in progress
        self.decoding = False
        self.replaying = False  # re-running a hook for a gradient-checkpointing recompute
        self.generate_step: int | None = None  # forwards so far of the generate call in progress
        self.step_past = 0
        self.step_padding = None
        self.step_cache: dict = {}
        self.last_stats: PruningStats | None = None
        self.hooks: list = []
        self.observers = observers or []  # atp_observe implementations, resolved at attach
        self.budget = budget or Budget()
        self.budget_loss = (budget_loss or NormalizedBudgetLoss)(self.budget.target_tokens)
        self.warned_hard = False
        self.pruned_caches = weakref.WeakSet()  # caches filled by an ATP prefill (weakly held)
        self.kernel_targets: list | None = None  # layers marked for hub kernels (compat.kernel_targets)
        self.budget_scale = 1.0  # a Trainer sets 1 / accumulation steps when the LM loss is pre-scaled

    # copies and pickles ----------------------------------------------------------------
    _TRANSIENT = {
        "prefill": None,
        "pending": None,
        "latest_pixels": None,
        "labels": None,
        "decoding": False,
        "replaying": False,
        "generate_step": None,
        "step_past": 0,
        "step_padding": None,
        "step_cache": dict,
        "pruned_caches": weakref.WeakSet,
        "kernel_targets": None,  # modules of this model: found again in a copy
    }

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle, ``torch.save`` of the model) carries the policy and
        settings, not the state of a forward in progress or the caches of earlier prefills."""
        return {name: value for name, value in self.__dict__.items() if name not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name, fresh in self._TRANSIENT.items():
            setattr(self, name, fresh() if callable(fresh) else fresh)
        register_attention()  # an unpickled model in a new process needs atp's attention function

    # install / remove ------------------------------------------------------------------
    def install(self) -> None:
        decoder = self.adapter.decoder_layers()
        self.hooks.append(
            self.adapter.multimodal_model().register_forward_pre_hook(
                self._on_model_forward, with_kwargs=True
            )
        )
        first = 0 if self.keeper.from_layer_zero else self.layers[0]
        hooked = sorted(set(self.score_index) | set(range(first, self.num_layers)))
        for i in hooked:
            hook = functools.partial(self._on_layer_input, i)
            self.hooks.append(decoder[i].register_forward_pre_hook(hook, with_kwargs=True))
        self.hooks.append(
            decoder[self.num_layers - 1].register_forward_hook(self._on_last_output, with_kwargs=True)
        )
        self.hooks.append(
            self.adapter.language_model().register_forward_pre_hook(
                self._on_language_model_forward, with_kwargs=True
            )
        )
        self.hooks.append(self.adapter.model.register_forward_hook(self._on_model_output, with_kwargs=True))
        self.hooks.append(
            self.adapter.model.register_forward_pre_hook(
                self._on_outer_forward, with_kwargs=True, prepend=True
            )
        )
        tower = self.adapter.vision_tower()
        if tower is not None:
            self.hooks.append(tower.register_forward_pre_hook(self._on_vision_input, with_kwargs=True))
        self.hooks.extend(self.adapter.install(self))

    def _on_outer_forward(self, module, args, kwargs):
        self.labels = kwargs.get("labels")

    def _on_vision_input(self, module, args, kwargs):
        self.latest_pixels = args[0] if args else kwargs.get("pixel_values")

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.prefill = None

    # multimodal model: prefill or decode? ------------------------------------------------
    @traced("atp.model_input")
    def _on_model_forward(self, module, args, kwargs):
        if (
            torch.compiler.is_compiling()
            or getattr(self.adapter.model, "_compiled_call_impl", None) is not None
        ):
            raise RuntimeError(COMPILE_MESSAGE)
        self.pending = None  # whatever an earlier, failed call left
        if module.training and torch.is_grad_enabled() and zero3_params(self.policy):
            check_zero3_modalities(kwargs.get("pixel_values") is not None, kwargs.get("input_ids"))
        labels, self.labels = self.labels, None  # from the outer model's forward (the loss reads them)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.find_cache(args, kwargs)
        if cache is not None and not compat.is_dynamic_cache(cache, self.adapter.cache_layers):
            raise ValueError(
                f"atp supports transformers' DynamicCache only, got {type(cache).__name__} "
                "(StaticCache, sliding-window, offloaded and quantized caches are not supported yet); "
                "use the default cache (cache_implementation=None)"
            )
        past = compat.cache_length(cache) if cache is not None else 0
        self.step_cache = {}
        if input_ids is None:
            raise ValueError(
                "atp needs input_ids to find the visual tokens; pass input_ids (and pixel_values) "
                "instead of inputs_embeds"
            )
        step = self.generate_step  # forwards of the generate call in progress so far (None: not in one)
        if step is not None:
            self.generate_step = step + 1
        if past == 0:  # the layout is read when the language model starts (embeddings are known)
            self._check_settings(kwargs)
            self._check_new_prompt(cache, step, input_ids, kwargs.get("attention_mask"))
            self.decoding = False
            self.prefill = None
            kept = (
                "attention_mask",
                "pixel_values",
                "pixel_values_videos",
                "image_grid_thw",
                "video_grid_thw",
                "image_sizes",
            )
            self.pending = {"input_ids": input_ids, **{name: kwargs.get(name) for name in kept}}
            self.pending["labels"] = kwargs.get("labels", labels)
            self.pending["images_given"] = any(
                kwargs.get(name) is not None for name in self.adapter.visual_inputs
            ) or any(kwargs.get(name) for name in compat.ENCODED_VISUAL_ARGUMENTS)
            return None
        if any(kwargs.get(name) is not None for name in self.adapter.visual_inputs) or any(
            kwargs.get(name) for name in compat.ENCODED_VISUAL_ARGUMENTS
        ):
            raise ValueError(
                "visual inputs arrived after the prefill (chunked prefill or images in a continuation); "
                "atp needs the whole multimodal prompt in one forward: put every image in the first forward "
                "(a new prompt), and continue a cache with text only (no pixel_values)"
            )
        if self.prefill is None and cache in self.pruned_caches:
            raise ValueError(
                "this KV cache was pruned by an earlier prefill, but the last forward (without images) "
                "replaced atp's state; continue a cache right after its own prefill"
            )
        if self.prefill is not None:
            past = self._original_past(cache, past)
            self._check_cache(cache, past, input_ids.shape[0])
            if past != compat.cache_length(cache) and kwargs.get(compat.POSITION_IDS) is None:
                raise ValueError(
                    "layer 0's cache was pruned by a pre-LLM policy, so decode steps need position_ids "
                    "(and the growing 2D attention_mask), as generate passes them"
                )
        self.decoding = True
        self.step_past = past
        self.step_padding = kwargs.get("attention_mask")  # 2D, original columns (layer 0 may be pruned)
        return None

    def _check_settings(self, kwargs: dict) -> None:
        """What ``attach`` checked, checked again where it is used (every prefill): settings changed
        since (the attention implementation, the config, hub kernels swapped by ``train()`` /
        ``eval()``) and per-call outputs the pruned layers cannot give."""
        implementation = compat.attention_implementation(self.adapter.text_config())
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"the language model's attention implementation is {implementation!r}, set after atp.attach "
                f"(atp scores and prunes through its own {ATTENTION_NAME!r}); call handle.remove(), change the "
                "implementation, and attach again"
            )
        self.adapter.check()
        self.adapter.check_call(kwargs)
        if "kernels" in sys.modules:  # nothing can swap a layer for a hub kernel without it
            if self.kernel_targets is None:  # the marked layers, found once (not at every prefill)
                self.kernel_targets = compat.kernel_targets(self.adapter.model)
            compat.check_hub_kernels(self.adapter.model, self.kernel_targets)

    def _check_new_prompt(self, cache, step: int | None, input_ids, attention_mask) -> None:
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

    def _check_decode_cache(self, layer: int, segment: int, args, kwargs) -> None:
        """A decode step's layer must see the cache atp pruned, at the width its masks assume."""
        cache = compat.find_cache(args, kwargs)
        if cache is None:
            raise compat.CompatibilityError(f"decoder layer {layer} received no KV cache in a decode step")
        p = self.prefill
        kept = p.segments.get(segment)
        width = (kept.index.shape[1] if isinstance(kept, Layout) else p.length) + self.step_past - p.length
        held = compat.cache_length(cache, layer)
        if held != width:
            raise compat.CompatibilityError(
                f"decoder layer {layer}'s KV cache holds {held} tokens, but atp's decode mask for it covers "
                f"{width} (the cache was not pruned the way atp pruned the prefill)"
            )

    def _original_past(self, cache, past: int) -> int:
        """Tokens seen so far in original coordinates. Layer 0's cache holds them all unless a
        pre-LLM policy pruned it; then its prefill width tells how many were removed."""
        p = self.prefill
        first = p.segments.get(0) if self.layers[0] == 0 else None
        if isinstance(first, Layout):
            return p.length + past - first.index.shape[1]
        return past

    @traced("atp.language_model_input")
    def _on_language_model_forward(self, module, args, kwargs):
        """Prefill: the adapter reads the visual layout from the multimodal model's inputs and
        the language model's (``inputs_embeds``, M-RoPE ``position_ids``)."""
        pending, self.pending = self.pending, None
        if pending is None:
            cache = compat.find_cache(args, kwargs)
            if cache is None or compat.cache_length(cache) == 0:  # the language model called on its own
                self.prefill, self.decoding, self.step_cache = None, False, {}
            elif self.decoding and self.prefill is not None:
                self._check_step_mask(args, kwargs)
            return None
        input_ids = pending["input_ids"]
        layout = self.adapter.visual_layout(input_ids, pending, kwargs)
        if bool(layout.visual.any()) and not pending["images_given"] and self.latest_pixels is None:
            raise ValueError(
                f"the prompt has {int(layout.visual.sum())} image placeholder tokens but no images reached the "
                "model (no pixel_values); pass the images, or leave the placeholders out of a text prompt"
            )
        if pending.get("pixel_values") is None and self.latest_pixels is not None:
            pending["pixel_values"] = self.latest_pixels  # generate encodes the images before the prefill
        self.latest_pixels = None
        self.prefill = self._start_prefill(layout, pending)
        if self.prefill is None:
            self.last_stats = empty_stats(self.layers, self.num_layers, input_ids.shape[0], input_ids.device)
        return None

    def check_continuation(self, args: tuple, kwargs: dict) -> None:
        """Before ``generate`` runs on a cache whose layer 0 a pre-LLM policy pruned (drop mode):
        generate counts a cache by its layer 0 (``cache.get_seq_length()``) to find the new tokens
        and positions, so it must be given the new tokens alone, with the 2D attention mask over
        every token. Refused before generate prepares anything (Qwen's ``rope_deltas``, say)."""
        p = self.prefill
        cache = next((kwargs[name] for name in compat.CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
        first = p.segments.get(0) if p is not None and self.layers[0] == 0 else None
        if cache is None or not isinstance(first, Layout) or p.cache is None or p.cache() is not cache:
            return
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        mask = kwargs.get("attention_mask")
        seen = self._original_past(cache, compat.cache_length(cache))
        if ids is not None and mask is not None and mask.dim() == 2 and mask.shape[1] == seen + ids.shape[1]:
            return
        raise ValueError(
            f"generate cannot continue this KV cache as called: a pre-LLM policy pruned its layer 0 (drop mode), "
            f"and generate counts the cache by that layer, so it would take tokens the cache holds for new ones. "
            f"Pass only the tokens after the first {seen} (input_ids[:, {seen}:]) with the 2D attention_mask over "
            "all of them, or attach with prune_mode='mask'"
        )

    def _check_step_mask(self, args, kwargs) -> None:
        """A continuation's 2D attention mask covers every token seen and the new ones (transformers'
        contract). Checked before any layer writes to the cache: after a pre-LLM policy pruned layer 0
        in drop mode, ``generate`` counts the cache by that layer and would feed tokens it holds."""
        padding = self.step_padding
        hidden = kwargs.get("inputs_embeds")
        hidden = kwargs.get("input_ids", args[0] if args else None) if hidden is None else hidden
        if padding is None or padding.dim() != 2 or hidden is None:
            return
        seen, new = self.step_past, hidden.shape[1]
        if padding.shape[1] == seen + new:
            return
        hint = ""
        first = self.prefill.segments.get(0) if self.layers[0] == 0 else None
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

    def _check_cache(self, cache, past: int, batch: int) -> None:
        p = self.prefill
        ok = p.visual_valid.shape[0] == batch and past >= p.length
        ok = ok and (p.cache is None or p.cache() is cache)
        last = p.segments.get(len(self.layers) - 1)
        if ok and isinstance(last, Layout):
            ok = compat.cache_length(cache, self.layers[-1]) == last.index.shape[1] + past - p.length
        if not ok:
            raise ValueError(
                "this KV cache does not continue the last prefill atp pruned (another cache object, or its "
                "batch or lengths differ); continue the cache of the last prefill, right after it (beam "
                "search, cache reordering and caches built elsewhere are not supported yet)"
            )

    def _start_prefill(self, layout, inputs: dict) -> Prefill | None:
        if not bool(layout.visual.any()):
            return None
        mode = self.prune_mode
        training = self.policy.training
        if mode == "auto":
            mode = "mask" if training else "drop"
        if mode == "mask" and self.keeper.drop_only:
            raise ValueError(
                f"positions={self.keeper.name!r} renumbers removed tokens, so it needs prune_mode='drop' "
                "(mask mode keeps every token in place; the model is in training mode here)"
            )
        soft = mode == "mask" and (not self.hard_masks if self.hard_masks is not None else training)
        learning = (
            training and torch.is_grad_enabled() and any(p.requires_grad for p in self.policy.parameters())
        )
        layers = self.adapter.decoder_layers()
        if soft and learning and compat.reentrant_checkpointing(layers):
            raise ValueError(
                "soft masks need non-reentrant gradient checkpointing: call "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
        if learning and not soft and not self.warned_hard:
            self.warned_hard = True
            warnings.warn(
                f"training with prune_mode={mode!r} and binary masks: the threshold heads get no gradient; "
                "use prune_mode='mask' (or 'auto') with soft masks to train them",
                UserWarning,
                stacklevel=2,
            )
        spatial_options = (
            getattr(self.policy, "lambda_sample", 1.0),
            getattr(self.policy, "spatial_strides", None),
        )
        prefill = Prefill.start(layout, inputs, mode, soft, *spatial_options)
        prefill.replays = torch.is_grad_enabled() and compat.checkpointing_replays_hooks(layers)
        return prefill

    # decoder layers -------------------------------------------------------------------
    @traced("atp.layer_input")
    def _on_layer_input(self, layer: int, module, args, kwargs):
        p = self.prefill
        if p is None:
            if len(self.pruned_caches):
                cache = compat.find_cache(args, kwargs)
                if cache in self.pruned_caches and compat.cache_length(cache, layer) > 0:
                    raise compat.CompatibilityError(
                        f"decoder layer {layer} continues a KV cache atp pruned, but atp took this forward "
                        "for a new prompt without images (the multimodal model received no cache it could see)"
                    )
            if layer == self.layers[0] and module.training and torch.is_grad_enabled():
                return self._join_backward(args, kwargs)
            return None
        segment = self.segment_of.get(layer)
        if self.decoding:
            if segment is None:
                return None
            self._check_decode_cache(layer, segment, args, kwargs)
            kwargs.update(self._segment_kwargs(segment, kwargs, layer))
            return args, kwargs
        if layer in p.snapshots:  # a gradient-checkpointing recompute
            return self._replay(layer, p, segment, args, kwargs)
        if p.replays:
            p.snapshots[layer] = (p.snapshot(), self.step_cache.copy())
        cache = compat.find_cache(args, kwargs)
        if cache is not None:
            if compat.cache_length(cache, layer) > 0:
                raise compat.CompatibilityError(
                    f"atp took this forward for a prefill, but decoder layer {layer}'s KV cache already holds "
                    f"{compat.cache_length(cache, layer)} tokens (the model received a cache atp did not see)"
                )
            if p.cache is None:
                p.cache = weakref.ref(cache)  # decoding must continue this very cache
                self.pruned_caches.add(cache)
        return self._prefill_layer_input(layer, p, segment, args, kwargs)

    def _join_backward(self, args, kwargs):
        """A training batch without images: add a zero that depends on every trainable ATP
        parameter and every trainable parameter outside the language model (the projector, a
        vision tower that trains) to the hidden states entering the first ATP layer.

        FSDP needs both: each sharded decoder layer gathers its weights again in the backward
        pass, so every rank must run the backward through the same layers (in a batch with images
        the soft masks reach them); and a sharded unit reduces the gradients its parameters have,
        so a projector without a gradient on one rank only is a collective of another size. Either
        way a rank would wait for a collective the others never start. The values are unchanged;
        the unused parameters get a zero gradient instead of none (as under DeepSpeed ZeRO).
        """
        language = {id(param) for param in self.adapter.language_model().parameters()}
        params = [param for param in joinable(self.policy.parameters()) if param.requires_grad]
        atp = {id(param) for param in params}
        params += [
            param
            for param in joinable(self.adapter.multimodal_model().parameters())
            if param.requires_grad and id(param) not in language | atp
        ]
        if not params:
            return None
        hidden = compat.layer_hidden(args, kwargs)
        zero = sum(param.sum() * 0.0 for param in params)
        return compat.with_layer_hidden(args, kwargs, hidden + zero.to(hidden.dtype))

    def _replay(self, layer: int, p: Prefill, segment, args, kwargs):
        """Run a layer's prefill hook again on the state it first saw: the recompute performs the
        same differentiable ops (as checkpointing requires), and the current state is kept."""
        current = (p.snapshot(), self.step_cache, self.last_stats)
        state, step_cache = p.snapshots[layer]
        p.restore(state)
        self.step_cache, self.replaying = step_cache.copy(), True
        try:
            return self._prefill_layer_input(layer, p, segment, args, kwargs)
        finally:
            p.restore(current[0])
            self.step_cache, self.last_stats, self.replaying = current[1], current[2], False

    def _prefill_layer_input(self, layer: int, p: Prefill, segment, args, kwargs):
        if self.keeper.from_layer_zero:  # positions that differ from layer 0 on, computed once
            if "positions" not in self.step_cache:
                self.step_cache["positions"] = self.keeper.prefill(
                    kwargs[compat.POSITION_EMBEDDINGS], p, kwargs.get(compat.POSITION_IDS)
                )
            kwargs[compat.POSITION_EMBEDDINGS] = self.step_cache["positions"]
        if layer in self.atp_index:
            hidden = self._prune(self.atp_index[layer], compat.layer_hidden(args, kwargs))
            args, kwargs = compat.with_layer_hidden(args, kwargs, hidden)
        if segment is not None:
            kwargs.update(self._segment_kwargs(segment, kwargs, layer))
        if layer in self.score_index:
            kwargs[SCORE_REQUEST] = functools.partial(self._score, p, self.score_index[layer])
        return args, kwargs

    @traced("atp.last_output")
    def _on_last_output(self, module, args, kwargs, output):
        p = self.prefill
        if p is None or self.decoding:
            return None
        recompute = p.finished  # a gradient-checkpointing recompute: the same ops, results dropped
        if recompute and not p.replays:
            return None
        p.finished = True
        stats = self._stats()
        if not recompute:
            self.last_stats = stats
            p.context["inputs"] = {}  # pixels are not needed after the prefill
        if p.layout is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = scatter_seq(p.full_hidden, p.layout.index, p.layout.valid, hidden, p.layout.has_fillers)
        if not p.replays:
            p.full_hidden = None
        return (full, *output[1:]) if isinstance(output, tuple) else full

    def _on_model_output(self, module, args, kwargs, output):
        """Training with labels: add the weighted budget terms to ``outputs.loss``."""
        as_tuple = isinstance(output, tuple)
        if as_tuple:  # return_dict=False: the loss leads the tuple when labels were given
            loss = output[0] if kwargs.get("labels") is not None else None
        else:
            loss = getattr(output, "loss", None)
        if not (module.training and self.budget.add_to_loss and loss is not None and self.last_stats):
            return None
        losses = self.last_stats.losses
        weighted = self.budget.lambda_atp * losses["atp"] + self.budget.lambda_target * losses["target"]
        # every ATP parameter joins the graph, also in batches without images (DDP needs it)
        touch = sum((param.sum() * 0.0 for param in joinable(self.policy.parameters())), loss.new_zeros(()))
        if zero3_params(self.policy) and loss.grad_fn is None:
            # ZeRO-3 reduces missing gradients as zeros by itself, but its engine refuses a loss
            # without a graph (a text-only batch with the language model frozen): give it one
            touch = touch + loss.new_zeros((), requires_grad=True)
        total = loss + (weighted * self.budget_scale + touch).to(loss.dtype)
        if as_tuple:
            return (total, *output[1:])
        output.loss = total
        return output

    # scoring and deciding ---------------------------------------------------------------
    @traced("atp.score")
    @torch.no_grad()  # scores are detached from the LM (and nothing is saved for a checkpoint recompute)
    def _score(self, p: Prefill, k: int, query, key, attention_mask, scale) -> None:
        if k in p.decided:  # a gradient-checkpointing recompute: the decision is already taken
            return
        view = p.view
        weight = p.weight.gather(1, view["visual_ids"]) * view["visual_valid"]
        attention = AttentionView(
            query=query,
            key=key,
            attention_mask=attention_mask,
            scale=float(scale),
            visual_slots=view["visual_slots"],
            visual_valid=view["visual_valid"],
            visual_weight=weight,
            instruction_slots=view["instruction_slots"],
            instruction_valid=view["instruction_valid"],
            last_slot=view["last_slot"],
            visual_ids=view["visual_ids"],
            context=p.context,
        )
        scores = self.policy.scorer.score(attention)
        width = p.visual_valid.shape[1]
        present = p.weight > 0  # == p.keep with binary masks; soft ones keep hard-dropped tokens
        p.scores[k] = {  # original visual order; 0 at dead tokens in both modes
            name: place(value, view["visual_ids"], view["visual_valid"], width, 0.0) * present
            for name, value in scores.items()
        }

    @traced("atp.prune")
    def _prune(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        p = self.prefill
        p.decided.add(k)
        decision = self.policy.decide(
            PolicyInput(
                index=k,
                layer=self.layers[k],
                scores=p.scores.pop(k, {}),
                live=p.keep,
                weight=p.weight,
                spatial=p.spatial,
                num_visual=p.num_visual,
                grids=p.context["grids"],
            )
        )
        mask = torch.where(p.protected, 1.0, decision.mask.float() * p.visual_valid)  # read outputs stay
        keep = p.keep & (mask > 0.5)
        if decision.merge is not None:  # kept tokens become the mean of the tokens merged into them
            own = torch.arange(mask.shape[1], device=mask.device).expand_as(decision.merge)
            hidden = self._merge(p, hidden, torch.where(p.protected, own, decision.merge))
        weight = p.weight * mask if p.soft else keep.float()
        thresholds = {n: t.detach() for n, t in decision.thresholds.items()}
        reasons = {n: r.detach().bool() & keep for n, r in decision.reasons.items()}
        if reasons:  # no .any() here: a device sync per ATP layer for a picture's legend
            reasons["read"] = p.protected & keep
        p.records.append((keep, weight, thresholds, reasons))
        for observe in self.observers if not self.replaying else ():
            observe(
                event={
                    "model": self.adapter.model,
                    "index": k,
                    "layer": self.layers[k],
                    "keep": keep,
                    "mask": mask.detach(),
                    "thresholds": thresholds,
                    "num_visual": p.num_visual,
                }
            )
        changed = not torch.equal(keep, p.keep)
        p.keep, p.weight = keep, weight
        if p.mode == "mask":
            log_weight = torch.where(weight > 0, weight.clamp_min(1e-30).log(), float("-inf"))
            p.segments[k] = p.to_sequence(log_weight, 0.0)
            return hidden
        if changed:
            keep_sequence = ~p.to_sequence(p.visual_valid & ~keep, False)
            old = p.layout
            if old is None:
                p.full_hidden = hidden
            else:
                p.full_hidden = scatter_seq(p.full_hidden, old.index, old.valid, hidden, old.has_fillers)
            p.layout = Layout(*mask_to_index(keep_sequence, align="left"))
            hidden = gather_seq(p.full_hidden, p.layout.index)
            p.update_view()
        p.segments[k] = p.layout
        return hidden

    def _merge(self, p: Prefill, hidden: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
        """Average the hidden states of each merge group (B, N) -> visual index of its target,
        into the target token. Works on the current layout (full sequence or kept slots)."""
        if p.layout is not None:
            raise ValueError("merging policies act on the full sequence (before any pruning)")
        positions, valid = p.visual_positions, p.visual_valid
        width = hidden.shape[-1]
        visual = gather_seq(hidden, positions)  # (B, N, D)
        target = torch.where(valid, merge, merge.new_full((), positions.shape[1]))
        rows = torch.arange(visual.shape[0], device=hidden.device)[:, None].expand_as(target)
        sums = torch.zeros(visual.shape[0], positions.shape[1] + 1, width, device=hidden.device)  # float32
        sums = sums.index_put((rows, target), visual.float(), accumulate=True)
        counts = torch.zeros(visual.shape[0], positions.shape[1] + 1, device=hidden.device)
        counts = counts.index_put((rows, target), valid.float(), accumulate=True)
        means = (sums[:, :-1] / counts[:, :-1, None].clamp_min(1)).to(hidden.dtype)
        is_target = (counts[:, :-1] > 0) & valid
        merged = torch.where(is_target[..., None], means, visual)  # means already in the hidden dtype
        return scatter_seq(hidden, positions, valid, merged)

    # what each layer of a segment receives ------------------------------------------------
    def _segment_kwargs(self, k: int, kwargs, layer: int) -> dict:
        """Per forward, computed once per segment and layer type and shared by those layers."""
        layer_type = self.adapter.layer_type(layer)
        key = k if layer_type is None else (k, layer_type)
        if key in self.step_cache:
            return self.step_cache[key]
        p = self.prefill
        segment = p.segments[k]
        window = self.adapter.sliding_window(layer)  # what the model attends to
        stored = self._stored_window(kwargs, layer) if self.decoding else None  # what its cache layer keeps
        base = kwargs.get(compat.ATTENTION_MASK)
        if self.decoding and isinstance(segment, Layout) and (layer_type is not None or window):
            # transformers sizes each type's decode mask by one layer of that type, which may be pruned
            base = self._decode_base(kwargs, window)
            return self._cache_step(key, self._decode_kwargs(k, kwargs, base, stored))
        if self.decoding and self.layers[0] == 0 and isinstance(p.segments.get(0), Layout):
            base = self._decode_base(kwargs)  # transformers sized its mask for the pruned layer 0
        out = {}
        if p.mode == "mask":
            bias = segment
            if self.decoding:
                query_len = _query_length(kwargs, self.seq_dim)
                bias = torch.nn.functional.pad(bias, (0, self.step_past + query_len - p.length))
                if stored:  # a sliding-window cache layer returns its last window - 1 keys and the new ones
                    bias = bias[:, -(min(self.step_past, stored - 1) + query_len) :]
            query_len = bias.shape[1] if not self.decoding else _query_length(kwargs, self.seq_dim)
            dtype = kwargs[compat.POSITION_EMBEDDINGS][0].dtype
            out[compat.ATTENTION_MASK] = additive_mask(base, bias, query_len, dtype)
        elif segment is None:  # drop mode, nothing pruned so far
            out[compat.ATTENTION_MASK] = base
        elif self.decoding and base is None and not segment.has_fillers:
            out[compat.ATTENTION_MASK] = None  # one query, every cached key visible
            out.update(self.keeper.decode(kwargs, self._shift(k)[:, -1], self.step_past))
        elif self.decoding:
            out = self._decode_kwargs(k, kwargs, base)
        else:
            index, valid = segment.index, segment.valid
            out[compat.ATTENTION_MASK] = compact_mask(base, index, index, valid, q_valid=valid)
            out.update(self.keeper.select(kwargs, index, self._shift(k), self.seq_dim))
        return self._cache_step(key, out)

    def _cache_step(self, key, out: dict) -> dict:
        self.step_cache[key] = out
        return out

    @staticmethod
    def _stored_window(kwargs, layer: int) -> int | None:
        """The window of the cache layer behind decoder layer ``layer`` (a sliding-window cache layer
        keeps its last ``window - 1`` tokens), or None when it keeps every token (e.g. a
        ``DynamicCache()`` built without the model's config)."""
        cache = compat.find_cache((), kwargs)
        layers = getattr(cache, "layers", None)
        return getattr(layers[layer], "sliding_window", None) if layers and layer < len(layers) else None

    def _decode_kwargs(self, k: int, kwargs, base, window: int | None = None) -> dict:
        """A decode step in pruned segment ``k``: the keys the cache returns are the segment's kept
        slots then the tokens decoded since (for a cache layer with a ``window``, the last
        ``window - 1`` of those before this step: what it keeps), ``base`` in original columns."""
        p = self.prefill
        segment = p.segments[k]
        out = dict(self.keeper.decode(kwargs, self._shift(k)[:, -1], self.step_past))
        batch = segment.index.shape[0]
        query_len = _query_length(kwargs, self.seq_dim)
        new = torch.arange(p.length, self.step_past + query_len, device=segment.index.device)
        k_index = torch.cat([segment.index, new.expand(batch, -1)], dim=1)
        k_valid = torch.cat([segment.valid, torch.ones_like(new, dtype=torch.bool).expand(batch, -1)], dim=1)
        if window:
            returned = min(k_index.shape[1] - query_len, window - 1) + query_len
            k_index, k_valid = k_index[:, -returned:], k_valid[:, -returned:]
        out[compat.ATTENTION_MASK] = compact_mask(base, None, k_index, k_valid)
        return out

    def _decode_base(self, kwargs, window: int | None = None) -> torch.Tensor | None:
        """The decode step's mask in original columns, from the 2D padding mask (or None); with a
        ``window``, keys at ``window`` or more original positions before the query are masked."""
        padding = self.step_padding
        query_len = _query_length(kwargs, self.seq_dim)
        if padding is None or padding.dim() != 2:
            if query_len == 1 and not window:
                return None
            device = self.prefill.real.device
            rows = torch.arange(self.step_past, self.step_past + query_len, device=device)
            columns = torch.arange(self.step_past + query_len, device=device)
            allowed = columns[None, :] <= rows[:, None]
            if window:
                allowed = allowed & (columns[None, :] > rows[:, None] - window)
            return allowed[None, None]
        total = padding.shape[1]
        rows = torch.arange(total - query_len, total, device=padding.device)
        columns = torch.arange(total, device=padding.device)
        allowed = columns[None, :] <= rows[:, None]
        if window:
            allowed = allowed & (columns[None, :] > rows[:, None] - window)
        return (padding.bool()[:, None, None, :] & allowed[None, None]).expand(-1, 1, query_len, total)

    def _shift(self, k: int) -> torch.Tensor:
        """LongTensor (B, L): visual tokens pruned up to ATP layer k before each position (inclusive)."""
        p = self.prefill
        if k not in p.shifts:  # once per prefill: decode steps reuse it
            pruned = p.to_sequence(p.visual_valid & ~p.records[k][0], False)
            p.shifts[k] = pruned.long().cumsum(dim=1)
        return p.shifts[k]

    # statistics -----------------------------------------------------------------------
    def _stats(self) -> PruningStats:
        p = self.prefill
        masks = [record[0] for record in p.records]
        names = sorted({name for record in p.records for name in record[2]})
        thresholds = {
            name: torch.stack([rec[2][name] for rec in p.records], dim=1)
            for name in names
            if all(name in rec[2] for rec in p.records)
        }
        soft_masks = [record[1] for record in p.records]
        # the budget counts what inference keeps (the hard masks), with the soft masks' gradient
        counting = [keep.float() + (soft - soft.detach()) for keep, soft in zip(masks, soft_masks)]
        return PruningStats(
            layers=self.layers,
            num_layers=self.num_layers,
            num_visual=p.num_visual,
            kept=torch.stack([mask.sum(dim=1) for mask in masks], dim=1),
            masks=masks,
            soft_masks=soft_masks,
            thresholds=thresholds,
            losses=self.budget_loss(counting, p.num_visual, self.layers, self.num_layers),
            reasons=[record[3] for record in p.records],
            grids=p.context.get("grids", []),
        )


def _query_length(kwargs, seq_dim: int) -> int:
    cos = kwargs[compat.POSITION_EMBEDDINGS][0]
    return cos.shape[compat.rotary_seq_dim(cos, seq_dim)]
