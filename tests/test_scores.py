"""Property tests of the scores against brute-force references that form the full matrices."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from atp.components.mask_combiner import MaxSigmoidCombiner
from atp.policies.fixed import top_k_mask
from atp.scorers.normalize import minmax_normalize
from atp.scorers.redundancy import cross_scores, self_scores
from atp.scorers.spatial import default_strides, grid_scores, level, spatial_scores

shapes = st.tuples(
    st.integers(1, 3), st.sampled_from([(2, 1), (2, 2), (4, 2)]), st.integers(6, 14), st.integers(0, 2**16)
)


def random_qk(batch, heads, kv_heads, length, seed, dim=8):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return query, key


UNIT = 2.0**-24  # float32's unit roundoff


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """|got - exact| <= bound elementwise (``exact`` and ``bound`` in float64)."""
    error = (got.double() - exact).abs()
    assert bool((error <= bound).all()), f"error {error.max():.3g} over bound {(error - bound).max():.3g}"


@given(shapes)
def test_self_scores_equal_mean_of_full_logit_matrix(shape):
    batch, (heads, kv_heads), length, seed = shape
    query, key = random_qk(batch, heads, kv_heads, length, seed)
    slots = torch.stack([torch.randperm(length)[:4].sort().values for _ in range(batch)])
    weight = torch.rand(batch, 4)
    scale = 0.3
    got = self_scores(query, key, slots, weight, scale)
    keys = key.repeat_interleave(heads // kv_heads, dim=1)
    for b in range(batch):
        q = query[b][:, slots[b]].double()  # (H, 4, d)
        k = keys[b][:, slots[b]].double()
        w = weight[b].double()[None, :, None] / weight[b].double().sum()
        logits = torch.einsum("hmd,hnd->hmn", q, k) * scale  # query m, key n, in float64: exact enough
        magnitude = (torch.einsum("hmd,hnd->hmn", q.abs(), k.abs()) * scale * w).sum(1).mean(0)
        # a sum of products in float32, in any order, is within gamma_K = K * 2**-24 of the sum of
        # the terms' magnitudes, K the roundings along a term's path: the weight sum (4 terms) and
        # division, the weighted query sum over the L slots, the group sum, the d-term dot product,
        # the sum over key heads, the scale rounded to float32 and its product: K <= L + d + 9
        bound = (length + query.shape[-1] + 9) * UNIT * magnitude
        assert_within(got[b], ((logits * w).sum(1)).mean(0), bound)


@given(shapes)
def test_cross_scores_equal_full_causal_softmax_rows(shape):
    batch, (heads, kv_heads), length, seed = shape
    query, key = random_qk(batch, heads, kv_heads, length, seed)
    visual = torch.arange(1, 4).expand(batch, -1)  # tokens 1..3 are visual
    text = torch.arange(4, length).expand(batch, -1)
    text_valid = torch.ones_like(text, dtype=torch.bool)
    text_valid[0, -1] = False
    scale = 0.25
    got = cross_scores(query, key, None, scale, text, text_valid, visual)
    keys = key.repeat_interleave(heads // kv_heads, dim=1).double()
    logits = torch.einsum("bhqd,bhkd->bhqk", query.double(), keys) * scale  # float64: exact enough
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(1)  # (B, L, L)
    # float32 rounding, relative to each probability: a logit's d-term dot product (scale 1/4 is
    # exact) is off by <= d * 2**-24 * scale * sum |q k|, which moves a softmax output by twice the
    # largest such error in its row; the max subtraction, exp (1 ulp), the L-term sum and the
    # division add (L + 4) * 2**-24 with the subtraction's u * |logit - max|; the mean over the
    # positive probabilities of the rows and heads (T + H + 2 roundings) keeps the relative error.
    # Doubled for second-order terms; below float32's smallest normal only an absolute accuracy is left.
    dim = query.shape[-1]
    logit_error = dim * UNIT * torch.einsum("bhqd,bhkd->bhqk", query.double().abs(), keys.abs()) * scale
    spread = 2 * logits.masked_fill(~causal, 0.0).abs().amax((1, 2, 3))  # bounds |logit - row max|
    for b in range(batch):
        rows = text[b][text_valid[b]]
        expected = probs[b][rows][:, visual[b]].mean(0)
        relative = 2 * logit_error[b][:, rows].amax() + UNIT * spread[b] + (2 * length + heads + 6) * UNIT
        assert_within(got[b], expected, 2 * relative * expected + torch.finfo(torch.float32).tiny)


def test_cross_scores_use_the_layer_mask():
    query, key = random_qk(1, 2, 2, 6, 0)
    visual, text = torch.tensor([[1, 2]]), torch.tensor([[4, 5]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[..., 2] = False  # token 2 masked out as a key
    got = cross_scores(query, key, mask, 1.0, text, valid, visual)
    assert got[0, 1] == 0 and got[0, 0] > 0


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=10), st.data())
def test_minmax_spans_zero_to_one_over_live_tokens(values, data):
    scores = torch.tensor([values])
    live = torch.tensor([data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))])
    out = minmax_normalize(scores, live)
    assert (out[~live] == 0).all()
    alive = out[live]
    if alive.numel() and scores[live].max() - scores[live].min() > 1e-12:  # the function's own "flat"
        assert alive.min() == 0 and alive.max() == 1  # (low - low) / span and span / span: exact
        live_scores = scores[live]
        smaller = live_scores[:, None] < live_scores[None, :]
        assert bool((alive[:, None] <= alive[None, :])[smaller].all())  # order preserved


@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1.0, 3.0, 2.5]))
def test_spatial_grids_nest_and_rank_coarse_first(height, width, lambda_sample):
    score = grid_scores(height, width, lambda_sample).view(height, width)
    assert score[0, 0] == score.max() == 1.0
    assert bool((score > 0).all()) and score.unique().numel() == height * width  # a total order
    for stride in default_strides(height, width):
        on_grid = torch.zeros(height, width, dtype=torch.bool)
        on_grid[::stride, ::stride] = True
        # a threshold at Eq. 5's level keeps exactly that grid (with the coarser grids inside it)
        assert torch.equal(score > level(stride, lambda_sample), on_grid)
    # the tokens off every grid fill the lowest band, (0, level of the finest grid]
    finest = min(default_strides(height, width))
    off = torch.ones(height, width, dtype=torch.bool)
    off[::finest, ::finest] = False
    assert bool((score[off] <= level(finest, lambda_sample)).all())


def test_spatial_score_is_the_progressive_rank_on_24x24():
    """lambda_sample 1 (the default): Eq. 5's levels are 1 - R_s, the fraction of tokens above each
    grid, so the scores are 1, 1 - 1/576, ..., 1/576: a threshold keeps the top (1 - theta) * 576."""
    score = grid_scores(24, 24).view(24, 24)
    assert torch.equal(
        score.flatten().sort().values, (torch.arange(1, 577, dtype=torch.float64) / 576).float()
    )
    assert int((score > level(8)).sum()) == 9  # stride 8: rows / cols {0, 8, 16}
    assert int((score > level(4)).sum()) == 36
    assert int((score > level(2)).sum()) == 144
    top = score.flatten().argsort(descending=True)[:18]  # between grids: spread, not one corner
    blocks = (top // 24 // 8) * 3 + top % 24 // 8
    assert torch.equal(blocks.bincount(minlength=9), torch.full((9,), 2))  # two in each 8 x 8 block
    per_sample = spatial_scores([[(24, 24)], [(24, 24), (24, 24)]], 1152)
    assert torch.equal(per_sample[0, :576], score.flatten()) and (per_sample[0, 576:] == 0).all()
    assert torch.equal(per_sample[1, 576:], score.flatten())


@given(st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.0, 0.3))
def test_mask_is_max_of_branches_and_monotone_in_thresholds(theta_r, theta_s, delta):
    generator = torch.Generator().manual_seed(0)
    s_red, s_sp = torch.rand(2, 16, generator=generator), torch.rand(2, 16, generator=generator)
    combiner = MaxSigmoidCombiner(temperature=20.0)
    both = combiner(s_red, s_sp, torch.full((2,), theta_r), torch.full((2,), theta_s))
    red_only = MaxSigmoidCombiner(20.0, use_spatial=False)(
        s_red, s_sp, torch.full((2,), theta_r), torch.full((2,), theta_s)
    )
    assert bool((both >= red_only).all())
    higher = combiner(s_red, s_sp, torch.full((2,), theta_r + delta), torch.full((2,), theta_s + delta))
    # float32 sigmoid (exp within an ulp, 1 + e, a division) is within ~2 ulps of exact (2**-24
    # each below 1): two evaluations may invert by twice that, not more
    assert bool((higher <= both + 4 * 2**-24).all())


@given(st.lists(st.floats(-3, 3), min_size=1, max_size=12), st.integers(0, 12), st.data())
def test_top_k_keeps_exactly_the_best_live_tokens(values, count, data):
    scores = torch.tensor([values])
    live = torch.tensor([data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))])
    mask = top_k_mask(scores, live, torch.tensor([count]))
    assert int(mask.sum()) == min(count, int(live.sum()))
    assert not (mask & ~live).any()
    if mask.any() and (live & ~mask).any():
        assert scores[mask].min() >= scores[live & ~mask].max()


def test_scoring_never_builds_an_l_by_l_matrix(monkeypatch):
    """Every tensor created while atp scores a layer is far smaller than L x L (long prompt)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import atp
    from atp.host.runtime import Runtime
    from atp.tiny.models import tiny_llava

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.numel())  # batch of one
            return out

    seen = []
    original = Runtime._score

    def recorded(self, *args, **kwargs):
        with Largest() as mode:
            original(self, *args, **kwargs)
        seen.append(mode.largest)

    monkeypatch.setattr(Runtime, "_score", recorded)
    model = tiny_llava(num_layers=4, image_size=128)  # 256 visual tokens
    length = 256 + 12
    ids = torch.tensor([[1, 5, 6] + [127] * 256 + [7] * 9])
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[0.5, 0.5]), torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128))
    heads, head_dim = 4, 16
    assert len(seen) == 2
    # the largest tensors are the float32 query / key (H x L x d) and the 9 instruction rows (H x 9 x L)
    assert max(seen) <= heads * length * head_dim < length * length
