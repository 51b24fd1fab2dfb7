"""Aya Vision's own paths: Cohere2's sliding window measured in original positions while decoding
far past it, the position keepers that do not apply, and Aya Vision 32B's Cohere text model (global
layers only) through the invariant suite. (The family suite covers the rest on Cohere2.)"""

from __future__ import annotations

import pytest
import torch

import atp
from atp.host.attach import resolve_adapter
from atp.tiny.models import AYA_IDS, aya_vision_batch, tiny_aya_vision
from tests import test_invariants as invariants
from tests.families import BY_NAME_FAMILIES, Family
from tests.numerics import assert_same_greedy

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")


def test_decoding_past_the_window_equals_mask_mode_and_the_caches_hold_what_they_should():
    """20 new tokens with a window of 8 (layers S, S, S, F): every sliding layer's cache holds the
    last 7 tokens, the global layer's shrinks by the pruned ones in drop mode only, and the greedy
    continuation and its scores are the same in both modes."""
    model = tiny_aya_vision(4, 0, sliding_window=8)
    batch = aya_vision_batch([[[1, 5], ("image", 1), [7]], [[1], ("image", 2), [4, 5]]])
    visual = int((batch["input_ids"] == AYA_IDS["image"]).sum(1).max())
    early = [(torch.arange(visual) < 6).expand(2, -1), (torch.arange(visual) < 3).expand(2, -1)]
    out, total = {}, batch["input_ids"].shape[1] + 19
    for mode in ("drop", "mask"):
        with atp.attach(model, layers=[1, 3], policy="manual", keep_masks=early, prune_mode=mode):
            out[mode] = model.generate(
                **batch, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        cache = out[mode].cache if hasattr(out[mode], "cache") else out[mode].past_key_values
        stored = [layer.keys.shape[2] for layer in cache.layers]
        assert stored[:3] == [7, 7, 7]  # sliding: window - 1
        # the global layer: sample 0 (16 visual -> 3, behind its left padding) is the longest pruned row
        assert stored[3] == (total - (16 - 3) if mode == "drop" else total)
    length = batch["input_ids"].shape[1]
    drop, mask = ((out[m].sequences[:, length:], torch.stack(out[m].scores, 1)) for m in ("drop", "mask"))
    assert_same_greedy(drop, mask)  # tokens, and scores up to a reordering's rounding


@pytest.mark.parametrize("positions", ["renumber", "rope2d"])
def test_position_keepers_other_than_keep_are_refused_with_the_reason(positions):
    model = tiny_aya_vision()
    with pytest.raises(ValueError, match=f"positions='{positions}' works with 1d-rope models"):
        atp.attach(model, layers=[1], positions=positions)
    assert "atp" not in dict(model.named_children())


COHERE = Family(  # Aya Vision 32B's layout: a Cohere LM, every layer global with (interleaved) RoPE
    "aya_vision",
    lambda num_layers, seed: tiny_aya_vision(num_layers, seed, text_model="cohere"),
    BY_NAME_FAMILIES["aya_vision"].samples,
    BY_NAME_FAMILIES["aya_vision"].make,
    BY_NAME_FAMILIES["aya_vision"].media,
)


@pytest.mark.parametrize(
    "check",
    [
        invariants.test_keep_all_equals_unattached,
        invariants.test_keep_all_sampling_matches_unattached,
        invariants.test_drop_equals_mask_when_sampling,
        invariants.test_drop_output_is_scattered_back_and_the_cache_shrinks,
        invariants.test_batch_equals_each_sample_alone,
    ],
    ids=lambda check: check.__name__.removeprefix("test_"),
)
def test_the_cohere_text_model_keeps_the_invariants(check):
    model = COHERE.model()
    assert type(model.model.language_model).__name__ == "CohereModel"
    names = check.__code__.co_varnames[: check.__code__.co_argcount]
    given = {"family": COHERE, "model": model, "batch": COHERE.batch(model)}
    check(**{name: given[name] for name in names})


def test_the_cohere_text_model_drop_equals_mask():
    model = COHERE.model()
    invariants.test_drop_equals_mask_with_the_same_binary_masks(model, COHERE.batch(model), [1, 3])


def test_each_grid_is_drawn_on_its_own_crop():
    """``atp visualize`` draws a grid on the crop its tokens came from: the tiles, then the thumbnail,
    in ``pixel_values`` order (as Aya Vision's image processor stacks them)."""
    model = tiny_aya_vision()
    batch = aya_vision_batch([[[1], ("image", 2), [6]], [[1], ("image", 1), [6]]])
    adapter = resolve_adapter(model)
    grids = adapter.visual_layout(batch["input_ids"], batch, {}).grids
    assert grids == [[(4, 4)] * 3, [(4, 4)]]
    drawn = adapter.grid_pixels(batch, grids)
    crops = iter(batch["pixel_values"])
    assert all(torch.equal(pixels, next(crops)) for sample in drawn for pixels in sample)
