"""Statistics of a pruned forward: kept counts, masks, the paper's "Token" metric."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atp.components.budget_loss import average_tokens


@dataclass
class PruningStats:
    """What the last prefill forward kept.

    Attributes
    ----------
    layers : the ATP layer indices.
    num_layers : decoder layers of the language model.
    num_visual : LongTensor (B,) visual tokens of each sample before pruning.
    kept : LongTensor (B, K) visual tokens alive after each ATP layer.
    masks : K BoolTensors (B, N), original visual order, True = kept (cumulative).
    soft_masks : K float tensors (B, N), the cumulative soft masks (they carry gradients
        in soft mask mode; equal to ``masks`` as floats otherwise).
    thresholds : name -> FloatTensor (B, K) (e.g. ``theta_r``, ``theta_s`` of the atp policy).
    losses : the unweighted budget terms of this forward, ``"atp"`` (Eq. 12) and ``"target"``
        (Eq. 13), scalars that carry gradients in soft mask mode.
    reasons : per ATP layer, why its kept tokens were kept, name -> BoolTensor (B, N) in the
        original visual order (a subset of that layer's mask), as the policy reports it: the
        atp policy's ``"redundancy"`` (S_red above theta_r) and ``"spatial"`` (the spatial score
        above theta_s), and ``"read"`` (a token whose output is read, never pruned; present, maybe all
        False, whenever the policy reports reasons). A token can
        have several reasons; ``{}`` for a policy that reports none.
    grids : per sample, the (height, width) token grid of each image (or video frame), in the
        order of the visual tokens (``VisualLayout.grids``).
    """

    layers: tuple[int, ...]
    num_layers: int
    num_visual: torch.Tensor
    kept: torch.Tensor
    masks: list[torch.Tensor]
    soft_masks: list[torch.Tensor] = field(default_factory=list)
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    reasons: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grids: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def tokens_per_sample(self) -> torch.Tensor:
        """FloatTensor (B,): the "Token" metric of each sample."""
        return average_tokens(self.kept, self.num_visual, self.layers, self.num_layers)

    @property
    def avg_tokens(self) -> float:
        """The paper's "Token" metric: visual tokens at the input of each decoder layer,
        averaged over layers and over the samples that have visual tokens (0.0 if none)."""
        has_visual = self.num_visual > 0
        if not bool(has_visual.any()):
            return 0.0
        return float(self.tokens_per_sample[has_visual].mean())

    @property
    def soft_kept(self) -> torch.Tensor:
        """FloatTensor (B, K): soft kept counts (sums of the cumulative soft masks)."""
        return torch.stack([mask.sum(dim=1) for mask in self.soft_masks], dim=1)

    def table(self) -> str:
        """A small text table: one row per ATP layer, kept tokens per sample."""
        rows = [f"{'layer':>6} | " + " ".join(f"{f's{b}':>6}" for b in range(self.kept.shape[0]))]
        rows.append(f"{'input':>6} | " + " ".join(f"{int(n):>6}" for n in self.num_visual))
        for k, layer in enumerate(self.layers):
            rows.append(f"{layer:>6} | " + " ".join(f"{int(n):>6}" for n in self.kept[:, k]))
        return "\n".join(rows)


def empty_stats(layers: tuple[int, ...], num_layers: int, batch: int, device=None) -> PruningStats:
    """Stats of a forward without visual tokens: every count is 0."""
    zeros = torch.zeros(batch, len(layers), dtype=torch.long, device=device)
    empty = [torch.zeros(batch, 0, dtype=torch.bool, device=device) for _ in layers]
    zero = torch.zeros((), device=device)
    return PruningStats(
        layers,
        num_layers,
        torch.zeros(batch, dtype=torch.long, device=device),
        zeros,
        empty,
        [m.float() for m in empty],
        losses={"atp": zero, "target": zero},
        reasons=[{} for _ in layers],
        grids=[[] for _ in range(batch)],
    )
