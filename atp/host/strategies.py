"""What the decoder layers after an ATP layer receive: two strategies behind one interface.

* :class:`DropStrategy` (``prune_mode="drop"``, inference): pruned tokens are gone. A layer of
  segment ``k`` (the layers from ATP layer ``k`` to the next) gets the kept slots' cos / sin and
  position ids (original positions: the position keeper decides) and the mask rows and columns of
  the kept slots; a decode step gets the key columns its pruned cache layer returns.
* :class:`MaskStrategy` (``prune_mode="mask"``, training): every token stays in place; the
  cumulative (soft) keep mask enters the softmax as a log bias over the visual keys.

Per forward, a layer's arguments are computed once per segment and layer type and shared by the
layers that have them (:func:`segment_kwargs`).
"""

from __future__ import annotations

import torch

from atp.core import step
from atp.core.layout import additive_mask, compact_mask, compact_padding, gather_seq
from atp.core.state import Layout
from atp.host import compat


def segment_kwargs(rt, k: int, kwargs: dict, layer: int) -> dict:
    """The replacements for decoder layer ``layer``'s keyword arguments in segment ``k``."""
    layer_type = rt.adapter.layer_type(layer)
    key = k if layer_type is None else (k, layer_type)
    if key not in rt.step_cache:
        rt.step_cache[key] = STRATEGIES[rt.prefill.mode].layer_kwargs(rt, k, kwargs, layer)
    return rt.step_cache[key]


def segment_inputs(rt, k: int, args: tuple, kwargs: dict, layer: int) -> tuple[tuple, dict]:
    """Decoder layer ``layer``'s arguments in segment ``k``: the segment's keyword replacements and,
    in a drop-mode prefill, the layer's own per-token inputs (the adapter's ``token_arguments``, e.g.
    Gemma 4's per-layer input) gathered at the kept slots like the hidden states.

    Where ``generate`` hands a layer only the last of a forward's tokens (Gemma 4 from its first
    KV-shared layer on, transformers >= 5.24: ``_maybe_slice_kv_shared_inputs``), the replacements'
    last query rows: the last slot is the last token (fillers sit left), and the per-token inputs
    were cut with the hidden states."""
    replaced = segment_kwargs(rt, k, kwargs, layer)
    queries = compat.layer_hidden(args, kwargs).shape[1]
    kwargs.update(last_queries(replaced, queries, rt.seq_dim))
    segment = rt.prefill.segments[k]
    if not rt.decoding and isinstance(segment, Layout) and queries == segment.index.shape[1]:
        args, kwargs = gathered_arguments(rt.adapter.token_arguments, args, kwargs, segment.index)
    return args, kwargs


def last_queries(replaced: dict, queries: int, seq_dim: int) -> dict:
    """``replaced`` for its last ``queries`` queries: the mask's last rows, the last slots' cos / sin
    and ids (unchanged where they have no more)."""

    def last(x, dim: int):
        return x.narrow(dim, x.shape[dim] - queries, queries) if x.shape[dim] > queries else x

    out = dict(replaced)
    mask = out.get(compat.ATTENTION_MASK)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        out[compat.ATTENTION_MASK] = last(mask, 2)
    if compat.POSITION_EMBEDDINGS in out:
        out[compat.POSITION_EMBEDDINGS] = tuple(last(x, seq_dim) for x in out[compat.POSITION_EMBEDDINGS])
    if isinstance(out.get(compat.POSITION_IDS), torch.Tensor):
        out[compat.POSITION_IDS] = last(out[compat.POSITION_IDS], seq_dim)
    return out


def gathered_arguments(names: tuple, args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict]:
    """``args`` / ``kwargs`` with the per-token tensors (B, L, ...) at positions or keywords ``names``
    gathered at the slots ``index`` (B, S) along their sequence axis (1)."""
    args = list(args)
    for name in names:
        where = args if isinstance(name, int) else kwargs
        present = name < len(args) if isinstance(name, int) else name in kwargs
        if present and isinstance(where[name], torch.Tensor):
            where[name] = gather_seq(where[name], index)
    return tuple(args), kwargs


def query_length(kwargs: dict, seq_dim: int) -> int:
    """The tokens of this forward (the rotary cos' sequence axis)."""
    cos = kwargs[compat.POSITION_EMBEDDINGS][0]
    return cos.shape[compat.rotary_seq_dim(cos, seq_dim)]


def stored_window(kwargs: dict, layer: int) -> int | None:
    """The window of the cache layer behind decoder layer ``layer`` (a sliding-window cache layer
    keeps its last ``window - 1`` tokens), or None when it keeps every token (e.g. a
    ``DynamicCache()`` built without the model's config)."""
    cache = compat.find_cache((), kwargs)
    layers = getattr(cache, "layers", None)
    return getattr(layers[layer], "sliding_window", None) if layers and layer < len(layers) else None


class Strategy:
    """How a prefill's decisions reach the layers after them."""

    def layer_kwargs(self, rt, k: int, kwargs: dict, layer: int) -> dict:
        """Replacements for the keyword arguments of decoder layer ``layer`` in segment ``k``."""
        raise NotImplementedError


