"""The transformers host's hooks: they find each forward's tensors and hand them to the core.

One :class:`Runtime` per attached model; all state lives on it (never global). Each hook is short
and hands off: to :mod:`atp.host.calls` (what kind of call), :mod:`atp.core.step` (the ATP layer's
step), :mod:`atp.host.strategies` (what later layers receive), :mod:`atp.host.distributed`
(training on several processes, checkpoint replays, the budget terms). docs/architecture.md draws it.
"""

from __future__ import annotations

import functools
import weakref

import torch

from atp.components.budget_loss import Budget, NormalizedBudgetLoss
from atp.components.position_keeper import KeepPositions
from atp.core import step
from atp.core.measure import traced
from atp.core.state import Prefill
from atp.core.stats import PruningStats
from atp.host import calls, checks, compat, distributed
from atp.host.attention import SCORE_REQUEST, register_attention
from atp.host.strategies import segment_inputs
from atp.policies.base import Policy


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
        self._fresh_call_state()
        self.last_stats: PruningStats | None = None
        self.hooks: list = []
        self.observers = observers or []  # atp_observe implementations, resolved at attach
        self.budget = budget or Budget()
        self.budget_loss = (budget_loss or NormalizedBudgetLoss)(self.budget.target_tokens)
        self.warned_hard = False
        self.budget_scale = 1.0  # a Trainer sets 1 / accumulation steps when the LM loss is pre-scaled

    # the state of the calls in progress (not copied) ----------------------------------
    _TRANSIENT = {
        "prefill": None,  # the Prefill state of the last prefill (kept for its decode steps)
        "pending": None,  # the multimodal model's inputs of a prefill in progress
        "latest_pixels": None,  # the last images the vision tower saw
        "labels": None,  # labels of the outer model's forward in progress
        "decoding": False,
        "replaying": False,  # re-running a hook for a gradient-checkpointing recompute
        "generate_step": None,  # forwards so far of the generate call in progress
        "step_past": 0,  # tokens seen before this decode step (original coordinates)
        "step_padding": None,  # the decode step's 2D attention mask
        "step_cache": dict,  # a forward's per-segment layer arguments
        "pruned_caches": weakref.WeakSet,  # caches filled by an ATP prefill (weakly held)
        "kernel_targets": None,  # layers marked for hub kernels: modules of this model, found again in a copy
    }

    def _fresh_call_state(self) -> None:
        for name, fresh in self._TRANSIENT.items():
            setattr(self, name, fresh() if callable(fresh) else fresh)

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle, ``torch.save`` of the model) carries the policy and
        settings, not the state of a forward in progress or the caches of earlier prefills."""
        return {name: value for name, value in self.__dict__.items() if name not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fresh_call_state()
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

    # the multimodal model and the language model: what kind of call? ---------------------
    @traced("atp.model_input")
    def _on_model_forward(self, module, args, kwargs):
        calls.model_input(self, module, args, kwargs)

    @traced("atp.language_model_input")
    def _on_language_model_forward(self, module, args, kwargs):
        calls.language_model_input(self, args, kwargs)

    def check_continuation(self, args: tuple, kwargs: dict) -> None:
        """Before ``generate`` continues a cache whose layer 0 a pre-LLM policy pruned (drop mode)."""
        checks.check_continuation(self, args, kwargs)

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
                return distributed.join_backward(self, args, kwargs)
            return None
        segment = self.segment_of.get(layer)
        if self.decoding:
            if segment is None:
                return None
            checks.check_decode_cache(self, layer, segment, args, kwargs)
            return segment_inputs(self, segment, args, kwargs, layer)
        if layer in p.snapshots:  # a gradient-checkpointing recompute
            return distributed.replay(self, layer, p, segment, args, kwargs)
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
        return self.prefill_layer_input(layer, p, segment, args, kwargs)

    def prefill_layer_input(self, layer: int, p: Prefill, segment, args, kwargs):
        """A decoder layer's input in a prefill: the ATP step at an ATP layer, the segment's
        arguments after one, the scorer's request at a layer before one."""
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
            args, kwargs = segment_inputs(self, segment, args, kwargs, layer)
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
        hidden = output[0] if isinstance(output, tuple) else output
        if p.layout is None or hidden.shape[1] != p.layout.index.shape[1]:  # or generate kept the last token
            return None
        full = step.unpruned(p, hidden)
        if not p.replays:
            p.full_hidden = None
        return (full, *output[1:]) if isinstance(output, tuple) else full

    def _on_model_output(self, module, args, kwargs, output):
        """Training with labels: add the weighted budget terms to ``outputs.loss``."""
        return distributed.add_budget_terms(self, module, kwargs, output)

    # the core's step --------------------------------------------------------------------
    @traced("atp.score")
    def _score(self, p: Prefill, k: int, query, key, attention_mask, scale) -> None:
        step.score(self.policy.scorer, p, k, query, key, attention_mask, scale)

    @traced("atp.prune")
    def _prune(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        observe = self._observe if self.observers and not self.replaying else None
        return step.prune(self.policy, self.prefill, k, self.layers[k], hidden, observe)

    def _observe(self, event: dict) -> None:
        for observe in self.observers:
            observe(event={"model": self.adapter.model, **event})

    def _stats(self) -> PruningStats:
        return step.collect_stats(self.prefill, self.layers, self.num_layers, self.budget_loss)
