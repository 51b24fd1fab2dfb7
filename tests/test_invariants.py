"""Model-level invariants of DESIGN.md section 7 on a tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import atp
from atp.testing import tiny_llava
from tests.conftest import single

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=6, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


def random_masks(batch: int, width: int, layers: int, seed: int, min_keep: int = 1) -> list[torch.Tensor]:
    """Cumulative random keep masks with different kept counts per sample."""
    generator = torch.Generator().manual_seed(seed)
    masks, current = [], torch.ones(batch, width, dtype=torch.bool)
    for _ in range(layers):
        current = current & (torch.rand(batch, width, generator=generator) < 0.6)
        current[:, :min_keep] = True
        masks.append(current.clone())
    return masks


def comparable_positions(model, inputs, keep_mask):
    """Text (non-pad) positions and kept visual positions of the final layer, (B, L) bool."""
    ids = inputs["input_ids"]
    visual = ids == model.config.image_token_id
    out = ~visual & inputs.get("attention_mask", torch.ones_like(ids)).bool()
    for b in range(ids.shape[0]):
        positions = visual[b].nonzero().flatten()
        out[b, positions[keep_mask[b, : len(positions)]]] = True
    return out


def test_keep_all_equals_unattached(model, batch):
    ref, ref_gen = logits(model, batch), greedy(model, batch)
    real = batch["attention_mask"].bool()  # padding rows are fully masked: their output is unspecified
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 2, 3], policy="keep_all", prune_mode=mode) as handle:
            assert torch.equal(logits(model, batch)[real], ref[real])
            assert torch.equal(greedy(model, batch), ref_gen)
            assert handle.stats.kept.tolist() == [[16, 16, 16]] * 2


def test_keep_all_sampling_matches_unattached(model, batch):
    def sample():
        torch.manual_seed(7)
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20)

    ref = sample()
    with atp.attach(model, layers=[2], policy="keep_all"):
        assert torch.equal(sample(), ref)


@pytest.mark.parametrize("layers", [[1], [1, 3], [2, 3], [1, 2, 3]])
def test_drop_equals_mask_with_the_same_binary_masks(model, batch, layers):
    masks = random_masks(2, 16, len(layers), seed=sum(layers))
    results = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=layers, policy="manual", keep_masks=masks, prune_mode=mode) as handle:
            results[mode] = (logits(model, batch), greedy(model, batch), handle.stats)
    compare = comparable_positions(model, batch, masks[-1])
    torch.testing.assert_close(results["drop"][0][compare], results["mask"][0][compare], rtol=1e-4, atol=1e-4)
    assert torch.equal(results["drop"][1], results["mask"][1])
    assert torch.equal(results["drop"][2].kept, results["mask"][2].kept)


def test_drop_output_is_scattered_back_to_full_length(model, batch):
    masks = random_masks(2, 16, 1, seed=3)
    with atp.attach(model, layers=[2], policy="manual", keep_masks=masks), torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    keys = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    kept = masks[0].sum(1)
    assert keys[:2] == [batch["input_ids"].shape[1]] * 2
    assert keys[2:] == [batch["input_ids"].shape[1] - 16 + int(kept.max())] * 2


def test_batch_equals_each_sample_alone(model, batch):
    masks = random_masks(2, 16, 2, seed=11)
    assert masks[-1].sum(1)[0] != masks[-1].sum(1)[1]  # different kept counts per sample
    with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks) as handle:
        batch_logits, batch_gen = logits(model, batch), greedy(model, batch)
        batch_kept = handle.stats.kept
    width = batch["input_ids"].shape[1]
    for b in range(2):
        alone = single(batch, b)
        row_masks = [mask[b : b + 1] for mask in masks]
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=row_masks) as handle:
            single_logits, single_gen = logits(model, alone), greedy(model, alone)
            assert handle.stats.kept[0].tolist() == batch_kept[b].tolist()
        length = alone["input_ids"].shape[1]
        compare = comparable_positions(model, alone, row_masks[-1])[0]
        torch.testing.assert_close(
            batch_logits[b, width - length :][compare], single_logits[0][compare], rtol=1e-4, atol=1e-4
        )
        assert torch.equal(batch_gen[b, width:], single_gen[0, length:])


def test_atp_policy_batch_equals_singles_and_scores_agree_across_modes(batch):
    model = tiny_llava(num_layers=4)
    options = {"init_theta_r": 0.45, "init_theta_s": 0.9, "temperature": 200.0}
    with atp.attach(model, layers=[1, 3], **options) as handle:
        batch_gen = greedy(model, batch)
        batch_masks = handle.stats.masks
    for b in range(2):
        alone = single(batch, b)
        with atp.attach(model, layers=[1, 3], **options) as handle:
            gen = greedy(model, alone)
            assert all(torch.equal(m[0], bm[b]) for m, bm in zip(handle.stats.masks, batch_masks))
        assert torch.equal(batch_gen[b, batch["input_ids"].shape[1] :], gen[0, alone["input_ids"].shape[1] :])
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
        for name in drop_scores:
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


def test_kept_positions_are_original_strictly_increasing_and_text_is_never_pruned(model, batch):
    masks = random_masks(2, 16, 2, seed=5)
    seen = {}

    def capture(layer):
        def hook(module, args, kwargs):
            if args[0].shape[1] > 1:  # prefill only
                seen[layer] = kwargs["position_ids"].expand(2, -1).clone()

        return hook

    handle = atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks)
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(capture(i), with_kwargs=True)
    with torch.no_grad():
        model(**batch, position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp_min(0))
    ids, attention = batch["input_ids"], batch["attention_mask"]
    visual = ids == model.config.image_token_id
    original = (attention.cumsum(1) - 1).clamp_min(0)
    for layer, keep in ((1, masks[0]), (2, masks[0]), (3, masks[1])):
        for b in range(2):
            kept_visual = visual[b].nonzero().flatten()[keep[b]]
            expected_slots = torch.cat([(~visual[b]).nonzero().flatten(), kept_visual]).sort().values
            got = seen[layer][b][-len(expected_slots) :]
            assert torch.equal(got, original[b][expected_slots])  # original positions, text all there
            real = got[attention[b][expected_slots].bool()]
            assert bool((real[1:] > real[:-1]).all())
    handle.remove()


def test_stats_agree_with_masks_and_the_kv_cache(model, batch):
    masks = random_masks(2, 16, 2, seed=9)
    with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks) as handle:
        with torch.no_grad():
            out = model(**batch)
        stats = handle.stats
    for k in range(2):
        assert torch.equal(stats.masks[k], masks[k])
        assert stats.kept[:, k].tolist() == masks[k].sum(1).tolist()
    assert bool((stats.masks[1] <= stats.masks[0]).all())
    expected = [(1 * 16 + 2 * masks[0][b].sum() + 1 * masks[1][b].sum()).item() / 4 for b in range(2)]
    assert stats.avg_tokens == pytest.approx(sum(expected) / 2)
    width = batch["input_ids"].shape[1]
    head_bytes = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, float32
    widths = [
        width,
        width - 16 + int(masks[0].sum(1).max()),
        width - 16 + int(masks[0].sum(1).max()),
        width - 16 + int(masks[1].sum(1).max()),
    ]
    assert atp.kv_cache_bytes(out.past_key_values) == sum(widths) * head_bytes * 2


@given(st.integers(0, 10_000), st.sampled_from([[1], [2], [1, 2], [1, 3], [2, 3]]))
def test_random_keep_sets_drop_equals_mask(seed, layers):
    model = _shared_model()
    generator = torch.Generator().manual_seed(seed)
    masks, current = [], torch.ones(2, 16, dtype=torch.bool)
    for _ in layers:
        current = current & (torch.rand(2, 16, generator=generator) < torch.rand(1, generator=generator))
        masks.append(current.clone())
    inputs = _shared_batch(model)
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=layers, policy="manual", keep_masks=masks, prune_mode=mode) as handle:
            out[mode] = (logits(model, inputs), handle.stats.kept)
    compare = comparable_positions(model, inputs, masks[-1])
    torch.testing.assert_close(out["drop"][0][compare], out["mask"][0][compare], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["drop"][1], out["mask"][1])


_CACHE: dict = {}


def _shared_model():
    if "model" not in _CACHE:
        _CACHE["model"] = tiny_llava(num_layers=4, seed=3)
    return _CACHE["model"]


def _shared_batch(model):
    from atp.testing import left_pad, llava_prompt

    ids, mask = left_pad([llava_prompt(model, [1, 5], [7, 8, 9]), llava_prompt(model, [1], [4, 5, 6, 7, 8])])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32)}


def test_mixed_batch_with_a_text_only_prompt_equals_singles(model):
    from atp.testing import left_pad, llava_prompt

    prompts = [llava_prompt(model, [1, 5, 6], [7, 8, 9]), [1, 20, 21, 22, 23, 24, 25]]
    ids, mask = left_pad(prompts)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mixed = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with atp.attach(model, layers=[1, 3], policy="fixed", keep=[6, 3]) as handle:
        batch_logits, batch_gen = logits(model, mixed), greedy(model, mixed)
        assert handle.stats.num_visual.tolist() == [16, 0]
        assert handle.stats.kept.tolist() == [[6, 3], [0, 0]]
        assert handle.stats.avg_tokens == pytest.approx((16 + 2 * 6 + 3) / 4)
        image_alone = {"input_ids": ids[:1], "pixel_values": pixels}
        image_logits, image_gen = logits(model, image_alone), greedy(model, image_alone)
        kept_mask = handle.stats.masks[-1]
    with torch.no_grad():
        text_alone = {"input_ids": torch.tensor([prompts[1]])}
        text_logits, text_gen = logits(model, text_alone), greedy(model, text_alone)
    compare = comparable_positions(model, image_alone, kept_mask)[0]
    torch.testing.assert_close(batch_logits[0][compare], image_logits[0][compare], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch_logits[1, -7:], text_logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(batch_gen[0, ids.shape[1] :], image_gen[0, ids.shape[1] :])
    assert torch.equal(batch_gen[1, ids.shape[1] :], text_gen[0, 7:])


def test_drop_equals_mask_when_sampling(model, batch):
    masks = random_masks(2, 16, 2, seed=21)
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks, prune_mode=mode):
            torch.manual_seed(3)
            with torch.no_grad():
                out[mode] = model.generate(
                    **batch, max_new_tokens=8, do_sample=True, top_k=0, temperature=1.0
                )
    assert torch.equal(out["drop"], out["mask"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keep_all_and_drop_equals_mask(batch, dtype):
    model = tiny_llava(num_layers=4).to(dtype)
    inputs = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    real = batch["attention_mask"].bool()
    ref = logits(model, inputs)
    with atp.attach(model, layers=[1, 3], policy="keep_all"):
        assert torch.equal(logits(model, inputs)[real], ref[real])
    masks = random_masks(2, 16, 2, seed=2)
    out = {}
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=masks, prune_mode=mode):
            out[mode] = logits(model, inputs)
    compare = comparable_positions(model, inputs, masks[-1])
    assert torch.isfinite(out["mask"][real]).all() and torch.isfinite(out["drop"][real]).all()
    torch.testing.assert_close(
        out["drop"][compare].float(), out["mask"][compare].float(), rtol=0.05, atol=0.05
    )


def test_an_image_token_generated_while_decoding_is_just_a_token(model, batch):
    """A random model may sample the image token id; without pixels it is text, as unattached."""
    image_token = model.config.image_token_id
    step = {
        "input_ids": torch.full((2, 1), image_token),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
    }
    masks = random_masks(2, 16, 1, seed=4)
    out = {}
    for mode in ("drop", "mask"):
        with (
            atp.attach(model, layers=[2], policy="manual", keep_masks=masks, prune_mode=mode),
            torch.no_grad(),
        ):
            cache = model(**batch, use_cache=True).past_key_values
            out[mode] = model(**step, past_key_values=cache).logits
    torch.testing.assert_close(out["drop"], out["mask"], rtol=1e-4, atol=1e-4)
