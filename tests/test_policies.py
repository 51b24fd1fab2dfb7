"""Baselines and ablations: each keep set matches its definition; shared invariants per policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import atp
from atp.host.compat import output_cache
from atp.plugins import registry
from atp.policies import FixedPolicy, PolicyContext
from atp.tiny.models import tiny_llava
from tests.families import BY_NAME_FAMILIES as FAMILY
from tests.families import visual_mask
from tests.numerics import REORDERED, assert_same_continuation, assert_same_greedy, greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")

POLICIES = {  # name -> options, for layers [1, 3]
    "atp": {"init_theta_r": 0.45, "init_theta_s": 0.9, "temperature": 200.0},
    "fixed": {"keep": [10, 0.5]},
    "pdrop": {"ratio": 0.5},
    "spatial": {"strides": [2, 4]},
    "random": {"keep": [0.5, 3], "seed": 3},
}


def assert_top_k(kept: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """``kept`` (N,) keeps the ``count`` highest of the reference ``scores`` (N,), computed in another
    order than the policy's own: a token may swap only with one whose score ties it within rounding.
    The scores are attention probabilities p of logits below 1: the policy's (row softmax of the last
    query, after SDPA layers) and eager's (full matrix, after eager layers) differ by ~(16 + L) *
    2**-24 * p ~ 1e-5 * p for the 16-term dot products (and the hidden states' reordering before
    them, ~1e-6) and the L <= 100 terms of each softmax sum; twice that bounds a tie."""
    assert kept.shape == scores.shape and int(kept.sum()) == count
    cut = scores.topk(count).values[-1] if count else scores.max() + 1
    tie = 2e-5 * float(scores.abs().max())
    assert bool(kept[scores > cut + tie].all()) and not bool(kept[scores < cut - tie].any())


def eager_attention_rows(model, batch, layer):
    """Attention probabilities of the unmodified model at ``layer`` (eager), (B, H, L, L)."""
    model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    model.set_attn_implementation({"text_config": "sdpa"})
    return attentions[layer]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(("k", "ratio"), [(1, 0.5), (2, 0.75), (3, 0.25)])
def test_fastv_keeps_the_top_k_of_the_last_tokens_eager_attention(family, k, ratio):
    case = FAMILY[family]
    model = case.model()
    batch = case.batch(model)
    visual = visual_mask(model, batch)
    rows = eager_attention_rows(model, batch, k - 1)[:, :, -1, :].mean(1)  # last token, mean over heads
    with atp.attach(model, layers=[k], policy="fastv", ratio=ratio) as handle:
        with torch.no_grad():
            model(**batch)
        kept = handle.stats.masks[0]
    for b in range(2):
        scores = rows[b][visual[b]]
        assert_top_k(kept[b, : len(scores)], scores, round(len(scores) * (1 - ratio)))


def test_pdrop_keeps_a_fixed_ratio_per_stage_ranked_by_the_last_token():
    model = tiny_llava(num_layers=4)
    batch = FAMILY["llava"].batch(model)
    first = eager_attention_rows(model, batch, 0)[:, :, -1, :].mean(1)
    with atp.attach(model, layers=[1, 2, 3], policy="pdrop", ratio=0.5) as handle:
        with torch.no_grad():
            model(**batch)
        stats = handle.stats
    assert stats.kept.tolist() == [[8, 4, 2], [8, 4, 2]]
    visual = visual_mask(model, batch)
    for b in range(2):
        assert_top_k(stats.masks[0][b], first[b][visual[b]], 8)


def test_spatial_keeps_exactly_the_uniform_grids():
    model = tiny_llava(num_layers=4, image_size=64)  # an 8 x 8 grid of visual tokens
    batch = {
        "input_ids": torch.tensor([[1, 5] + [127] * 64 + [6, 7]]),
        "pixel_values": torch.randn(1, 3, 64, 64),
    }
    with atp.attach(model, layers=[1, 3], policy="spatial", strides=[2, 4]) as handle:
        with torch.no_grad():
            model(**batch)
        masks = handle.stats.masks
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    assert torch.equal(masks[0][0], (rows % 2 == 0) & (cols % 2 == 0))
    assert torch.equal(masks[1][0], (rows % 4 == 0) & (cols % 4 == 0))


def test_random_meets_the_budget_and_is_seeded(model, batch):
    results = []
    for seed in (3, 3, 4):
        with atp.attach(model, layers=[1, 3], policy="random", keep=[0.5, 3], seed=seed) as handle:
            with torch.no_grad():
                model(**batch)
            results.append(handle.stats)
    assert results[0].kept.tolist() == [[8, 3], [8, 3]]
    assert all(torch.equal(a, b) for a, b in zip(results[0].masks, results[1].masks))
    assert not all(torch.equal(a, b) for a, b in zip(results[0].masks, results[2].masks))


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_policy_gives_the_same_tokens_and_logits_in_drop_and_mask_mode(policy, family):
    case = FAMILY[family]
    model = case.model()
    batch = case.batch(model)
    results = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy=policy, prune_mode=mode, **POLICIES[policy]) as handle:
            with torch.no_grad():
                logits = model(**batch).logits
            generated = greedy_steps(model, batch, 4)
            results[mode] = (handle.stats.masks, logits, generated)
    drop, mask = results["drop"], results["mask"]
    assert all(torch.equal(a, b) for a, b in zip(drop[0], mask[0]))
    assert_same_greedy(drop[2], mask[2])  # same seed, same calls: random draws the same sets
    visual = visual_mask(model, batch)
    compare = ~visual & batch["attention_mask"].bool()
    torch.testing.assert_close(drop[1][compare], mask[1][compare], **REORDERED)


@pytest.mark.parametrize("policy", ["fixed", "pdrop", "spatial", "fastv"])
def test_deterministic_policies_give_each_sample_alone_the_same_tokens(policy):
    case = FAMILY["qwen2_vl"]
    model = case.model()
    batch = case.batch(model)
    layers, options = ([2], {"ratio": 0.5}) if policy == "fastv" else ([1, 3], POLICIES[policy])
    with atp.attach(model, layers=layers, policy=policy, **options) as handle:
        with torch.no_grad():
            model(**batch)
        batch_masks = handle.stats.masks
    for b in range(2):
        alone = case.single(model, b)
        with atp.attach(model, layers=layers, policy=policy, **options) as handle:
            with torch.no_grad():
                model(**alone)
            count = int(handle.stats.num_visual[0])
            assert all(torch.equal(m[0], bm[b, :count]) for m, bm in zip(handle.stats.masks, batch_masks))


def test_policy_option_errors(model):
    with pytest.raises(ValueError, match="fastv prunes once"):
        atp.attach(model, layers=[1, 2], policy="fastv")
    with pytest.raises(ValueError, match=r"option ratio must be a number in \[0, 1\), got 1.0"):
        atp.attach(model, layers=[2], policy="fastv", ratio=1.0)
    with pytest.raises(ValueError, match="option strides has 1 entries but there are 2 ATP layers"):
        atp.attach(model, layers=[1, 2], policy="spatial", strides=[2])
    with pytest.raises(ValueError, match=r"the 'random' policy needs keep=\[...\], one count or fraction"):
        atp.attach(model, layers=[1], policy="random")


CONTEXT = PolicyContext((1, 3), 4, 16)
VALID = {  # name -> (context, options that build), for the option checks below
    "atp": (CONTEXT, {}),
    "keep_all": (CONTEXT, {}),
    "fixed": (CONTEXT, {"keep": [8, 0.5]}),
    "random": (CONTEXT, {"keep": [8, 0.5]}),
    "manual": (CONTEXT, {"keep_masks": [torch.ones(1, 16, dtype=torch.bool)] * 2}),
    "fastv": (PolicyContext((2,), 4, 16), {}),
    "pdrop": (CONTEXT, {}),
    "spatial": (CONTEXT, {"strides": [2, 4]}),
    "pool": (PolicyContext((0,), 4, 16), {}),
}
BUILT_IN_OPTIONS = [
    (name, option) for name in VALID for option in registry().get("policy", name).factory.option_names()
]


def build(name, **options):
    context, valid = VALID[name]
    return registry().get("policy", name).factory(context, **{**valid, **options})


def test_every_built_in_policy_is_covered_by_the_option_checks():
    builtin = {e.name for e in registry().entries() if e.kind == "policy" and e.origin.split()[0] == "atp"}
    assert builtin <= set(VALID)
    for name in VALID:
        build(name)


@pytest.mark.parametrize(("name", "option"), BUILT_IN_OPTIONS)
def test_every_option_of_every_built_in_policy_refuses_a_wrong_type_by_name(name, option):
    with pytest.raises((TypeError, ValueError)) as error:
        build(name, **{option: object()})
    message = str(error.value)
    assert f"policy {name!r}" in message and f"option {option}" in message and "got <object object" in message


@pytest.mark.parametrize(
    ("name", "options", "error", "message"),
    [
        (
            "fixed",
            {"keep": "0.5"},
            TypeError,
            r"option keep must be a list .*, got '0.5' \(type str\); e.g. keep=\[0.5, 0.5\]",
        ),
        (
            "fixed",
            {"keep": 0.5},
            TypeError,
            r"one count or fraction per ATP layer \(layers \[1, 3\]\), got 0.5; e.g. keep=\[0.5, 0.5\]",
        ),
        (
            "fixed",
            {"keep": [4, 8]},
            ValueError,
            r"keep\[1\] = 8 is more than keep\[0\] = 4: .*can only shrink or stay",
        ),
        (
            "fixed",
            {"keep": [float("nan"), 2]},
            ValueError,
            r"keep\[0\] must be an int count >= 0 or a float fraction in \(0, 1\], got nan",
        ),
        (
            "fixed",
            {"keep": [True, 2]},
            TypeError,
            r"keep\[0\] must be an int count .*, got True \(type bool\)",
        ),
        ("fixed", {"keep": ["4", 2]}, TypeError, r"got '4' \(type str\); give the number itself"),
        (
            "fixed",
            {"keep": np.array([4, 2])},
            TypeError,
            r"got array\(\[4, 2\]\) \(type ndarray\); e.g. keep=\[4, 2\]",
        ),
        (
            "fixed",
            {"scorer_options": {"x": 1}},
            ValueError,
            "scorer_options has x, which RedundancyScorer does not take",
        ),
        (
            "fixed",
            {"scorer": "nope"},
            ValueError,
            "option scorer must be a registered scorer name, one of: .*redundancy .*got 'nope'",
        ),
        (
            "random",
            {"seed": None},
            TypeError,
            r"policy 'random': option seed must be an int in \[0, \d+\], got None",
        ),
        ("random", {"seed": -1}, ValueError, "option seed must be an int in .*, got -1"),
        (
            "fastv",
            {"ratio": "0.5"},
            TypeError,
            r"option ratio must be a number in \[0, 1\), got '0.5' \(type str\); "
            r"give the number itself \(ratio=0.5\)",
        ),
        ("fastv", {"ratio": float("inf")}, ValueError, r"ratio must be a finite number in \[0, 1\), got inf"),
        (
            "pdrop",
            {"ratio": 0},
            ValueError,
            r"policy 'pdrop': option ratio must be a number in \(0, 1\], got 0",
        ),
        (
            "spatial",
            {"strides": [2, 3]},
            ValueError,
            r"strides\[1\] = 3 is not a multiple of 2.*e.g. strides\[1\] = 4",
        ),
        (
            "spatial",
            {"strides": [2, 4], "lambda_sample": 5},
            ValueError,
            r"lambda_sample must be a number in \(0, 4\), got 5",
        ),
        ("pool", {"stride": 2.0}, TypeError, "policy 'pool': option stride must be an int >= 2, got 2.0"),
        (
            "manual",
            {"keep_masks": [torch.ones(1, 16)] * 2},
            TypeError,
            r"keep_masks\[0\] must be a BoolTensor .*got a torch.float32 tensor of shape \(1, 16\)",
        ),
        (
            "atp",
            {"temperature": 0},
            ValueError,
            "policy 'atp': option temperature must be a number > 0, got 0",
        ),
        ("atp", {"init_theta_s": None}, TypeError, r"init_theta_s must be a number in \(0, 1\), got None"),
        (
            "atp",
            {"lambda_sample": float("nan")},
            ValueError,
            "lambda_sample must be a finite number > 0, got nan",
        ),
        (
            "atp",
            {"spatial_strides": []},
            TypeError,
            r"spatial_strides must be None .* non-empty list .*e.g. spatial_strides=\[2, 4, 8\]",
        ),
        ("atp", {"bins": 1}, ValueError, "option bins must be an int >= 2, got 1"),
        ("atp", {"use_self": 0}, TypeError, "option use_self must be True or False, got 0"),
        (
            "atp",
            {"use_redundant": False, "use_spatial": False},
            ValueError,
            "both False, but the mask needs at least one",
        ),
        (
            "atp",
            {"threshold_head": "nope"},
            ValueError,
            "option threshold_head must be a registered threshold_head name, one of: binned, constant, paper",
        ),
    ],
)
def test_bad_option_values_say_what_is_wrong_and_what_to_give(name, options, error, message):
    with pytest.raises(error, match=message):
        build(name, **options)


def test_numpy_and_tensor_numbers_are_accepted_and_stored_as_plain_python():
    fixed = build("fixed", keep=[np.int64(8), np.float32(0.5)])
    assert fixed.keep == [8, 0.5] and [type(k) for k in fixed.keep] == [int, float]
    assert build("random", keep=(torch.tensor(8), torch.tensor(0.5)), seed=np.int64(3)).keep == [8, 0.5]
    assert type(build("fastv", ratio=np.float32(0.25)).ratio) is float
    atp_policy = build(
        "atp", temperature=torch.tensor(50.0), hidden_size=np.int64(8), use_self=np.bool_(True)
    )
    assert atp_policy.use_self is True and atp_policy.heads[0].proj.out_features == 8
    assert build("spatial", strides=[np.int64(2), 4]).strides == [2, 4]


def test_options_given_as_numpy_scalars_save_as_json_and_reload(model, batch, tmp_path):
    import json

    layers = [torch.tensor(1), np.int64(3)]  # layers take the same numbers as options
    with atp.attach(model, layers=layers, policy="fixed", keep=[np.int64(8), np.float32(0.5)]) as handle:
        json.dumps(handle.config())  # plain numbers only
        assert handle.layers == (1, 3) and all(type(layer) is int for layer in handle.layers)
        handle.save_pretrained(tmp_path)
        with torch.no_grad():
            model(**batch)
        kept = handle.stats.kept.tolist()
    assert json.loads((tmp_path / "atp_config.json").read_text())["options"] == {"keep": [8, 0.5]}
    with atp.attach(model, from_pretrained=tmp_path) as handle:
        with torch.no_grad():
            model(**batch)
        assert handle.policy.keep == [8, 0.5] and handle.stats.kept.tolist() == kept == [[8, 4], [8, 4]]


def counts_and_fractions():
    count = st.integers(0, 40)
    return st.lists(st.one_of(count, st.floats(0.01, 1.0)), min_size=1, max_size=5)


@given(counts_and_fractions())
def test_a_keep_schedule_builds_exactly_when_its_counts_never_grow(keep):
    counts = [k for k in keep if isinstance(k, int)]
    context = PolicyContext(tuple(range(1, len(keep) + 1)), len(keep) + 1, None)
    if all(later <= earlier for earlier, later in zip(counts, counts[1:])):
        assert FixedPolicy(context, keep=keep).keep == keep
    else:
        with pytest.raises(ValueError, match="counts can only shrink or stay from one ATP layer to the next"):
            FixedPolicy(context, keep=keep)


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        ({"use_spatial": False}, "redundant"),
        ({"use_redundant": False}, "spatial"),
        ({}, "both"),
        ({"use_cross": False, "use_spatial": False}, "self"),
        ({"use_self": False, "use_spatial": False}, "cross"),
    ],
)
def test_atp_ablations_keep_what_their_rule_says(model, batch, options, rule):
    """Untrained heads give constant thresholds, so each ablation's keep set is a plain rule."""
    from atp.scorers.normalize import minmax_normalize

    theta_r, theta_s = 0.5, 0.2  # the stride-2 grid (score 0.25) survives theta_s
    captured = []
    with atp.attach(
        model, layers=[2], init_theta_r=theta_r, init_theta_s=theta_s, temperature=1000.0, **options
    ) as handle:
        original = handle.policy.decide
        handle.policy.decide = lambda inputs, _o=original: (captured.append(inputs), _o(inputs))[1]
        with torch.no_grad():
            model(**batch)
        kept = handle.stats.masks[0]
    inputs = captured[0]
    n_self = minmax_normalize(inputs.scores["s_self"], inputs.live)
    n_cross = minmax_normalize(inputs.scores["s_cross"], inputs.live)
    redundant = {"self": n_self, "cross": n_cross}.get(rule, (n_self + n_cross) / 2) > theta_r
    spatial = inputs.spatial > theta_s
    expected = {"redundant": redundant, "spatial": spatial, "both": redundant | spatial}.get(rule, redundant)
    assert torch.equal(kept, expected & inputs.live)
    assert 0 < int(kept.sum()) < kept.numel()


