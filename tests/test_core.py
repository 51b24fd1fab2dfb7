"""The pruning core on plain tensors: no model, no transformers.

The core's step (:mod:`atp.core.step`) is what any host (transformers hooks, a serving engine's model
forward) calls at an ATP layer. These tests build its inputs by hand and check its outputs against
what the step means: the kept tokens in their original order and positions, the log bias of mask
mode, the hidden states gathered and scattered back, the merge means, the decode keys and masks.
"""

from __future__ import annotations

import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atp.core import step
from atp.core.state import Layout, Prefill, VisualLayout
from atp.core.stats import PruningStats
from atp.policies.base import Decision
from atp.scorers.base import Scorer


def test_the_core_imports_without_transformers():
    """A serving engine reuses the core without transformers: importing it must not need it."""
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of transformers fails\n"
        "import atp.core.step, atp.core.state, atp.core.layout, atp.core.stats, atp.core.efficiency\n"
        "import atp.policies, atp.scorers, atp.components\n"
        "assert 'transformers' not in {name.split('.')[0] for name, m in sys.modules.items() if m}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class Given:
    """A policy that keeps what the test says, reporting one threshold and one reason."""

    def __init__(self, *masks, merge=None):
        self.masks, self.merge, self.seen = list(masks), merge, []

    def decide(self, inputs):
        self.seen.append(inputs)
        mask = self.masks[inputs.index]
        return Decision(
            mask=mask.float(),
            thresholds={"theta": torch.full((mask.shape[0],), 0.5)},
            reasons={"given": mask.bool()},
            merge=self.merge,
        )


def prompt(visual_rows: list[list[bool]], mode: str = "drop", soft: bool = False) -> Prefill:
    """A prefill state for prompts whose visual tokens are where ``visual_rows`` says (one image
    per sample, as one row of tokens)."""
    visual = torch.tensor(visual_rows)
    grids = [[(1, int(row.sum()))] for row in visual]
    layout = VisualLayout(visual=visual, structural=torch.zeros_like(visual), grids=grids)
    return Prefill.start(layout, {}, mode, soft, 1.0, None)


LAYOUT = [[False, True, True, True, True, False, False]]  # text, 4 visual, 2 text (the last is read)


def test_drop_keeps_the_kept_tokens_in_order_at_their_original_positions():
    p = prompt(LAYOUT)
    hidden = torch.arange(7.0)[None, :, None].expand(1, 7, 3).clone()
    policy = Given(torch.tensor([[True, False, True, False]]))
    out = step.prune(policy, p, 0, 2, hidden)
    assert p.layout.index.tolist() == [[0, 1, 3, 5, 6]]  # positions are the original ones
    assert torch.equal(out, hidden[:, [0, 1, 3, 5, 6]])
    assert p.keep.tolist() == [[True, False, True, False]]
    assert p.segments[0] is p.layout
    assert step.shift(p, 0).tolist() == [[0, 0, 1, 1, 2, 2, 2]]  # pruned tokens up to each position
    # the last layer's output goes back to full length; a pruned token keeps its last state
    full = step.unpruned(p, out + 100)
    assert full[0, :, 0].tolist() == [100, 101, 2, 103, 4, 105, 106]


def test_a_second_atp_layer_prunes_among_the_survivors_and_scatters_back_through_both():
    p = prompt(LAYOUT)
    hidden = torch.arange(7.0)[None, :, None].clone()
    policy = Given(torch.tensor([[True, True, True, False]]), torch.tensor([[True, False, True, True]]))
    first = step.prune(policy, p, 0, 2, hidden)
    second = step.prune(policy, p, 1, 4, first + 10)
    assert p.keep.tolist() == [[True, False, True, False]]  # cumulative: a dead token stays dead
    assert p.layout.index.tolist() == [[0, 1, 3, 5, 6]]
    assert policy.seen[1].live.tolist() == [[True, True, True, False]]
    full = step.unpruned(p, second + 10)
    assert full[0, :, 0].tolist() == [20, 21, 12, 23, 4, 25, 26]
    stats = step.collect_stats(p, (2, 4), 6, lambda *args: {})
    assert isinstance(stats, PruningStats) and stats.kept.tolist() == [[3, 2]]
    assert stats.thresholds["theta"].shape == (1, 2)
    assert stats.reasons[1]["given"].tolist() == [[True, False, True, False]]


