"""One ATP layer's step on plain tensors: score -> decide -> keep / merge -> new layout.

A host calls these with the tensors it finds in its model's forward; nothing here knows where they
came from (transformers hooks today, a serving engine's model forward tomorrow):

* :func:`score`, at layer ``i_k - 1``: the scorer reads the layer's queries and keys (after RoPE) and
  the prefill state's view of where the visual and instruction tokens are; the scores are kept on the
  state in the original visual order.
* :func:`prune`, at the input of ATP layer ``i_k``: the policy decides, tokens whose output is read
  stay, merging policies average the hidden states they merge, and the state moves to the new
  layout (drop: the kept tokens, gathered; mask: a log bias over the visual keys). Positions are
  kept: the state remembers each kept token's original position.
* :func:`shift`, :func:`decode_keys`, :func:`decode_base`: what the layers after an ATP layer need
  at decode time (pruned tokens before each position, the cache's key slots, the causal mask).
* :func:`collect_stats`: what the prefill kept, and the budget terms (Eq. 12-13).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from atp.core.layout import gather_seq, mask_to_index, place, scatter_seq
from atp.core.state import Layout, Prefill
from atp.core.stats import PruningStats
from atp.policies.base import Policy, PolicyInput
from atp.scorers.base import AttentionView, Scorer


@torch.no_grad()  # scores are detached from the LM (and nothing is saved for a checkpoint recompute)
def score(scorer: Scorer, p: Prefill, k: int, query, key, attention_mask, scale) -> None:
    """Score the live visual tokens for ATP layer ``k`` from the attention inputs of the layer before
    it: ``query`` (B, H, S, d), ``key`` (B, H_kv, S, d) after RoPE, in the state's current slots."""
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
    scores = scorer.score(attention)
    width = p.visual_valid.shape[1]
    present = p.weight > 0  # == p.keep with binary masks; soft ones keep hard-dropped tokens
    p.scores[k] = {  # original visual order; 0 at dead tokens in both modes
        name: place(value, view["visual_ids"], view["visual_valid"], width, 0.0) * present
        for name, value in scores.items()
    }


def prune(
    policy: Policy,
    p: Prefill,
    k: int,
    layer: int,
    hidden: torch.Tensor,
    observe: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """ATP layer ``k`` (decoder layer ``layer``): the policy's decision applied to the state, and the
    hidden states (B, S, D) the layer receives (gathered to the kept tokens in drop mode).
    ``observe`` receives the decision (``atp_observe`` plugins)."""
    p.decided.add(k)
    decision = policy.decide(
        PolicyInput(
            index=k,
            layer=layer,
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
        hidden = merge(p, hidden, torch.where(p.protected, own, decision.merge))
    weight = p.weight * mask if p.soft else keep.float()
    thresholds = {n: t.detach() for n, t in decision.thresholds.items()}
    reasons = {n: r.detach().bool() & keep for n, r in decision.reasons.items()}
    if reasons:  # no .any() here: a device sync per ATP layer for a picture's legend
        reasons["read"] = p.protected & keep
    p.records.append((keep, weight, thresholds, reasons))
    if observe is not None:
        observe(
            {
                "index": k,
                "layer": layer,
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


def merge(p: Prefill, hidden: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """Average the hidden states of each merge group (B, N) -> visual index of its target, into the
    target token. Works on the full sequence (merging policies act before any pruning)."""
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


def unpruned(p: Prefill, hidden: torch.Tensor) -> torch.Tensor:
    """The last layer's output (B, S, D) in the current slots, back at full length (B, L, D): pruned
    tokens keep the last hidden state they had."""
    layout = p.layout
    return scatter_seq(p.full_hidden, layout.index, layout.valid, hidden, layout.has_fillers)


def shift(p: Prefill, k: int) -> torch.Tensor:
    """LongTensor (B, L): visual tokens pruned up to ATP layer k before each position (inclusive)."""
    if k not in p.shifts:  # once per prefill: decode steps reuse it
        pruned = p.to_sequence(p.visual_valid & ~p.records[k][0], False)
        p.shifts[k] = pruned.long().cumsum(dim=1)
    return p.shifts[k]


def decode_keys(
    segment: Layout, length: int, past: int, query_len: int, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Original column and validity (B, K) of each key a pruned cache layer returns in a decode step:
    the segment's kept slots of the ``length``-token prefill, then the tokens decoded since (``past``
    seen in all) and the ``query_len`` new ones; for a cache layer with a ``window``, the last
    ``window - 1`` of those before this step (what it keeps) and the new ones."""
    batch = segment.index.shape[0]
    new = torch.arange(length, past + query_len, device=segment.index.device)
    k_index = torch.cat([segment.index, new.expand(batch, -1)], dim=1)
    k_valid = torch.cat([segment.valid, torch.ones_like(new, dtype=torch.bool).expand(batch, -1)], dim=1)
    if window:
        returned = min(k_index.shape[1] - query_len, window - 1) + query_len
        k_index, k_valid = k_index[:, -returned:], k_valid[:, -returned:]
    return k_index, k_valid


def decode_base(
    padding: torch.Tensor | None, past: int, query_len: int, window: int | None, device
) -> torch.Tensor | None:
    """A decode step's boolean mask (B or 1, 1, Q, K) in original columns from the 2D padding mask
    (or None); with a ``window``, keys ``window`` or more positions before the query are masked.
    None where every key is visible (one query, no window, no padding)."""
    if padding is None or padding.dim() != 2:
        if query_len == 1 and not window:
            return None
        rows = torch.arange(past, past + query_len, device=device)
        columns = torch.arange(past + query_len, device=device)
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


def collect_stats(p: Prefill, layers: tuple[int, ...], num_layers: int, budget_loss) -> PruningStats:
    """What the prefill kept at each ATP layer, with the budget terms (``budget_loss``)."""
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
        layers=layers,
        num_layers=num_layers,
        num_visual=p.num_visual,
        kept=torch.stack([mask.sum(dim=1) for mask in masks], dim=1),
        masks=masks,
        soft_masks=soft_masks,
        thresholds=thresholds,
        losses=budget_loss(counting, p.num_visual, layers, num_layers),
        reasons=[record[3] for record in p.records],
        grids=p.context.get("grids", []),
    )