def test_renumbered_positions_close_the_gaps_and_keep_the_invariants():
    case = FAMILY["llava"]
    model = case.model()
    batch = case.batch(model)
    masks = [torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5]
    masks[0][1, :3] = False  # different counts per sample
    seen = {}
    handle = atp.attach(model, layers=[2], policy="manual", keep_masks=masks, positions="renumber")
    hook = model.model.language_model.layers[3].register_forward_pre_hook(
        lambda m, a, k: seen.update(ids=k["position_ids"].clone()) if a[0].shape[1] > 1 else None,
        with_kwargs=True,
    )
    positions = torch.arange(batch["input_ids"].shape[1])[None].expand(2, -1)
    with torch.no_grad():
        model(**batch, position_ids=positions)
    hook.remove()
    handle.remove()
    for b in range(2):
        kept = 16 - int((masks[0][b]).sum())
        ids = seen["ids"][b][-(batch["input_ids"].shape[1] - kept) :]
        assert torch.equal(ids, torch.arange(len(ids)) + int(positions[b, 0]))  # contiguous, gaps closed
    with atp.attach(model, layers=[2], policy="manual", keep_masks=masks, positions="renumber"):
        batch_tokens, batch_scores = greedy_steps(model, batch, 5)
    for b in range(2):
        alone = case.single(model, b)
        with atp.attach(
            model, layers=[2], policy="manual", keep_masks=[masks[0][b : b + 1]], positions="renumber"
        ):
            tokens, scores = greedy_steps(model, alone, 5)
        assert_same_continuation((batch_tokens[b], batch_scores[b]), (tokens[0], scores[0]))
    with torch.no_grad():
        plain = model(**batch).logits
    handle = atp.attach(
        model, layers=[2], policy="keep_all", positions="renumber"
    )  # nothing pruned: unchanged
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)
    handle.remove()


