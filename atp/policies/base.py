"""The policy interface: which visual tokens survive each ATP layer."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from atp.scorers.base import Scorer


@dataclass(frozen=True)
class PolicyContext:
    """What a policy knows about the model when it is built (nothing else is touched)."""

    layers: tuple[int, ...]
    num_layers: int
    num_visual_tokens: int | None  # visual tokens per sample, when the family fixes it


@dataclass
class PolicyInput:
    """One ATP layer's decision input, in the original visual order (B, N).

    ``scores`` hold the scorer's outputs (0 at dead tokens); ``live`` marks tokens alive
    before this layer; ``weight`` is the cumulative soft mask; ``spatial`` the spatial
    score; ``num_visual`` the visual tokens of each sample.
    """

    index: int
    layer: int
    scores: dict[str, torch.Tensor]
    live: torch.Tensor
    weight: torch.Tensor
    spatial: torch.Tensor
    num_visual: torch.Tensor
    grids: list | None = None  # per sample, the (height, width) of each image grid


@dataclass
class Decision:
    """``mask`` (B, N) in [0, 1] (> 0.5 = keep); ``thresholds`` name -> (B,) for the statistics;
    ``merge`` (B, N) optional: the visual index each token is averaged into (itself when kept);
    ``reasons`` name -> BoolTensor (B, N) optional: which criterion alone would keep each token
    (``PruningStats.reasons``, the colours of ``atp visualize``)."""

    mask: torch.Tensor
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    merge: torch.Tensor | None = None
    reasons: dict[str, torch.Tensor] = field(default_factory=dict)


class Policy(nn.Module):
    """Base class: subclasses set ``scorer`` and implement :meth:`decide`.

    Keyword arguments of ``__init__`` after ``context`` are the policy's options; ``attach``
    rejects any other option by name before touching the model, and ``__init__`` checks the
    type and range of each (:class:`OptionCheck`), so a forward never fails on an option.
    """

    name: str = "policy"  # for messages; the built-ins use their registered name
    scorer: Scorer | None = None
    untrained: bool = False  # True: learned parts not trained or loaded (attach warns)
    pre_llm: bool = False  # True: acts before layer 0 (layers=[0]), e.g. pooling baselines

    def __init__(self, context: PolicyContext):
        super().__init__()
        self.context = context

    @classmethod
    def option_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [name for name in params if name not in ("self", "context")]

    def decide(self, inputs: PolicyInput) -> Decision:
        raise NotImplementedError
