"""Model-level invariants of DESIGN.md section 7, on every supported family (tests/families.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import atp
from atp.host.attach import resolve_adapter
from atp.host.compat import output_cache
from tests.families import FAMILIES, Family, visual_mask
from tests.numerics import REORDERED, assert_same_continuation, assert_same_greedy, greedy_steps

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")
BY_NAME = {family.key: family for family in FAMILIES}


@pytest.fixture(params=FAMILIES, ids=lambda family: family.key)
def family(request) -> Family:
    return request.param


@pytest.fixture
def model(family):
    return family.model()


@pytest.fixture
def batch(family, model):
    return family.batch(model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def random_masks(
    batch_size: int, width: int, layers: int, seed: int, min_keep: int = 1
) -> list[torch.Tensor]:
    """Cumulative random keep masks with different kept counts per sample."""
    generator = torch.Generator().manual_seed(seed)
    masks, current = [], torch.ones(batch_size, width, dtype=torch.bool)
    for _ in range(layers):
        current = current & (torch.rand(batch_size, width, generator=generator) < 0.6)
        current[:, :min_keep] = True
        masks.append(current.clone())
    return masks


def width(model, inputs) -> int:
    return int(visual_mask(model, inputs).sum(1).max())


def comparable_positions(model, inputs, keep_mask):
    """Text (non-pad) positions and the visual positions kept by ``keep_mask``, (B, L) bool."""
    visual = visual_mask(model, inputs)
    out = ~visual & inputs["attention_mask"].bool()
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().flatten()
        out[b, positions[keep_mask[b, : len(positions)]]] = True
    return out


def test_keep_all_equals_unattached(family, model, batch):
    ref, ref_gen = logits(model, batch), greedy_steps(model, batch, 6)
    real = batch["attention_mask"].bool()  # padding rows are fully masked: their output is unspecified
    counts = visual_mask(model, batch).sum(1)
    # the same operations in the same order: bitwise, except where experts are routed (their matmul
    # shapes follow the padding rows' routing: a reordering, tests/numerics.py)
    tolerance = REORDERED if family.routed else {"atol": 0, "rtol": 0}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 2, 3], policy="keep_all", prune_mode=mode) as handle:
            torch.testing.assert_close(logits(model, batch)[real], ref[real], **tolerance)
            # decode steps: an all-zero bias instead of no mask may take another SDPA kernel (a reordering)
            assert_same_greedy(greedy_steps(model, batch, 6), ref_gen)
            assert handle.stats.kept.tolist() == [[int(n)] * 3 for n in counts]


def test_keep_all_sampling_matches_unattached(model, batch):
    def sample():
        torch.manual_seed(7)
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20)

    ref = sample()
    with atp.attach(model, layers=[2], policy="keep_all"):  # the same draws; decode probabilities may
        assert torch.equal(sample(), ref)  # differ in the last bit (SDPA kernel), ~1e-7 a draw to change


@pytest.mark.parametrize("layers", [[1], [1, 3], [2, 3], [1, 2, 3]])
def test_drop_equals_mask_with_the_same_binary_masks(model, batch, layers):
    masks = random_masks(2, width(model, batch), len(layers), seed=sum(layers))
    results = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=layers, policy="manual", keep_masks=masks, prune_mode=mode) as handle:
            results[mode] = (logits(model, batch), greedy_steps(model, batch, 6), handle.stats)
    compare = comparable_positions(model, batch, masks[-1])
    torch.testing.assert_close(results["drop"][0][compare], results["mask"][0][compare], **REORDERED)
    assert_same_greedy(results["drop"][1], results["mask"][1])
    assert torch.equal(results["drop"][2].kept, results["mask"][2].kept)


def test_drop_equals_mask_when_sampling(model, batch):
    masks = random_masks(2, width(model, batch), 2, seed=21)
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks, prune_mode=mode):
            torch.manual_seed(3)
            with torch.no_grad():
                out[mode] = model.generate(
                    **batch, max_new_tokens=8, do_sample=True, top_k=0, temperature=1.0
                )
    # the same seeded draws from probabilities that agree to ~1e-6 relative (tests/numerics.py): a
    # token changes only where a draw's top two candidates are that close, ~1e-6 per draw (16 here)
    assert torch.equal(out["drop"], out["mask"])


def test_drop_output_is_scattered_back_and_the_cache_shrinks(model, batch):
    masks = random_masks(2, width(model, batch), 1, seed=3)
    with atp.attach(model, layers=[2], policy="manual", keep_masks=masks), torch.no_grad():
        out = model(**batch, use_cache=True)
    length = batch["input_ids"].shape[1]
    assert out.logits.shape[:2] == batch["input_ids"].shape
    counts = visual_mask(model, batch).sum(1)
    pruned = counts - (masks[0][:, : counts.max()] & (torch.arange(counts.max()) < counts[:, None])).sum(1)
    layers = holding(output_cache(out))
    widths = [length] * 2 + [length - int(pruned.min())] * (len(layers) - 2)  # the longest sample sets it
    assert [layer.keys.shape[2] for layer in layers] == stored(widths, layers)


def test_batch_equals_each_sample_alone(family, model, batch):
    masks = random_masks(2, width(model, batch), 2, seed=11)
    counts = visual_mask(model, batch).sum(1)
    last = masks[-1] & (torch.arange(masks[-1].shape[1]) < counts[:, None])
    if last[0].sum() == last[1].sum():  # make the kept counts differ per sample
        masks[-1][1, last[1].nonzero().flatten()[-1]] = False
    with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks) as handle:
        batch_logits, (batch_tokens, batch_scores) = logits(model, batch), greedy_steps(model, batch, 6)
        batch_kept = handle.stats.kept
    assert batch_kept[0, -1] != batch_kept[1, -1]  # different kept counts per sample
    total = batch["input_ids"].shape[1]
    for b in range(2):
        alone = family.single(model, b)
        row_masks = [mask[b : b + 1] for mask in masks]
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=row_masks) as handle:
            single_logits, (tokens, scores) = logits(model, alone), greedy_steps(model, alone, 6)
            assert handle.stats.kept[0].tolist() == batch_kept[b].tolist()
        length = alone["input_ids"].shape[1]
        compare = comparable_positions(model, alone, row_masks[-1])[0]
        torch.testing.assert_close(
            batch_logits[b, total - length :][compare], single_logits[0][compare], **REORDERED
        )
        assert_same_continuation((batch_tokens[b], batch_scores[b]), (tokens[0], scores[0]))


def test_atp_policy_batch_equals_singles_and_scores_agree_across_modes(family, batch):
    model = family.model()
    options = {"init_theta_r": 0.45, "init_theta_s": 0.9, "temperature": 200.0}
    with atp.attach(model, layers=[1, 3], **options) as handle:
        batch_tokens, batch_scores = greedy_steps(model, batch, 6)
        batch_masks = handle.stats.masks
    assert (handle.stats.kept < handle.stats.num_visual[:, None]).any()  # it does prune
    for b in range(2):
        alone = family.single(model, b)
        with atp.attach(model, layers=[1, 3], **options) as handle:
            tokens, scores = greedy_steps(model, alone, 6)
            count = int(handle.stats.num_visual[0])
            assert all(torch.equal(m[0], bm[b, :count]) for m, bm in zip(handle.stats.masks, batch_masks))
        assert_same_continuation((batch_tokens[b], batch_scores[b]), (tokens[0], scores[0]))
    captured = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], prune_mode=mode, **options) as handle:
            scores: list = []
            original = handle.policy.decide

            def recording(inputs, _original=original, _scores=scores):
                _scores.append(inputs.scores)
                return _original(inputs)

            handle.policy.decide = recording
            logits(model, batch)
            captured[mode] = (scores, handle.stats.masks)
    for drop_scores, mask_scores in zip(captured["drop"][0], captured["mask"][0]):
        for name in drop_scores:  # |score| <= 1 from the queries and keys of layer <= 3, reordered:
            # ~sqrt(128) * 2**-24 ~ 7e-7 per layer's dot products (tests/numerics.py), a few e-6 in all
            torch.testing.assert_close(drop_scores[name], mask_scores[name], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(captured["drop"][1], captured["mask"][1]))


def test_detach_equals_never_attached(model, batch):
    ref = logits(model, batch)

    def all_hooks():  # transformers installs its own output-capturing hooks on first use
        return [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()]

    hooks_before = all_hooks()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config.text_config._attn_implementation
    handle = atp.attach(model, layers=[1, 2], policy="fixed", keep=[8, 4])
    assert "atp" in dict(model.named_children())
    logits(model, batch)
    handle.remove()
    assert torch.equal(logits(model, batch), ref)
    assert model.config.text_config._attn_implementation == impl
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all_hooks() == hooks_before
    assert "generate" not in model.__dict__
    atp.attach(model, layers=[1])
    atp.detach(model)
    assert torch.equal(logits(model, batch), ref)


def test_kept_tokens_keep_their_original_rotary_positions_and_text_stays(model, batch):
    """cos / sin after pruning are the original ones of the kept tokens (1D RoPE and M-RoPE)."""
    masks = random_masks(2, width(model, batch), 2, seed=5)
    visual = visual_mask(model, batch)
    seen = {}

    def capture(layer):
        def hook(module, args, kwargs):
            if args[0].shape[1] > 1:  # prefill only
                seen[layer] = kwargs["position_embeddings"][0].expand(2, -1, -1).clone()

        return hook

    decoder = resolve_adapter(model).decoder_layers()
    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(decoder)]
    logits(model, batch)
    original, seen = seen, {}  # each layer's own cos (layer types may have rotaries of their own)
    handle = atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks)
    for hook in hooks:  # after atp's hooks now
        hook.remove()
    for i, layer in enumerate(decoder):
        layer.register_forward_pre_hook(capture(i), with_kwargs=True)
    logits(model, batch)
    handle.remove()
    for layer, keep in ((1, masks[0]), (2, masks[0]), (3, masks[1])):
        for b in range(2):
            positions = visual[b].nonzero().flatten()
            kept_visual = positions[keep[b, : len(positions)]]
            slots = torch.cat([(~visual[b]).nonzero().flatten(), kept_visual]).sort().values
            got = seen[layer][b][-len(slots) :]
            assert torch.equal(got, original[layer][b][slots])  # original positions, every text token present


def test_stats_agree_with_masks_and_the_kv_cache(model, batch):
    masks = random_masks(2, width(model, batch), 2, seed=9)
    counts = visual_mask(model, batch).sum(1)
    with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks) as handle:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        stats = handle.stats
    valid = torch.arange(masks[0].shape[1]) < counts[:, None]
    for k in range(2):
        assert torch.equal(stats.masks[k], masks[k] & valid)
        assert stats.kept[:, k].tolist() == (masks[k] & valid).sum(1).tolist()
    assert bool((stats.masks[1] <= stats.masks[0]).all())
    n = len(resolve_adapter(model).decoder_layers())
    expected = [(counts[b] + 2 * stats.kept[b, 0] + (n - 3) * stats.kept[b, 1]).item() / n for b in range(2)]
    assert stats.avg_tokens == pytest.approx(sum(expected) / 2)  # float32 / n vs double: 2**-24 relative
    length = batch["input_ids"].shape[1]
    layers = holding(output_cache(out))
    kept = [length - int((counts - stats.kept[:, k]).min()) for k in (0, 1)]
    widths = [length] + [kept[0]] * 2 + [kept[1]] * (len(layers) - 3)
    # K and V of (batch 2, heads, tokens, head dim) per layer: layer types may differ in heads and width
    per_token = [
        2 * 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size() for layer in layers
    ]
    expected = sum(tokens * size for tokens, size in zip(stored(widths, layers), per_token))
    assert atp.kv_cache_bytes(output_cache(out)) == expected


def holding(cache) -> list:
    """The cache layers that hold keys: a layer reading another's keys (Gemma 4's KV-shared layers, the
    last ones) has an empty entry (transformers >= 5.24) or none (before)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def stored(widths: list[int], cache_layers) -> list[int]:
    """Tokens each cache layer holds after a prefill of ``widths`` tokens per layer: all of them, or
    the last ``window - 1`` in a sliding-window layer."""
    return [
        min(w, layer.sliding_window - 1) if getattr(layer, "sliding_window", None) else w
        for w, layer in zip(widths, cache_layers)
    ]


@settings(max_examples=15)
@given(
    st.sampled_from([f.key for f in FAMILIES]),
    st.integers(0, 10_000),
    st.sampled_from([[1], [2], [1, 3], [2, 3]]),
)
def test_random_keep_sets_drop_equals_mask(name, seed, layers):
    model, inputs = _shared(name)
    generator = torch.Generator().manual_seed(seed)
    masks, current = [], torch.ones(2, width(model, inputs), dtype=torch.bool)
    for _ in layers:
        current = current & (
            torch.rand(current.shape, generator=generator) < torch.rand(1, generator=generator)
        )
        masks.append(current.clone())
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=layers, policy="manual", keep_masks=masks, prune_mode=mode) as handle:
            out[mode] = (logits(model, inputs), handle.stats.kept)
    compare = comparable_positions(model, inputs, masks[-1])
    torch.testing.assert_close(out["drop"][0][compare], out["mask"][0][compare], **REORDERED)
    assert torch.equal(out["drop"][1], out["mask"][1])


_SHARED: dict = {}


def _shared(name: str):
    if name not in _SHARED:
        model = BY_NAME[name].model(seed=3)
        _SHARED[name] = (model, BY_NAME[name].batch(model))
    return _SHARED[name]