def test_position_keepers_are_refused_where_they_do_not_apply():
    model = FAMILY["qwen2_vl"].model()
    for positions in ("renumber", "rope2d"):
        with pytest.raises(ValueError, match=f"positions='{positions}' works with 1d-rope models"):
            atp.attach(model, layers=[1], positions=positions)
    llava = tiny_llava(num_layers=4)
    with pytest.raises(ValueError, match="needs prune_mode='drop'"):
        atp.attach(llava, layers=[1], positions="renumber", prune_mode="mask")


def test_rope2d_gives_visual_tokens_row_and_column_positions(model, batch):
    seen = {}
    handle = atp.attach(model, layers=[2], policy="keep_all", positions="rope2d")
    model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(cos=k["position_embeddings"][0].clone()), with_kwargs=True
    )
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # padding-free, as generate's
    with torch.no_grad():
        model(**batch, position_ids=positions)
    inv_freq = model.model.language_model.rotary_emb.inv_freq[0::2]  # 4 bands per axis (head_dim 16)
    visual = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        slots = visual[b].nonzero().flatten()
        first = int(positions[b, slots[0]])  # the image's first position id, not its slot
        for index, slot in enumerate(slots.tolist()):
            row, col = divmod(index, 4)
            angles = torch.cat([(first + row) * inv_freq, (first + col) * inv_freq])
            # the same float32 angles (one rounding of an integer times inv_freq), cos of tensors of
            # other shapes: a vectorised cos may round the last bit otherwise; the default float32
            # tolerance (1.3e-6 relative, 1e-5 absolute) is a few ulps of values <= 1
            torch.testing.assert_close(seen["cos"][b, slot], torch.cat([angles, angles]).cos())
        text = (~visual[b] & batch["attention_mask"][b].bool()).nonzero().flatten()
        plain = torch.cat(
            [positions[b, text, None] * model.model.language_model.rotary_emb.inv_freq] * 2, -1
        ).cos()
        torch.testing.assert_close(seen["cos"][b, text], plain)  # as above
    handle.remove()