def test_mask_mode_keeps_every_token_and_biases_the_pruned_keys():
    p = prompt(LAYOUT, mode="mask")
    hidden = torch.randn(1, 7, 3)
    out = step.prune(Given(torch.tensor([[True, False, True, False]])), p, 0, 2, hidden)
    assert out is hidden and p.layout is None
    bias = p.segments[0]
    assert bias[0].tolist() == [0, 0, float("-inf"), 0, float("-inf"), 0, 0]


def test_soft_masks_carry_their_weight_into_the_bias():
    p = prompt(LAYOUT, mode="mask", soft=True)
    mask = torch.tensor([[0.9, 0.2, 0.6, 1.0]])
    step.prune(Given(mask), p, 0, 2, torch.zeros(1, 7, 2))
    assert torch.allclose(p.segments[0][0, 1:5].exp(), mask[0])  # the weights themselves, in place
    assert p.keep.tolist() == [[True, False, True, True]]  # the hard rule: above one half


def test_a_token_whose_output_is_read_is_never_pruned():
    p = prompt([[False, True, True, True]])  # the last token is visual and predicts the answer
    out = step.prune(Given(torch.tensor([[False, False, False]])), p, 0, 1, torch.zeros(1, 4, 2))
    assert p.keep.tolist() == [[False, False, True]] and out.shape[1] == 2


def test_merging_averages_each_group_into_its_target():
    p = prompt(LAYOUT)
    hidden = torch.tensor([[[0.0], [1.0], [3.0], [5.0], [8.0], [0.0], [0.0]]])
    merge = torch.tensor([[0, 0, 2, 2]])  # tokens 1 -> 0 and 3 -> 2
    out = step.prune(Given(torch.tensor([[True, False, True, False]]), merge=merge), p, 0, 2, hidden)
    assert out[0, :, 0].tolist() == [0.0, 2.0, 6.5, 0.0, 0.0]


def test_scores_are_placed_in_the_original_visual_order_and_zero_at_dead_tokens():
    p = prompt(LAYOUT)
    step.prune(
        Given(torch.tensor([[True, False, True, True]]), torch.tensor([[True, True, True, True]])),
        p,
        0,
        1,
        torch.zeros(1, 7, 2),
    )

    class SlotNumbers(Scorer):
        def score(self, view):
            return {"slot": view.visual_slots.float() + 1}

    query = key = torch.zeros(1, 1, 6, 4)
    step.score(SlotNumbers(), p, 1, query, key, None, 1.0)
    # live visual tokens 0, 2, 3 sit at slots 1, 2, 3 of the pruned sequence [0, 1, 3, 4, 5, 6]
    assert p.scores[1]["slot"].tolist() == [[2.0, 0.0, 3.0, 4.0]]


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(4, 12),
    kept=st.integers(0, 8),
    past=st.integers(0, 6),
    window=st.one_of(st.none(), st.integers(2, 10)),
)
def test_decode_keys_are_the_kept_slots_then_the_new_tokens_within_the_window(length, kept, past, window):
    """What a pruned cache layer returns at a decode step, slot by slot."""
    kept = min(kept, length)
    index = torch.arange(length - kept, length)[None]
    segment = Layout(index, torch.ones_like(index, dtype=torch.bool))
    seen = length + past
    k_index, k_valid = step.decode_keys(segment, length, seen, 1, window)
    expected = index[0].tolist() + list(range(length, seen + 1))
    if window:
        expected = expected[:-1][-(window - 1) :] + expected[-1:]  # its last window - 1, the new one
    assert k_index[0].tolist() == expected and bool(k_valid.all())


@settings(max_examples=60, deadline=None)
@given(
    past=st.integers(0, 8),
    query_len=st.integers(1, 3),
    window=st.one_of(st.none(), st.integers(1, 6)),
    padded=st.integers(0, 2),
)
def test_the_decode_mask_is_causal_padded_and_windowed_in_original_columns(past, query_len, window, padded):
    total = past + query_len
    padding = torch.ones(1, total, dtype=torch.long)
    padding[0, : min(padded, past)] = 0
    mask = step.decode_base(padding, past, query_len, window, "cpu")
    for row in range(query_len):
        position = past + row
        for column in range(total):
            allowed = column <= position and bool(padding[0, column])
            if window:
                allowed = allowed and column > position - window
            assert bool(mask[0, 0, row, column]) == allowed
    unpadded = step.decode_base(None, past, query_len, window, "cpu")
    if query_len == 1 and not window:
        assert unpadded is None  # one query sees every cached key
    else:
        assert unpadded.shape == (1, 1, query_len, total)
