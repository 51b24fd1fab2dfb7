"""The state of one prefill: where the visual tokens are, what is alive, the current layout.

Built when the language model starts a prefill and kept for the decode steps that follow it.
Pure tensor bookkeeping; the hooks that use it live in :mod:`atp.host.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atp.core.layout import mask_to_index, place
from atp.scorers.spatial import spatial_scores


@dataclass
class VisualLayout:
    """Where the visual tokens of a prefill are (a host's family adapter reads it from the prompt).

    Attributes
    ----------
    visual : BoolTensor (B, L), the prunable visual tokens (image and video features).
    structural : BoolTensor (B, L), tokens that belong to an image but are never pruned and
        are not instruction tokens (row breaks, newline features, image start / end markers).
    grids : per sample, the (height, width) token grid of each image (or video frame) in
        the order of the visual tokens; their sizes add up to the sample's visual tokens.
    """

    visual: torch.Tensor
    structural: torch.Tensor
    grids: list[list[tuple[int, int]]]


@dataclass
class Layout:
    """Slots of a pruned sequence: original position (B, S) and validity (B, S); fillers left."""

    index: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self):
        self.has_fillers = not bool(self.valid.all())  # read once, not per decode step


_STATE = (
    "keep",
    "weight",
    "layout",
    "view",
    "scores",
    "segments",
    "full_hidden",
    "records",
    "decided",
    "shifts",
)


@dataclass
class Prefill:
    """State of one prefill, kept for the decode steps that follow it."""

    mode: str  # "drop" or "mask"
    soft: bool  # soft masks (training) or binary ones
    length: int  # L, the prefill length
    visual_positions: torch.Tensor  # (B, N) sequence position of each visual token
    visual_valid: torch.Tensor  # (B, N)
    visual_id: torch.Tensor  # (B, L) visual index of each position, -1 for text
    instruction: torch.Tensor  # (B, L) instruction tokens (queries of S_cross)
    real: torch.Tensor  # (B, L) non-padding tokens
    context: dict  # the forward's inputs, the grids, visual positions (for scorers that need them)
    spatial: torch.Tensor  # (B, N)
    protected: torch.Tensor  # (B, N) visual tokens whose output is read: never pruned
    keep: torch.Tensor  # (B, N) cumulative binary keep mask
    weight: torch.Tensor  # (B, N) cumulative soft mask (== keep in binary mode)
    layout: Layout | None = None  # current drop-mode layout; None = full sequence
    view: dict = field(default_factory=dict)  # slots of visual / instruction tokens in the layout
    scores: dict = field(default_factory=dict)  # ATP index -> scores (B, N) visual order
    segments: dict = field(default_factory=dict)  # ATP index -> Layout (drop) or bias (B, L) (mask)
    full_hidden: torch.Tensor | None = None  # (B, L, D) last hidden state of every token
    records: list = field(default_factory=list)  # per ATP layer: (keep, weight, thresholds, reasons)
    decided: set = field(default_factory=set)  # ATP indices already decided
    shifts: dict = field(default_factory=dict)  # ATP index -> (B, L) pruned tokens before each position
    cache: object = None  # weak reference to the prefill's KV cache
    finished: bool = False  # the last layer's output was handled
    replays: bool = False  # gradient checkpointing re-runs the layer hooks in the recompute
    snapshots: dict = field(default_factory=dict)  # layer -> state when its hook first ran (replays)

    def snapshot(self) -> dict:
        """The state a layer hook reads and changes (shallow: tensors are shared, not copied)."""
        state = {name: getattr(self, name) for name in _STATE}
        return {
            name: value.copy() if isinstance(value, (dict, list, set)) else value
            for name, value in state.items()
        }

    def restore(self, state: dict) -> None:
        """Set the state a snapshot holds, copying its containers again: a layer's hook pops its
        scores and marks its decision, and a snapshot may be replayed more than once (a gradient
        taken before the backward, e.g. the training diagnostics, recomputes a checkpointed layer
        once more)."""
        for name, value in state.items():
            setattr(self, name, value.copy() if isinstance(value, (dict, list, set)) else value)

    @property
    def num_visual(self) -> torch.Tensor:
        return self.visual_valid.sum(dim=1)

    def to_sequence(self, values: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """Visual-order values (B, N) placed at their sequence positions (B, L); ``fill`` elsewhere."""
        return place(values, self.visual_positions, self.visual_valid, self.length, fill)

    @classmethod
    def start(cls, layout, inputs: dict, mode: str, soft: bool, lambda_sample: float, strides) -> Prefill:
        """The prefill state of an adapter's VisualLayout and the multimodal model's ``inputs``."""
        visual = layout.visual
        counts = visual.sum(dim=1).tolist()
        for sample, (grids, count) in enumerate(zip(layout.grids, counts)):
            if sum(h * w for h, w in grids) != count:
                raise ValueError(
                    f"sample {sample}: the image grids {grids} cover {sum(h * w for h, w in grids)} tokens but "
                    f"the prompt has {count} visual tokens; the backbone adapter misread this layout"
                )
        attention_mask = inputs.get("attention_mask")
        batch, length = visual.shape
        positions, valid = mask_to_index(visual)
        visual_order = torch.arange(positions.shape[1], device=visual.device).expand_as(positions)
        visual_id = place(visual_order, positions, valid, length, -1)
        if attention_mask is not None and attention_mask.dim() == 2:
            not_pad = attention_mask.bool()
        else:
            not_pad = torch.ones_like(visual)
        first = torch.where(visual.any(1), visual.float().argmax(1), length)
        after = torch.arange(length, device=visual.device)[None, :] > first[:, None]
        instruction = ~visual & ~layout.structural & after & not_pad
        read = read_positions(not_pad, visual, inputs.get("labels"))
        p = cls(
            mode=mode,
            soft=soft,
            length=length,
            visual_positions=positions,
            visual_valid=valid,
            visual_id=visual_id,
            instruction=instruction,
            real=not_pad,
            context={
                "inputs": inputs,
                "grids": layout.grids,
                "visual_positions": positions,
                "instruction": instruction,
            },
            spatial=spatial_scores(layout.grids, positions.shape[1], lambda_sample, strides, visual.device),
            protected=read.gather(1, positions) & valid,
            keep=valid.clone(),
            weight=valid.float(),
        )
        p.update_view()
        return p

    def update_view(self) -> None:
        """Slots of the visual, instruction and last tokens in the current layout."""
        batch = self.visual_id.shape[0]
        if self.layout is None:
            index = torch.arange(self.length, device=self.visual_id.device).expand(batch, -1)
            valid = torch.ones_like(index, dtype=torch.bool)
        else:
            index, valid = self.layout.index, self.layout.valid
        slot_visual_id = torch.where(valid, self.visual_id.gather(1, index), -1)
        visual_slots, visual_slot_valid = mask_to_index(slot_visual_id >= 0)
        instruction_slots, instruction_valid = mask_to_index(self.instruction.gather(1, index) & valid)
        real = self.real.gather(1, index) & valid
        last_slot = real.shape[1] - 1 - real.flip(1).float().argmax(dim=1)  # last non-padding token
        self.view = {
            "last_slot": last_slot,
            "visual_slots": visual_slots,
            "visual_valid": visual_slot_valid,
            "visual_ids": slot_visual_id.gather(1, visual_slots).clamp_min(0),
            "instruction_slots": instruction_slots,
            "instruction_valid": instruction_valid,
        }


def read_positions(
    real: torch.Tensor, visual: torch.Tensor, labels: torch.Tensor | None, ignore_index: int = -100
) -> torch.Tensor:
    """BoolTensor (B, L): positions whose output is read, so their token must not be pruned.

    Drop mode does not compute a pruned token any further, mask mode does (without its key):
    their outputs differ, so a token whose output matters stays. That is each sample's last
    real token (the next token is predicted from it) and, with ``labels``, every position that
    predicts a supervised text token (transformers' losses predict ``labels[i + 1]`` at ``i``;
    a label on a visual placeholder predicts nothing an answer needs). At most the last token of
    each image run qualifies.
    """
    batch, length = real.shape
    last = length - 1 - real.flip(1).float().argmax(dim=1)
    read = torch.zeros_like(real, dtype=torch.bool)
    read[torch.arange(batch, device=real.device), last] = True
    if isinstance(labels, torch.Tensor) and labels.shape == real.shape:
        read[:, :-1] |= (labels[:, 1:] != ignore_index) & ~visual[:, 1:]
    return read
