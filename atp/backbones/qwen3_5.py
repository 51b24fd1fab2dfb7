"""Qwen3.5 (dense and MoE): Qwen3-VL's visual layout in a hybrid language model whose layers differ
in kind: full attention (a gated output) or Gated-DeltaNet linear attention (a recurrent state).

The released models repeat three linear layers and one full one (``layer_types``, or
``full_attention_interval=4``). What atp does with them (docs/backbones.md, "Qwen3.5"):

* **ATP layers.** Scores come from the queries and keys of the layer before an ATP layer, and only a
  full-attention layer has them: with a policy that scores, that layer must be a full-attention one
  (4, 8, 12, ... in the released pattern), else attach refuses, naming the layers that work. Every
  ATP layer after layer 0 also comes after the first full-attention layer: transformers counts the
  cache by that layer (``get_seq_length`` in 5.18, the full layers' masks later), so it must hold
  every token.
* **Linear layers after an ATP layer** run on the kept tokens only, in both modes: their state then
  sums fewer tokens, and decode steps continue from it. Drop mode hands them the kept slots with
  the 2D padding mask gathered (fillers left, before any real token, where the state is still
  zero); mask mode gathers them around the layer (:mod:`atp.host.recurrent`). A zeroed token is
  not a removed one here (it decays the state and sits in the conv window), so mask mode is not a
  log bias on these layers.
* **The cache**: full layers cache the kept tokens' keys; linear layers a fixed-size conv window and
  recurrent state (no keys), so pruning shrinks only the full layers' KV cache.
"""

from __future__ import annotations

from atp.backbones.qwen3_vl import Qwen3VLAdapter
from atp.host import recurrent

FULL = "full_attention"


class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)
    cache_layers = ("DynamicLayer", "LinearAttentionLayer")

    def layer_types(self) -> list[str]:
        types = getattr(self.text_config(), "layer_types", None)
        if not types:
            raise ValueError(f"this {self.family} model's text config has no layer_types")
        return list(types)

    def layer_type(self, layer: int) -> str | None:
        return self.layer_types()[layer]

    def recurrent(self, layer: int) -> bool:
        return self.layer_types()[layer] != FULL

    def uses_sliding_window(self) -> bool:
        return False  # full and linear layers only

    def check(self) -> None:
        unknown = sorted(set(self.layer_types()) - {FULL, "linear_attention"})
        if unknown:
            raise ValueError(
                f"this {self.family} model has layer types {unknown}; atp follows full_attention and "
                "linear_attention layers only"
            )

    def check_layers(self, layers: tuple[int, ...]) -> None:
        types = self.layer_types()
        first = types.index(FULL) if FULL in types else len(types)
        early = [layer for layer in layers if 0 < layer <= first]
        if early:
            raise ValueError(
                f"ATP layer(s) {early} come at or before layer {first}, the first full-attention layer of this "
                f"{self.family} model: transformers counts the KV cache by that layer, so it must see every "
                f"token. Put ATP layers after it (right after a full-attention layer for a policy that "
                f"scores: {', '.join(map(str, self.after_full()[:6]))}, ...)"
            )

    def after_full(self) -> list[int]:
        """The layers right after a full-attention layer: the ATP layers a scoring policy can use."""
        return [i + 1 for i, kind in enumerate(self.layer_types()[:-1]) if kind == FULL]

    def install(self, runtime) -> list:
        return [*super().install(runtime), *recurrent.install(runtime)]


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)

    def check(self) -> None:
        super().check()
        if getattr(self.text_config(), "output_router_logits", False):
            raise ValueError(
                "this Qwen3.5 MoE model returns router logits (output_router_logits=True): transformers' "
                "load-balancing loss reads one attention mask for every layer, which pruned layers do not "
                "match; set model.config.text_config.output_router_logits = False to attach atp"
            )

    def check_call(self, kwargs: dict) -> None:
        if kwargs.get("output_router_logits"):
            raise ValueError(
                "output_router_logits=True is not supported with atp on this Qwen3.5 MoE model: transformers' "
                "load-balancing loss reads one attention mask for every layer, which pruned layers do not "
                "match; call the model without output_router_logits"
            )