def test_rope2d_changes_the_model_but_drop_still_equals_mask(model, batch):
    with torch.no_grad():
        plain = model(**batch).logits
    masks = [torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.6]
    out = {}
    for mode in ("drop", "mask"):
        with (
            atp.attach(
                model, layers=[2], policy="manual", keep_masks=masks, positions="rope2d", prune_mode=mode
            ),
            torch.no_grad(),
        ):
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            out[mode] = (model(**batch, position_ids=positions).logits, greedy_steps(model, batch, 4))
    text = (batch["input_ids"] != model.config.image_token_id) & batch["attention_mask"].bool()
    torch.testing.assert_close(out["drop"][0][text], out["mask"][0][text], **REORDERED)
    assert_same_greedy(out["drop"][1], out["mask"][1])
    # PP is a different model: its logits are not those of the plain one up to rounding (10x REORDERED)
    assert not torch.allclose(out["drop"][0][text], plain[text], atol=1e-3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pooling_before_the_llm_averages_blocks_and_keeps_the_invariants(family):
    case = FAMILY[family]
    model = case.model()
    batch = case.batch(model)
    seen = {}
    results = {}
    for mode in ("drop", "mask"):
        handle = atp.attach(model, policy="pool", prune_mode=mode)
        layer0 = handle.runtime.adapter.decoder_layers()[0]
        hook = layer0.register_forward_pre_hook(
            lambda m, a, k, _mode=mode: seen.update({_mode: a[0].clone()}) if a[0].shape[1] > 1 else None,
            with_kwargs=True,
        )
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        generated = greedy_steps(model, batch, 5)
        hook.remove()
        results[mode] = (out.logits, generated, handle.stats, output_cache(out))
        handle.remove()
    stats = results["drop"][2]
    assert stats.layers == (0,)
    counts = visual_mask(model, batch).sum(1)
    assert torch.equal(stats.kept[:, 0], counts // 4)  # 2 x 2 blocks (every grid side here is even)
    length = batch["input_ids"].shape[1]
    assert results["drop"][3].layers[0].keys.shape[2] == length - int(
        (counts - counts // 4).min()
    )  # layer 0 shrinks
    assert_same_greedy(results["drop"][1], results["mask"][1])
    text = ~visual_mask(model, batch) & batch["attention_mask"].bool()
    torch.testing.assert_close(results["drop"][0][text], results["mask"][0][text], **REORDERED)
    # the kept token of each block carries the block's mean input embedding
    embeds = {}
    adapter = atp.attach(model, policy="keep_all", layers=[1]).runtime.adapter
    grab = adapter.language_model().register_forward_pre_hook(
        lambda m, a, k: embeds.update(x=k["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    grab.remove()
    atp.detach(model)
    from atp.policies.pool import block_targets

    visual = visual_mask(model, batch)
    width = int(counts.max())
    targets = block_targets(stats_grids(model, batch), width, 2)
    for b in range(2):
        positions = visual[b].nonzero().flatten()
        vis = embeds["x"][b, positions]
        target_of = targets[b, : len(positions)]
        first = int(target_of.unique()[0])
        block = vis[target_of == first]
        kept_rows = seen["mask"][b, positions]  # mask mode keeps the layout: the pooled token sits in place
        # a float32 sum of the 4 rows (divided by 4: exact) in any order rounds within 3 * 2**-24 of
        # the sum of their magnitudes (gamma_3): the two means are within twice that
        bound = 2 * 3 * 2**-24 * block.abs().sum(0) / len(block)
        assert bool(((kept_rows[first] - block.mean(0)).abs() <= bound).all())
    for b in range(2):  # each sample alone generates the same tokens
        alone = case.single(model, b)
        with atp.attach(model, policy="pool"):
            tokens, scores = greedy_steps(model, alone, 5)
        batch_tokens, batch_scores = results["drop"][1]
        assert_same_continuation((batch_tokens[b], batch_scores[b]), (tokens[0], scores[0]))


def stats_grids(model, batch):
    with atp.attach(model, policy="pool") as handle:
        with torch.no_grad():
            model(**batch)
        return handle.runtime.prefill.context["grids"]


def test_pooling_refuses_layers(model):
    with pytest.raises(ValueError, match="acts before the language model: leave layers out"):
        atp.attach(model, layers=[2], policy="pool")
    with pytest.raises(ValueError, match="stride must be an int >= 2"):
        atp.attach(model, policy="pool", stride=1)
