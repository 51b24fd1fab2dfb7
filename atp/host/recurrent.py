"""Recurrent decoder layers (linear attention) in mask mode: they run on the kept tokens only.

A recurrent layer (Qwen3.5's Gated-DeltaNet) has no keys a log bias could mask: every token it
takes in decays its state and sits in its conv window, even a zeroed one. Drop mode hands it the
kept slots (:mod:`atp.host.strategies`); in mask mode :class:`KeptTokensOnly` does the same around
the layer: it runs on the tokens the cumulative mask keeps (gathered in order, fillers left where
the state is still zero, the 2D padding mask gathered with them) and its output is scattered back,
so a pruned token passes the layer unchanged and the kept ones get drop mode's numbers. With soft
masks (training) the kept tokens' keep weights multiply the layer's input through the same 2D mask
(transformers multiplies it into the hidden states), so the masks get gradients through these
layers too; a token under 0.5 leaves the recurrence as it leaves drop mode's sequence.
"""

from __future__ import annotations

from atp.core import step
from atp.core.layout import compact_padding, gather_seq, mask_to_index, scatter_seq
from atp.host import compat


def install(rt) -> list:
    """One :class:`KeptTokensOnly` per recurrent decoder layer from the first ATP layer on."""
    layers = rt.adapter.decoder_layers()
    return [
        KeptTokensOnly(rt, i, layers[i])
        for i in range(rt.layers[0], rt.num_layers)
        if rt.adapter.recurrent(i)
    ]


class KeptTokensOnly:
    """Hooks on one recurrent decoder layer: in a mask-mode prefill after an ATP layer, the layer
    sees the kept tokens only (B, S, D) and its output goes back to full length (B, L, D)."""

    def __init__(self, rt, layer: int, module):
        self.rt, self.layer = rt, layer
        self.saved = None  # (full hidden (B, L, D), index (B, S), valid (B, S)) of the forward in progress
        self.handles = [
            module.register_forward_pre_hook(self.before, with_kwargs=True),
            module.register_forward_hook(self.after, prepend=True),  # before atp's last-layer hook
        ]

    def before(self, module, args, kwargs):
        self.saved = None
        rt, p = self.rt, self.rt.prefill
        k = rt.segment_of.get(self.layer)
        if p is None or rt.decoding or p.mode != "mask" or k is None:
            return None  # drop mode (the strategies' slots), a decode step (one token), before any ATP layer
        keep = ~p.to_sequence(p.visual_valid & ~p.records[k][0], False)  # (B, L) what drop mode keeps
        if not p.soft and bool(keep.all()):
            return None  # nothing pruned: the layer as it is (keep-everything stays bitwise)
        index, valid = mask_to_index(keep, align="left")
        weight = gather_seq(p.segments[k].exp(), index) if p.soft else None  # soft keep weights (B, S)
        hidden = compat.layer_hidden(args, kwargs)
        kwargs.update(rt.keeper.select(kwargs, index, step.shift(p, k), rt.seq_dim))
        kwargs[compat.ATTENTION_MASK] = compact_padding(
            kwargs.get(compat.ATTENTION_MASK), index, valid, weight
        )
        self.saved = (hidden, index, valid)
        return compat.with_layer_hidden(args, kwargs, gather_seq(hidden, index))

    def after(self, module, args, output):
        if self.saved is None:
            return None
        full, index, valid = self.saved
        self.saved = None
        hidden = output[0] if isinstance(output, tuple) else output
        merged = scatter_seq(full, index, valid, hidden, not bool(valid.all()))  # pruned: unchanged
        return (merged, *output[1:]) if isinstance(output, tuple) else merged

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
