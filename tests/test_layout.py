"""Property tests of the pure gather / scatter / mask helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atp.core.layout import additive_mask, causal_mask, compact_mask, gather_seq, mask_to_index, scatter_seq

bool_rows = st.integers(1, 4).flatmap(
    lambda b: st.integers(1, 12).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)
    )
)


@given(bool_rows, st.sampled_from(["left", "right"]))
def test_mask_to_index_lists_true_positions_in_order(rows, align):
    mask = torch.tensor(rows)
    index, valid = mask_to_index(mask, align=align)
    assert index.shape[1] == int(mask.sum(1).max())
    for b, row in enumerate(rows):
        expected = [i for i, x in enumerate(row) if x]
        assert index[b][valid[b]].tolist() == expected
        assert (index[b][~valid[b]] == 0).all()
        pads = (~valid[b]).sum().item()
        if align == "left":
            assert not valid[b, :pads].any() and valid[b, pads:].all()
        else:
            assert valid[b, : valid.shape[1] - pads].all()


@given(bool_rows, st.integers(1, 3))
def test_scatter_after_gather_restores_kept_rows_and_leaves_others(rows, width):
    mask = torch.tensor(rows)
    batch, length = mask.shape
    full = torch.randn(batch, length, width)
    index, valid = mask_to_index(mask, align="left")
    gathered = gather_seq(full, index)
    new = gathered + 1.0
    out = scatter_seq(full, index, valid, new)
    assert torch.equal(out[mask], full[mask] + 1.0)
    assert torch.equal(out[~mask], full[~mask])


@given(bool_rows)
def test_compact_mask_equals_mask_of_the_kept_subsequence(rows):
    keep = torch.tensor(rows)
    batch, length = keep.shape
    padding = torch.rand(batch, length) > 0.2
    positions = torch.arange(length).expand(batch, -1)
    base = causal_mask(positions, positions) & padding[:, None, None, :]
    index, valid = mask_to_index(keep, align="left")
    compact = compact_mask(base, index, index, valid, q_valid=valid)
    for b in range(batch):
        kept = index[b][valid[b]]
        expected = base[b, 0][kept][:, kept]
        got = compact[b, 0][valid[b]][:, valid[b]]
        assert torch.equal(got, expected)
        # filler keys are invisible; filler queries see only themselves
        assert not compact[b, 0][:, ~valid[b]][valid[b]].any()
        fill = (~valid[b]).nonzero().flatten()
        for f in fill:
            assert compact[b, 0, f].nonzero().flatten().tolist() == [f.item()]


def test_compact_mask_keeps_the_sdpa_fast_path_without_fillers():
    index = torch.tensor([[0, 2, 3]])
    assert compact_mask(None, index, index, torch.ones(1, 3, dtype=torch.bool)) is None


@given(st.integers(1, 6), st.integers(0, 4))
def test_additive_mask_is_finite_and_matches_bias_where_allowed(q_len, extra):
    k_len = q_len + extra
    bias = torch.randn(2, k_len)
    bias[0, 0] = float("-inf")
    out = additive_mask(None, bias, q_len, torch.float32)
    assert torch.isfinite(out).all()
    allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + extra
    assert torch.equal(out[1, 0][allowed], bias[1].expand(q_len, -1)[allowed])
    assert (out[:, 0][:, ~allowed] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])  # one source for every sample
@pytest.mark.parametrize("width", [1, 3, 16, 40])  # rows below and above the index_select path
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@given(st.integers(1, 3), st.integers(2, 9), st.data())
@settings(max_examples=15, deadline=None)
def test_gather_seq_equals_an_element_wise_gather_on_every_layout(
    batch, shared, width, transposed, heads, length, data
):
    source_batch = 1 if shared else batch
    if transposed:
        x = torch.randn(source_batch, width, heads, length).transpose(1, 3)
    else:
        x = torch.randn(source_batch, length, heads, width)
    count = data.draw(st.integers(1, length))
    rows = [
        data.draw(st.lists(st.integers(0, length - 1), min_size=count, max_size=count)) for _ in range(batch)
    ]
    index = torch.tensor(rows, dtype=torch.long)
    expected = torch.stack([x[0 if shared else b].index_select(0, index[b]) for b in range(batch)])
    assert torch.equal(gather_seq(x, index, dim=1), expected)


@given(st.integers(1, 3), st.integers(1, 8), st.data())
@settings(max_examples=40, deadline=None)
def test_scatter_seq_without_fillers_equals_the_general_path_and_carries_gradients(batch, length, data):
    count = data.draw(st.integers(1, length))
    index = torch.stack([torch.randperm(length)[:count].sort().values for _ in range(batch)])
    valid = torch.ones_like(index, dtype=torch.bool)
    full = torch.randn(batch, length, 5, requires_grad=True)
    values = torch.randn(batch, count, 5, requires_grad=True)
    fast = scatter_seq(full, index, valid, values, fillers=False)
    assert torch.equal(fast, scatter_seq(full, index, valid, values))
    fast.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))
    kept = torch.zeros(batch, length, dtype=torch.bool).scatter(1, index, True)
    assert torch.equal(full.grad[..., 0], (~kept).float())  # overwritten rows pass no gradient
