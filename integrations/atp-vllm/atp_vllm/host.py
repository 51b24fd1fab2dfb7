"""atp's second host: the pruning core (:mod:`atp.core.step`) run inside vLLM's language model forward.

vLLM runs the tokens of every scheduled request as one flat batch (T rows) and gives each attention
layer its metadata (query starts, sequence lengths, block table, slot mapping) through the forward
context. This host, per forward:

* splits the batch into requests (the metadata's query starts) and recognises a new multimodal
  prompt (no context, image placeholders in its tokens) as an atp prefill: one
  :class:`~atp.core.state.Prefill` per request;
* at layer ``i_k - 1`` keeps the attention's queries and keys (after RoPE), and at ATP layer ``i_k``
  scores and prunes each prefill with the core (:func:`atp.core.step.score`,
  :func:`atp.core.step.prune`), gathers the kept rows of the residual stream and their original
  positions (positions are kept);
* gives the layers of each pruned segment compacted attention metadata: fewer query rows, shorter
  sequences, and slots that write the kept tokens' keys contiguously from the start of the request's
  blocks, so that a decode step reads exactly the kept keys and the tokens decoded since;
* remembers each pruned request by its first KV block (the model never sees request ids) so that its
  decode steps use the same compacted lengths;
* scatters the final states back to the batch's rows (the runner reads each request's last row).

What it cannot follow (prefix caching, a chunked prefill that splits a multimodal prompt, images
in a continuation) is refused, never served unpruned or wrong (:mod:`atp_vllm.models` checks the
engine settings at start).
"""

from __future__ import annotations

import dataclasses
import logging
import types

import torch

from atp.core import step
from atp.core.state import Prefill

logger = logging.getLogger("vllm.atp")  # under vLLM's logger: its handler and level, in every process


@dataclasses.dataclass
class Request:
    """One request of a forward: its rows ``[start, end)`` in the flat batch, its sequence length."""

    index: int
    start: int
    end: int
    seq_len: int
    key: int  # its first KV block: the same for every step of the request
    prefill: Prefill | None = None  # a multimodal prompt atp prunes in this forward
    pruned: list[int] | None = None  # a pruned request decoding: tokens removed per ATP segment

    @property
    def query_len(self) -> int:
        return self.end - self.start


class LayerRuns:
    """Runs of consecutive decoder layers ``[start, stop)``: eager, or, when the engine compiles its
    model (``compile_options``: ``torch.compile``'s backend and options), one compiled function per
    run. Between ATP layers the token count changes per request, so each run is compiled with a
    dynamic token dimension (at most two graphs: one token, and more) and the pruning steps
    themselves (scoring, gathers, the compacted metadata) stay eager between the runs."""

    def __init__(self, layers, compile_options: dict | None):
        self.layers = layers
        self.compile_options = compile_options
        self.runs: dict[tuple[int, int], object] = {}
        self.codes: dict[tuple[int, int], types.CodeType] = {}  # each compiled run's own code object

    def __call__(self, start: int, stop: int, positions, hidden, residual):
        if stop <= start:
            return hidden, residual
        run = self.runs.get((start, stop))
        if run is None:
            run = self.runs[(start, stop)] = self._build(start, stop)
        return run(positions, hidden, residual)

    def _build(self, start: int, stop: int):
        layers = list(self.layers[start:stop])

        def run(positions, hidden, residual):
            for layer in layers:
                hidden, residual = layer(positions, hidden, residual)
            return hidden, residual

        if self.compile_options is None:
            return run
        # a code object of its own: dynamo keeps compiled graphs (and counts recompilations) per code
        # object, and every run would otherwise share ``run``'s
        code = run.__code__.replace(co_name=f"atp_layers_{start}_{stop}")
        run = types.FunctionType(code, run.__globals__, code.co_name, run.__defaults__, run.__closure__)
        self.codes[(start, stop)] = code
        return torch.compile(run, dynamic=True, fullgraph=True, **self.compile_options)