class MaskStrategy(Strategy):
    """Every token in place; the segment's log keep weights (B, L) bias the visual keys."""

    def layer_kwargs(self, rt, k: int, kwargs: dict, layer: int) -> dict:
        if rt.adapter.recurrent(layer):  # no keys to bias: it runs on the kept tokens (host.recurrent)
            return {}
        p = rt.prefill
        bias = p.segments[k]
        if rt.decoding:
            query_len = query_length(kwargs, rt.seq_dim)
            bias = torch.nn.functional.pad(bias, (0, rt.step_past + query_len - p.length))
            stored = stored_window(kwargs, rt.adapter.kv_layer(layer))
            if stored:  # a sliding-window cache layer returns its last window - 1 keys and the new ones
                bias = bias[:, -(min(rt.step_past, stored - 1) + query_len) :]
        else:
            query_len = bias.shape[1]
        dtype = kwargs[compat.POSITION_EMBEDDINGS][0].dtype
        return {
            compat.ATTENTION_MASK: additive_mask(kwargs.get(compat.ATTENTION_MASK), bias, query_len, dtype)
        }


class DropStrategy(Strategy):
    """The kept slots only: positions, mask rows and columns gathered at them."""

    def layer_kwargs(self, rt, k: int, kwargs: dict, layer: int) -> dict:
        segment = rt.prefill.segments[k]
        if rt.adapter.recurrent(layer):  # a decode step's token needs no mask: its state holds the kept ones
            return {} if rt.decoding or segment is None else self._recurrent(rt, k, kwargs)
        if rt.decoding:
            return self._decode(rt, k, kwargs, layer)
        base = kwargs.get(compat.ATTENTION_MASK)
        if segment is None:  # nothing pruned so far
            return {compat.ATTENTION_MASK: base}
        index, valid = segment.index, segment.valid
        out = {compat.ATTENTION_MASK: compact_mask(base, index, index, valid, q_valid=valid)}
        out.update(rt.keeper.select(kwargs, index, step.shift(rt.prefill, k), rt.seq_dim))
        return out

    @staticmethod
    def _recurrent(rt, k: int, kwargs: dict) -> dict:
        """A recurrent layer's prefill in pruned segment ``k``: the 2D padding mask it multiplies into
        its input, gathered at the kept slots with the fillers (all left, before any real token) zeroed."""
        segment = rt.prefill.segments[k]
        out = dict(rt.keeper.select(kwargs, segment.index, step.shift(rt.prefill, k), rt.seq_dim))
        out[compat.ATTENTION_MASK] = compact_padding(
            kwargs.get(compat.ATTENTION_MASK), segment.index, segment.valid
        )
        return out

    def _decode(self, rt, k: int, kwargs: dict, layer: int) -> dict:
        p = rt.prefill
        segment = p.segments[k]
        base = kwargs.get(compat.ATTENTION_MASK)
        window = rt.adapter.sliding_window(layer)  # what the model attends to
        if isinstance(segment, Layout) and (rt.adapter.layer_type(layer) is not None or window):
            # transformers sizes each type's decode mask by one layer of that type, which may be pruned
            base = self._base(rt, kwargs, window)
            return self._keys(rt, k, kwargs, base, stored_window(kwargs, rt.adapter.kv_layer(layer)))
        if rt.layers[0] == 0 and isinstance(p.segments.get(0), Layout):
            base = self._base(rt, kwargs)  # transformers sized its mask for the pruned layer 0
        if segment is None:
            return {compat.ATTENTION_MASK: base}
        if base is None and not segment.has_fillers:  # one query, every cached key visible
            out = {compat.ATTENTION_MASK: None}
            out.update(rt.keeper.decode(kwargs, step.shift(p, k)[:, -1], rt.step_past))
            return out
        return self._keys(rt, k, kwargs, base)

    @staticmethod
    def _base(rt, kwargs: dict, window: int | None = None):
        """The decode step's mask in original columns, from the 2D padding mask the step received."""
        query_len = query_length(kwargs, rt.seq_dim)
        return step.decode_base(rt.step_padding, rt.step_past, query_len, window, rt.prefill.real.device)

    @staticmethod
    def _keys(rt, k: int, kwargs: dict, base, window: int | None = None) -> dict:
        """A decode step in pruned segment ``k``: the keys the cache returns are the segment's kept
        slots then the tokens decoded since, ``base`` in original columns."""
        p = rt.prefill
        out = dict(rt.keeper.decode(kwargs, step.shift(p, k)[:, -1], rt.step_past))
        query_len = query_length(kwargs, rt.seq_dim)
        k_index, k_valid = step.decode_keys(p.segments[k], p.length, rt.step_past, query_len, window)
        out[compat.ATTENTION_MASK] = compact_mask(base, None, k_index, k_valid)
        return out


STRATEGIES: dict[str, Strategy] = {"drop": DropStrategy(), "mask": MaskStrategy()}