class VllmHost:
    """Prunes one vLLM language model (its decoder ``layers`` and attention layer names)."""

    def __init__(
        self,
        layers,
        attention_names: list[str],
        policy,
        atp_layers: tuple[int, ...],
        read_layout,
        compile_options: dict | None = None,
    ):
        self.layers = layers
        self.runs = LayerRuns(layers, compile_options)
        self.names = attention_names
        self.policy = policy
        self.atp_layers = atp_layers
        self.atp_index = {layer: k for k, layer in enumerate(atp_layers)}
        # (token ids (L,), positions (..., L), input embeddings (L, D)) -> one prompt's VisualLayout
        self.read_layout = read_layout
        self.pruned_requests: dict[int, list[int]] = {}  # first KV block -> tokens removed per segment
        self.kept_log: list[dict] = []  # per pruned prefill: kept visual tokens after each ATP layer
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooks = []
        if policy.scorer is not None:
            for k, layer in enumerate(atp_layers):
                if layer == 0:  # a policy before the language model reads no attention
                    continue
                attention = layers[layer - 1].self_attn.attn
                self.hooks.append(attention.register_forward_pre_hook(self._capture(k)))

    def _capture(self, k: int):
        def hook(module, args):
            if self.capturing:
                self.captured[k] = (args[0], args[1])  # (T, H * d) queries, (T, H_kv * d) keys, after RoPE

        return hook

    capturing = False

    # one forward ------------------------------------------------------------------------
    def forward(self, model, input_ids, positions, hidden: torch.Tensor) -> torch.Tensor:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        context = get_forward_context() if is_forward_context_available() else None
        metadata = getattr(context, "attn_metadata", None)
        if not isinstance(metadata, dict) or self.names[0] not in metadata:  # a profiling or dummy run
            if self.runs.compile_options is not None and not self.warm:
                self._warm_up(positions, hidden)
            return self._plain(model, positions, hidden)
        if input_ids is None:
            raise RuntimeError(
                "vLLM ran the model without its token ids, so atp cannot find the image placeholders (the model "
                "class asks for them with requires_raw_input_tokens; this vLLM release did not honour it)"
            )
        first = metadata[self.names[0]]
        requests = self._requests(first, input_ids, positions, hidden)
        if not any(r.prefill is not None or r.pruned is not None for r in requests):
            return self._plain(model, positions, hidden)
        saved = {name: (metadata[name], context.slot_mapping.get(name)) for name in self.names}
        self.capturing = True
        try:
            return self._pruned(model, context, first, requests, positions, hidden)
        finally:
            self.capturing = False
            self.captured.clear()
            for name, (meta, slots) in saved.items():
                metadata[name] = meta
                if slots is not None:
                    context.slot_mapping[name] = slots

    warm = False

    def _warm_up(self, positions, hidden) -> None:
        """Compile, during vLLM's warm-up, the layer runs a pruned forward takes (between the layers
        that keep queries and keys and the ATP layers), for many tokens and for one, so that no
        request waits for a compilation. Nothing is pruned: a dummy run has no requests. Requests
        run in inference mode, and dynamo's guards tell its tensors from a dummy run's."""
        with torch.inference_mode():
            positions, hidden = positions.clone(), hidden.clone()
            for rows in (slice(None), slice(0, 1)):
                self._warm_up_rows(positions[..., rows], hidden[rows])
        self.warm = True

    def _warm_up_rows(self, positions, hidden) -> None:
        piece, residual, done = hidden, None, 0
        for i in self.atp_layers:
            stop = i - 1 if self._captures(i) else i
            piece, residual = self.runs(done, stop, positions, piece, residual)
            if stop >= done and self._captures(i):
                piece, residual = self.layers[stop](positions, piece, residual)
            piece, residual, done = piece if residual is None else piece + residual, None, i
        self.runs(done, len(self.layers), positions, piece, residual)
        self.runs(0, len(self.layers), positions, hidden, None)

    def _captures(self, layer: int) -> bool:
        """Whether ATP layer ``layer`` scores from the queries and keys of layer ``layer - 1``."""
        return self.policy.scorer is not None and layer > 0

    def _plain(self, model, positions, hidden):
        hidden, residual = self.runs(0, len(self.layers), positions, hidden, None)
        hidden, _ = model.norm(hidden, residual)
        return hidden

    def _requests(self, metadata, input_ids, positions, embeds) -> list[Request]:
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        firsts = metadata.block_table[: len(seq_lens), 0].tolist()
        requests = []
        for r, (seq_len, key) in enumerate(zip(seq_lens, firsts)):
            request = Request(r, starts[r], starts[r + 1], seq_len, key)
            rows = slice(request.start, request.end)
            layout = self.read_layout(input_ids[rows], positions[..., rows], embeds[rows])
            has_images = bool(layout.visual.any())
            if seq_len == request.query_len:  # a new prompt: whatever this block held before is gone
                self.pruned_requests.pop(key, None)
                if has_images:
                    request.prefill = Prefill.start(
                        layout,
                        {},
                        "drop",
                        False,
                        getattr(self.policy, "lambda_sample", 1.0),
                        getattr(self.policy, "spatial_strides", None),
                    )
            elif has_images:
                raise RuntimeError(
                    "a multimodal prompt arrived in chunks (chunked prefill split it, or images came in a "
                    "continuation); atp scores the whole prompt in one forward: raise max_num_batched_tokens to "
                    "at least max_model_len, or disable chunked prefill"
                )
            else:
                request.pruned = self.pruned_requests.get(key)
                if request.pruned is not None and request.query_len > 1:
                    raise RuntimeError(
                        "a pruned prompt continued with several tokens in one step (a chunked prefill, or "
                        "speculative decoding), which atp cannot follow: disable chunked prefill "
                        "(enable_chunked_prefill=False) and speculative decoding"
                    )
            requests.append(request)
        return requests

    def _pruned(self, model, context, first, requests, positions, hidden):
        rows = torch.arange(first.num_actual_tokens, device=hidden.device)  # original row of each row
        ranges = [(r.start, r.end) for r in requests]
        # every row's residual stream as it last was: a pruned token keeps its state at the ATP layer
        # that pruned it, as atp's drop mode keeps it on transformers (prompt log-probabilities read it)
        full = hidden.clone()
        hidden = hidden[: first.num_actual_tokens]
        current_positions = positions[..., : first.num_actual_tokens]
        residual, done = None, 0  # layers [0, done) have run
        for k, i in enumerate(self.atp_layers):
            captures = self._captures(i)  # layer i - 1 keeps its queries and keys
            stop = i - 1 if captures else i
            hidden, residual = self.runs(done, stop, current_positions, hidden, residual)
            if captures and stop >= done:  # eager, so that its attention's pre-hook runs
                hidden, residual = self.layers[stop](current_positions, hidden, residual)
            stream = hidden if residual is None else hidden + residual
            residual = None
            full[rows] = stream
            hidden, rows, ranges = self._atp_layer(k, i, requests, stream, rows, ranges)
            current_positions = positions[..., rows]
            self._install_segment(k, context, first, requests, ranges)
            done = i
        hidden, residual = self.runs(done, len(self.layers), current_positions, hidden, residual)
        full[rows] = hidden if residual is None else hidden + residual
        self._remember(requests)
        return model.norm(full)

    def _atp_layer(self, k: int, layer: int, requests, stream, rows, ranges):
        pieces, kept_rows, new_ranges, offset = [], [], [], 0
        query, key = self.captured.get(k, (None, None))
        for request, (start, end) in zip(requests, ranges):
            p = request.prefill
            if p is None:
                piece, piece_rows = stream[start:end], rows[start:end]
            else:
                if self.policy.scorer is not None and layer > 0:
                    attention = self.layers[layer - 1].self_attn.attn
                    heads, kv_heads, width = attention.num_heads, attention.num_kv_heads, attention.head_size
                    q = query[start:end].view(end - start, heads, width).transpose(0, 1)[None]
                    kk = key[start:end].view(end - start, kv_heads, width).transpose(0, 1)[None]
                    step.score(self.policy.scorer, p, k, q, kk, None, attention.impl.scale)
                piece = step.prune(self.policy, p, k, layer, stream[start:end][None])[0]
                kept = p.layout.index[0] if p.layout is not None else torch.arange(end - start)
                piece_rows = request.start + kept.to(rows.device)
            pieces.append(piece)
            kept_rows.append(piece_rows)
            new_ranges.append((offset, offset + piece.shape[0]))
            offset += piece.shape[0]
        return torch.cat(pieces), torch.cat(kept_rows), new_ranges

    def _install_segment(self, k: int, context, first, requests, ranges) -> None:
        """The compacted metadata of ATP segment ``k`` for its layers (from i_k to the next ATP layer)."""
        from vllm import _custom_ops as ops
        from vllm import envs

        start = self.atp_layers[k]
        stop = self.atp_layers[k + 1] if k + 1 < len(self.atp_layers) else len(self.layers)
        attention = self.layers[start].self_attn.attn
        block_size = attention.kv_cache.shape[2]
        table = first.block_table
        original_slots = first.slot_mapping
        query_lens, seq_lens, slots = [], [], []
        for request, (begin, end) in zip(requests, ranges):
            query_len = end - begin
            if request.prefill is not None:
                seq_len = query_len
            elif request.pruned is not None:
                seq_len = request.seq_len - request.pruned[k]
            else:
                query_lens.append(query_len)
                seq_lens.append(request.seq_len)
                slots.append(original_slots[request.start : request.end])
                continue
            compacted = torch.arange(seq_len - query_len, seq_len, device=table.device)
            blocks = table[request.index, compacted // block_size]
            slots.append((blocks * block_size + compacted % block_size).to(original_slots.dtype))
            query_lens.append(query_len)
            seq_lens.append(seq_len)
        device = first.query_start_loc.device
        query_start = torch.tensor([0, *query_lens], dtype=first.query_start_loc.dtype, device=device).cumsum(
            0
        )
        query_start = query_start.to(first.query_start_loc.dtype)
        seq_tensor = torch.tensor(seq_lens, dtype=first.seq_lens.dtype, device=device)
        slot_mapping = torch.cat(slots)
        impl = attention.impl
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(requests),
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size,
            seq_lens=seq_tensor,
            dtype=self.layers[0].input_layernorm.weight.dtype,
            query_start_loc=query_start,
            causal=first.causal,
            sliding_window_size=impl.sliding_window,
            isa=attention.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=first.dynamic_causal,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
        metadata = dataclasses.replace(
            first,
            num_actual_tokens=int(query_start[-1]),
            max_query_len=max(query_lens),
            query_start_loc=query_start,
            max_seq_len=max(seq_lens),
            seq_lens=seq_tensor,
            slot_mapping=slot_mapping,
            scheduler_metadata=scheduler,
        )
        for layer in range(start, stop):
            name = self.names[layer]
            context.attn_metadata[name] = metadata
            context.slot_mapping[name] = slot_mapping

    def _remember(self, requests) -> None:
        for request in requests:
            p = request.prefill
            if p is None:
                continue
            length = request.query_len
            kept_tokens = [
                int(p.segments[k].index.shape[1]) if p.segments[k] is not None else length
                for k in range(len(self.atp_layers))
            ]
            self.pruned_requests[request.key] = [length - kept for kept in kept_tokens]
            kept_visual = [int(record[0].sum()) for record in p.records]
            self.kept_log.append(
                {"block": request.key, "kept": kept_visual, "masks": [r[0][0].tolist() for r in p.records]}
            )
            logger.info(
                "atp: a %d-token prompt kept %s of %d visual tokens after layers %s",
                length,
                kept_visual,
                int(p.num_visual[0]),
                list(self.atp_layers),
            )
